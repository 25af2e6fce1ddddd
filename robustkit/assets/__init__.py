"""Real-data samples shipped with robustkit (see ``robustkit.data.samples``); no code."""
