"""Evaluation by the RobustBench protocol: per-sample flags, resumable state, checks, results.

Example:
    >>> from robustkit.evaluation import evaluate_attacks
    >>> res = evaluate_attacks(model, (x, y), {"pgd20": PGD(model, steps=20)})
    >>> res.accuracy()["robust"]
"""

from robustkit.errors import StateMismatchError
from robustkit.evaluation.checks import BLACK_BOX, Check, pre_checks
from robustkit.evaluation.masking import masking_checks, post_checks
from robustkit.evaluation.protocol import EvalResult, evaluate_attacks
from robustkit.evaluation.results import (
    build_results,
    format_eps,
    model_info,
    write_model_info,
    write_results,
)

__all__ = ["evaluate_attacks", "EvalResult", "StateMismatchError", "Check", "pre_checks",
           "post_checks", "masking_checks", "BLACK_BOX", "build_results", "write_results",
           "model_info", "write_model_info", "format_eps"]
