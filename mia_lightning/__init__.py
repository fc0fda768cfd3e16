"""mia-lightning: membership inference audits of PyTorch Lightning models, with and without DP-SGD."""

__version__ = "0.1.0"
