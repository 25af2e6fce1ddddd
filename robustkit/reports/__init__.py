"""Rendering what ``evaluation``, ``sensitivity`` and ``saliency`` computed: PNG figures and
TensorBoard logs (architecture.md §2). Nothing here computes a result; matplotlib is used through
``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``, so no global figure state
leaks into the caller.

Example:
    >>> from robustkit.reports.sensitivity import write_figures
    >>> paths = write_figures(report, sigmas, "runs/sens")
"""
