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
    scored = True
    statistic = "norms"

    def new_stats(self, columns, device):
        return RunningMean(torch.zeros(columns, dtype=torch.float32, device=device))

    def add_batch(self, stats: RunningMean, x: torch.Tensor) -> None:
        # mean squared column norm per window, as the official code sums it (a norm over the
        # transposed input: no (tokens x columns) temporary, and the same bits)
        stats.add(x, lambda x2: torch.norm(x2.t(), p=2, dim=1) ** 2)

    def score(self, linear, stats: RunningMean):
        return linear.weight.abs().float() * stats.value.sqrt().unsqueeze(0)

    def prune_linear(self, linear, stats: RunningMean, sparsity, pattern):
        return project(self.score(linear, stats), sparsity, pattern, self.group)
