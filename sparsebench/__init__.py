"""sparsebench: prune a causal LM with one method at one sparsity, evaluate it, log it."""

__version__ = "0.1.0"
