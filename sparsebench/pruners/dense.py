"""The dense baseline: prunes nothing, so it runs through the same pipeline as the rest."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import Terms
from ..registry import METHODS
from .base import PruneContext, Pruner


@METHODS.register("dense")
@dataclass
class Dense(Pruner):
    def plan_terms(self, device):
        return Terms("oneshot", prunes=False)

    def prune(self, ctx: PruneContext):
        return {}
