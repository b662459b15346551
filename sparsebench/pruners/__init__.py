"""Pruning methods. Importing this package registers every method in METHODS."""
from . import alps, dense, elsa, ladmm, magnitude, safe, sparsegpt, wanda  # noqa: F401  (registration side effects)
from .base import Pruner, PruneContext  # noqa: F401
