"""The network and what it learns: the frozen SAM backbone (``sam/``), the prompt tokens, SAM's
encoder and decoder driven by them, ``PTSAM`` itself, and the prompt-only ``model.pt``.
Nothing here knows about image files or workflows."""

from .network import PTSAM

__all__ = ["PTSAM"]
