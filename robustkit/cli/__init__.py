"""``robustkit`` command line: ``train``, ``evaluate``, ``sensitivity``, ``inspect`` and ``demo``.

The CLI is the only place where configs and flags become objects, and the only place that
prints (tables, progress bars). Each subcommand lives in its own module with ``add_parser`` and
``run``.

Errors: a :class:`~robustkit.errors.UserError` (a bad flag, config value, model, data or state)
ends in one line on stderr, ``robustkit <command>: error: ...``, and exit code 2 (argparse's
own usage errors also exit 2); a ``DataError`` keeps its lines (the paths searched, one per
line, the expected layout and the fixes). Anything else is a bug: ``main`` lets it propagate,
so Python prints the traceback and exits with code 1 (in-process callers get the exception
itself). The library raises plain ``ValueError`` for bad arguments; the CLI converts it into a
user error only where user input enters the library (:func:`user_input`), so a ``ValueError``
from deeper code stays a visible bug. Ctrl-C at any point, the imports of the subcommands
included, ends in one line ``interrupted`` (plus what to do, e.g. how to resume) and exit code
130.
"""

from __future__ import annotations

import argparse
import logging
import sys

from robustkit.errors import DataError, UserError, user_input

__all__ = ["main", "CLIError", "MODEL_FORMS", "user_input"]

# The --model forms, in the --help of evaluate, sensitivity and inspect.
MODEL_FORMS = """\
model forms (--model SPEC):
  NAME               a registry model (robustkit.models.MODELS), usually with --checkpoint
  FILE.py:FN         FN() returns an nn.Module taking [0, 1] inputs (normalising itself)
  robustbench:NAME   a RobustBench zoo model (downloads its weights; no --checkpoint)
  robustkit:NAME     a reference model shipped with robustkit (offline), e.g.
                     robustkit:mnist_smallcnn_robust, robustkit:mnist_smallcnn_standard
"""


class CLIError(UserError):
    """A user error found by the CLI itself (a bad flag): printed as one line, exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    from robustkit import __version__
    from robustkit.cli import demo, evaluate, inspect, sensitivity, sweep, train

    parser = argparse.ArgumentParser(
        prog="robustkit",
        description="Adversarial training and RobustBench-protocol evaluation for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"robustkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; user errors also show their traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, evaluate, sensitivity, inspect, demo, sweep):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0, 2 for a user error, 130 when interrupted).

    Ctrl-C (``KeyboardInterrupt``) at any point, including while the subcommands' modules
    (torch) are imported, ends in one line starting with ``interrupted`` and exit code 130.

    Raises:
        Exception: any error that is not a ``UserError`` (a bug), with its traceback.
    """
    command, verbose = "", False
    try:
        parser = _build_parser()  # imports the subcommands, hence torch: interruptible too
        args = parser.parse_args(argv)
        command, verbose = args.command, args.verbose
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return int(args.run(args) or 0)
    except UserError as err:
        if verbose:
            raise
        lines = [" ".join(str(err).split()) or type(err).__name__]
        if isinstance(err, DataError):  # the paths searched, the layout and the fix: a line each
            lines = [ln.rstrip() for ln in str(err).strip().splitlines() if ln.strip()]
        print(f"robustkit {command}: error: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        detail = " ".join(str(err).split())  # e.g. how to resume (robustkit train)
        print("interrupted" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 130
