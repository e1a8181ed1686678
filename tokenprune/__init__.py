"""tokenprune: visual-token reduction for multimodal LLMs."""

__version__ = "0.1.0"
