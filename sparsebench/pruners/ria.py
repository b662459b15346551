"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient Post-training Pruning Method
for Large Language Models"): relative importance and activations, no weight update.

    score_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) x (||X_j||_2)^a

the weight's share of its input column plus its share of its output row, times Wanda's input
norm (the same running mean of ||X_j||^2 over calibration windows) to the power a = 0.5.
Taken from the released code (lib/prune.py `prune_ria`), with its defaults:
- unstructured: one threshold per linear, every score <= the sorted score at index
  int(numel x s) goes (group "tensor+1": int(numel x s) + 1 weights, plus ties);
  `per_row=true` is the released `--per_outneuron` (int(cols x s) per row, Wanda's group);
- N:M: the lowest M - N of every M consecutive columns of a row (the released "directly N:M").
The released options that permute input channels before N:M (heuristic channel reallocation,
linear sum assignment) are not part of this method; what a permuted mask means for an
export is not settled here (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import METHODS, option
from .wanda import Wanda


def ria_score(weight: torch.Tensor, norms_sq: torch.Tensor, a: float) -> torch.Tensor:
    """The released score, operation for operation (so the masks match to the bit):
    column share + row share of |W|, times sqrt(mean ||X_j||^2) ** a."""
    w = weight.abs().float()
    relative = w / torch.sum(w, dim=0) + w / torch.sum(w, dim=1).reshape(-1, 1)
    return relative * torch.sqrt(norms_sq.reshape((1, -1))) ** a


@METHODS.register("ria")
@dataclass
class RIA(Wanda):
    a: float = option(0.5, ge=0)  # the exponent of the input norm (released default 0.5)
    per_row: bool = False  # the released --per_outneuron: int(cols x s) per row

    @property
    def group(self) -> str:  # type: ignore[override]
        return "row" if self.per_row else "tensor+1"

    def score(self, linear, stats):
        return ria_score(linear.weight.detach(), stats.value, self.a)
