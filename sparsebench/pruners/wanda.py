"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, pruned per output row. No weight update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import METHODS
from ..sparsity import project
from .layerwise import LayerwisePruner


class _Norms:
    def __init__(self, columns: int, device):
        self.sq = torch.zeros(columns, dtype=torch.float32, device=device)
        self.nsamples = 0


@METHODS.register("wanda")
@dataclass
class Wanda(LayerwisePruner):
    group = "row"

    def new_stats(self, columns, device):
        return _Norms(columns, device)

    def add_batch(self, stats: _Norms, x: torch.Tensor) -> None:
        # Running mean over forward calls of the per-column squared norm, as the official
        # code keeps it (the scale does not change the per-row ranking).
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        stats.sq *= stats.nsamples / (stats.nsamples + batch)
        stats.nsamples += batch
        stats.sq += x.pow(2).sum(0) / stats.nsamples

    def prune_linear(self, linear, stats: _Norms, sparsity, pattern):
        score = linear.weight.abs().float() * stats.sq.sqrt().unsqueeze(0)
        return project(score, sparsity, pattern, self.group)
