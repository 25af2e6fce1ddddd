"""Neuron sensitivity (methods.md §4): capture features, measure σ, rank neurons.

Example:
    >>> from robustkit.sensitivity import neuron_sensitivity, top_k_neurons
    >>> sigma = neuron_sensitivity(model, x, x_adv, "auto")
"""

from robustkit.sensitivity.intervention import intervention_test, patched_logits
from robustkit.sensitivity.measure import (
    SensitivityMeter,
    jaccard,
    neuron_sensitivity,
    per_sample_sensitivity,
    top_k_neurons,
)
from robustkit.sensitivity.tap import FeatureTap, resolve_layers

__all__ = ["FeatureTap", "resolve_layers", "SensitivityMeter", "neuron_sensitivity",
           "per_sample_sensitivity", "top_k_neurons", "jaccard", "patched_logits",
           "intervention_test"]
