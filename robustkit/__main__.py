"""``python -m robustkit``: what ``torchrun`` launches."""

from robustkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
