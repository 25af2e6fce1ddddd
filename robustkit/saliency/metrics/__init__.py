"""Saliency-map metrics (methods.md §6.3 and §8.2) as pure functions on batches of maps.

Every metric takes a batch and returns one value per image, an ``(N,)`` tensor; the metric of a
batch equals the metrics of its items stacked. Maps are ``(N, H, W)`` or ``(N, C, H, W)``; a
4-D map is reduced over channels the way the metric's definition reads the map (§8.1 keeps both
reduced forms; pass an ``(N, H, W)`` map to choose another one):

===================================================================  ==========================
metric                                                               ``(N, C, H, W)`` becomes
===================================================================  ==========================
``sparseness complexity edge_spearman mass_in_box pointing_game``    ``Σ_c |a_c|`` (magnitude;
``topk_intersection deletion_auc insertion_auc``                     a 3-D map: ``|a|``)
``cascading_randomisation``
``total_variation hfer stability_spearman ssim stability_cos``       ``Σ_c a_c`` (signed, the
                                                                     §6.2 display reduction; a
                                                                     3-D map is used as given)
``alignment_cos adaptgrad_residual max_sensitivity``                 not reduced: the whole map
                                                                     is one vector
===================================================================  ==========================

The metrics are split by family as Quantus does; every public name is re-exported here, so
``from robustkit.saliency.metrics import sparseness`` and ``metrics.sparseness`` keep working:

==================  ===========================================================================
module              metrics
==================  ===========================================================================
``complexity``      ``sparseness complexity total_variation hfer adaptgrad_residual`` (§8.2 1-3)
``localisation``    ``alignment_cos edge_spearman mass_in_box pointing_game box_area_fraction``
                    (§8.2 4-5)
``robustness``      ``stability_spearman topk_intersection ssim stability_cos max_sensitivity``
                    (§8.2 6)
``faithfulness``    ``deletion_auc insertion_auc`` (§8.2 7)
``randomisation``   ``cascading_randomisation`` (§8.2 8)
==================  ===========================================================================

``metrics.complexity`` is the function (as before the split); its family module is reached by
``from robustkit.saliency.metrics.complexity import ...``.

Example:
    >>> from robustkit.saliency import metrics as M
    >>> M.sparseness(maps), M.mass_in_box(maps, val.boxes[:len(maps)])    # two (N,) tensors
"""

from robustkit.saliency.metrics.complexity import (
    adaptgrad_residual,
    complexity,
    hfer,
    sparseness,
    total_variation,
)
from robustkit.saliency.metrics.faithfulness import deletion_auc, insertion_auc
from robustkit.saliency.metrics.localisation import (
    alignment_cos,
    box_area_fraction,
    edge_spearman,
    mass_in_box,
    pointing_game,
)
from robustkit.saliency.metrics.randomisation import cascading_randomisation
from robustkit.saliency.metrics.robustness import (
    max_sensitivity,
    ssim,
    stability_cos,
    stability_spearman,
    topk_intersection,
)

__all__ = [
    "sparseness", "complexity", "total_variation", "hfer", "adaptgrad_residual",
    "alignment_cos", "edge_spearman", "mass_in_box", "pointing_game", "box_area_fraction",
    "stability_spearman", "topk_intersection", "ssim", "stability_cos", "max_sensitivity",
    "deletion_auc", "insertion_auc", "cascading_randomisation",
]
