"""Mask refinement without training: a stage between pruning and recovery (`refine=<name>`)
that changes which weights a method's masks keep, never how many (every row's count, every
N:M group's, stays as the method left it), and updates no weight: each refined linear holds
its dense values on the refined mask.

It runs inside the block walk of the one-shot methods (pruners/layerwise.py), as the released
DSnoT code does: block i's statistics are gathered on the inputs that the pruned and refined
blocks 0..i-1 produce, the method prunes block i from them, the refinement refines it, and
only then does block i feed block i+1. The refinement's own statistics are gathered in the
method's statistics pass (one pass per block).

  none   no refinement (default)
  dsnot  DSnoT's prune-and-grow swaps (refine/dsnot.py)

Every refinement is one file, registered by name (this package imports each of its
modules), configured by conf/refine/<name>.yaml. It may import the package's foundations
(errors, registry, sparsity, masks, models, data); the one-shot methods call it through the
`Refinement` interface, never by import.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..registry import Registry
from ..sparsity import Pattern

REFINEMENTS = Registry("refinement")


class Refinement:
    """A mask refinement: its own statistic of each linear's input (`new_stats`, `add_batch`,
    gathered in the method's statistics pass) and `refine_linear`, which returns a linear's
    refined keep mask with every row's (N:M group's) count unchanged."""

    name: ClassVar[str]
    # "auto": start from the method's score of the dense weight where it has one (the
    # released DSnoT code's start: the score's lowest int(cols x s) per row), else from the
    # method's mask; "score" or "mask" ask for one of the two
    init: str = "auto"

    def new_stats(self, columns: int, device: torch.device) -> Any:
        raise NotImplementedError

    def add_batch(self, stats: Any, x: torch.Tensor) -> None:
        raise NotImplementedError

    def skips(self, name: str) -> bool:
        """True for a linear (its name inside the block) that keeps its initial mask."""
        return False

    def refine_linear(
        self, dense: torch.Tensor, keep: torch.Tensor, stats: Any, score, pattern: Pattern
    ) -> torch.Tensor:
        raise NotImplementedError

    def start(self) -> None:
        """Before a run's block walk: reset what the report counts."""
        self._report: dict[str, Any] = {"seconds": 0.0, "refined": 0, "skipped": 0, "swaps": 0}

    def tally(self, **counts: float) -> None:
        """Add to the report's counts (refined, skipped, swaps, seconds)."""
        for key, value in counts.items():
            self._report[key] = round(self._report[key] + value, 3)

    def report(self) -> dict[str, Any]:
        return getattr(self, "_report", {})


def _register_all() -> None:
    """Import every module of this package: a new refinement file registers itself."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_register_all()
