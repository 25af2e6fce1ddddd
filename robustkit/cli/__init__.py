"""``robustkit`` command line: ``train``, ``evaluate`` and ``demo``.

The CLI is the only place where configs and flags become objects, and the only place that
prints (tables, progress bars). Each subcommand lives in its own module with ``add_parser`` and
``run``; errors a user can fix (``CLIError`` and the library's ``ValueError`` subclasses) end in
one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from robustkit.errors import UserError

__all__ = ["main", "CLIError"]


class CLIError(UserError):
    """A user error found by the CLI itself (a bad flag): printed as one line, exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    from robustkit import __version__
    from robustkit.cli import demo, evaluate, train

    parser = argparse.ArgumentParser(
        prog="robustkit",
        description="Adversarial training and RobustBench-protocol evaluation for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"robustkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, evaluate, demo):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as err:
        # User errors (bad flag values, unknown names, missing files): one clear line.
        if args.verbose:
            raise
        print(f"robustkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
