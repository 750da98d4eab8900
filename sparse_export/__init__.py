"""sparse-export: one-shot SparseGPT pruning and export of causal language models."""

__version__ = "0.1.0"
