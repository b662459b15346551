"""Magnitude pruning: score |W|, one threshold per tensor (N:M: per group of M)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..masks import apply_mask
from ..models import prunable_linears
from ..plan import Terms
from ..registry import METHODS
from ..sparsity import project
from .base import PruneContext, Pruner
from .layerwise import LayerwisePruner


@METHODS.register("magnitude")
@dataclass
class Magnitude(Pruner):
    group = "tensor"

    def plan_terms(self, device):
        return Terms("oneshot")  # no statistics: one tensor's projection at a time

    @torch.no_grad()
    def prune(self, ctx: PruneContext):
        masks = {}
        linears = prunable_linears(ctx.model)
        targets = ctx.targets(linears)
        for name, linear in linears.items():
            w = linear.weight.to(ctx.device)
            keep = project(w.abs(), targets[name], ctx.pattern, self.group)
            apply_mask(linear, keep)
            masks[name] = keep.cpu()
        return masks

    def refinable(self) -> "MagnitudeWalk":
        # magnitude alone reads no data; a refinement needs each linear's inputs, so under
        # refine= magnitude runs in the one-shot block walk (the released DSnoT code's
        # `--initial_method magnitude` starts from |W|'s lowest int(cols x s) per row)
        return MagnitudeWalk()


@dataclass
class MagnitudeWalk(LayerwisePruner):
    """Magnitude inside the one-shot block walk, for a refinement (not registered: the run
    names it `magnitude`). Its own statistic is none; the walk gathers the refinement's. Its
    masks under refine.init=mask are magnitude's (one threshold per tensor)."""

    name: ClassVar[str] = "magnitude"
    group = "tensor"
    scored = True
    statistic = "none"

    def new_stats(self, columns, device):
        return None

    def add_batch(self, stats, x) -> None:
        pass

    def score(self, linear, stats):
        return linear.weight.abs().float()

    def prune_linear(self, linear, stats, sparsity, pattern):
        return project(self.score(linear, stats), sparsity, pattern, self.group)
