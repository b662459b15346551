"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, pruned per output row. No weight update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import METHODS
from ..sparsity import project
from .layerwise import LayerwisePruner, RunningMean


@METHODS.register("wanda")
@dataclass
class Wanda(LayerwisePruner):
    group = "row"

    def new_stats(self, columns, device):
        return RunningMean(torch.zeros(columns, dtype=torch.float32, device=device))

    def add_batch(self, stats: RunningMean, x: torch.Tensor) -> None:
        # mean squared column norm per window; its scale does not change the per-row ranking
        stats.add(x, lambda x2: x2.pow(2).sum(0))

    def prune_linear(self, linear, stats: RunningMean, sparsity, pattern):
        score = linear.weight.abs().float() * stats.value.sqrt().unsqueeze(0)
        return project(score, sparsity, pattern, self.group)
