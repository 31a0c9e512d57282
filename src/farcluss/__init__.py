"""farcluss: semi-supervised semantic segmentation (FARCLUSS and its baselines) in one engine."""

__version__ = "0.1.0"
