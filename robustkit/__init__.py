"""robustkit: adversarial training, RobustBench-protocol evaluation and saliency for PyTorch.

Public names are re-exported by the subpackages (``robustkit.attacks``, ``robustkit.models``,
``robustkit.data``, ``robustkit.objectives``); importing this package does no work.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
