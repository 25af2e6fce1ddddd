"""``python evaluate/evaluate.py ARGS`` = ``robustkit evaluate ARGS`` (RobustBench protocol).

Example:
    python evaluate/evaluate.py --model evaluate/pyautoattack_resnet18.py:pyautoattack_resnet18 \\
        --dataset sample-cifar10 --n-examples 200 --attacks clean,pgd20
"""

import sys

from robustkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
