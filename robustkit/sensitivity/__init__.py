"""Neuron sensitivity (methods.md §4): capture features, measure σ, rank neurons, and compare
models (``compare`` -> ``SensitivityReport``, what ``robustkit sensitivity`` runs).

A layer has one name in every output, its full module name (``model.feature_extractor.conv2``);
wherever a layer is given, a unique end of the name (``conv2``) is accepted too
(``resolve_layers``).

Example:
    >>> from robustkit.sensitivity import compare
    >>> report = compare({"standard": std, "robust": rob}, x, y, attack="pgd20", eps=0.3)
"""

from robustkit.sensitivity.compare import common_layers, compare
from robustkit.sensitivity.intervention import intervention_test, patched_logits
from robustkit.sensitivity.measure import (
    SensitivityMeter,
    jaccard,
    neuron_sensitivity,
    per_sample_sensitivity,
    top_k_neurons,
)
from robustkit.sensitivity.pairs import adversarial_pairs, full_strength_pgd
from robustkit.sensitivity.report import SensitivityReport
from robustkit.sensitivity.tap import FeatureTap, resolve_layers

__all__ = ["FeatureTap", "resolve_layers", "SensitivityMeter", "neuron_sensitivity",
           "per_sample_sensitivity", "top_k_neurons", "jaccard", "patched_logits",
           "intervention_test", "compare", "common_layers", "SensitivityReport",
           "full_strength_pgd", "adversarial_pairs"]
