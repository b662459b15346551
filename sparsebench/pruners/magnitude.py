"""Magnitude pruning: score |W|, one threshold per tensor (N:M: per group of M)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import apply_mask
from ..models import prunable_linears
from ..registry import METHODS
from ..sparsity import project
from .base import Pruner, PruneContext


@METHODS.register("magnitude")
@dataclass
class Magnitude(Pruner):
    group = "tensor"

    @torch.no_grad()
    def prune(self, ctx: PruneContext):
        masks = {}
        for name, linear in prunable_linears(ctx.model).items():
            w = linear.weight.to(ctx.device)
            keep = project(w.abs(), ctx.sparsity, ctx.pattern, self.group)
            apply_mask(linear, keep)
            masks[name] = keep.cpu()
        return masks
