"""autoexit: label-free early-exit enabling of pre-trained PyTorch classifiers."""

from __future__ import annotations

__version__ = "0.1.0"
