"""Magnitude pruning: score |W|, one threshold per tensor (N:M: per group of M)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import apply_mask
from ..models import prunable_linears
from ..plan import Terms
from ..registry import METHODS
from ..sparsity import project
from .base import PruneContext, Pruner


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
