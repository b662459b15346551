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
With `reallocation=true` (N:M only; off by default, as released) the input channels are
permuted before the groups of M are formed, the released "heuristic channel reallocation":
columns sorted by an importance (`importance`: the column sums of the score, or the released
"retained degree" rules) are dealt to the M positions of the groups in a snake order; with
`lsa=true` each position is then re-dealt by a linear sum assignment (scipy) that maximizes
the score the groups keep. The mask is stored in the model's own column order: the pruned
model computes exactly what the unpermuted layer computes with those zeros, and it is N:M
in the permuted order (results.json `column_orders`; an export keeps the orders, and the
verifier checks N:M in them). A runtime that serves 2:4 permutes the weight's input columns
(and the input) by the order; torch's semi-structured kernel refuses the unpermuted weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsebenchError
from ..registry import METHODS, option
from ..sparsity import nm_keep, project
from .wanda import Wanda

IMPORTANCES = ("sum", "retained_degree_unstructured", "retained_degree_per_outneuron")


def ria_score(weight: torch.Tensor, norms_sq: torch.Tensor, a: float) -> torch.Tensor:
    """The released score, operation for operation (so the masks match to the bit):
    column share + row share of |W|, times sqrt(mean ||X_j||^2) ** a."""
    w = weight.abs().float()
    relative = w / torch.sum(w, dim=0) + w / torch.sum(w, dim=1).reshape(-1, 1)
    return relative * torch.sqrt(norms_sq.reshape((1, -1))) ** a


def lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Indices sorting by the last key, ties by the ones before (numpy.lexsort's order)."""
    idx = keys[0].argsort(dim=-1, stable=True)
    for k in keys[1:]:
        idx = idx.gather(-1, k.gather(-1, idx).argsort(dim=-1, stable=True))
    return idx


def column_importance_order(score: torch.Tensor, sparsity: float, importance: str):
    """The input columns from least to most important, by the released rules."""
    if importance == "sum":
        return torch.sort(torch.sum(score, dim=0))[1]
    rows, cols = score.shape
    if importance == "retained_degree_unstructured":
        thresh = torch.sort(score.flatten())[0][int(rows * cols * sparsity)]
        pruned = score <= thresh
    else:  # retained_degree_per_outneuron
        pruned = torch.zeros_like(score, dtype=torch.bool)
        low = torch.sort(score, dim=-1, stable=True)[1][:, : int(cols * sparsity)]
        pruned.scatter_(1, low, True)
    return lexsort([torch.sum(pruned, dim=0), torch.sum((~pruned) * score, dim=0)])


def snake_order(importance_order: torch.Tensor, m: int) -> torch.Tensor:
    """Deal the sorted columns to the M positions of the groups: position k takes the k-th
    M-quantile of the order, reversed on every second position (the released reallocation)."""
    cols = importance_order.numel()
    index = torch.zeros_like(importance_order)
    for k in range(1, m + 1):
        part = importance_order[int(cols * (k - 1) / m) : int(cols * k / m)]
        index[k - 1 :: m] = part if k % 2 == 1 else part.flip(0)
    return index


def lsa_position(score: torch.Tensor, position: int, n: int, m: int) -> torch.Tensor:
    """One released linear-sum-assignment round: which group's column goes to `position` of
    each group so that the kept score of all groups is largest. Returns a column permutation."""
    from scipy.optimize import linear_sum_assignment

    cols = score.shape[1]
    groups = cols // m
    starts = torch.arange(groups) * m
    others = torch.tensor([c for c in range(m) if c != position])
    gain = torch.zeros(groups, groups)
    for g in range(groups):  # group g's other columns with each group's `position` column
        strip = torch.empty(groups, m, dtype=torch.long)
        strip[:, 0] = starts + position
        strip[:, 1:] = others.reshape(1, -1) + g * m
        block = score[:, strip].permute(1, 0, 2)  # (candidates, rows, m)
        pruned = torch.zeros_like(block)
        pruned.scatter_(-1, torch.sort(block, dim=-1)[1][..., :n], 1)
        gain[:, g] = torch.sum(torch.sum(block * (pruned == 0), dim=-1), dim=-1)
    chosen = torch.as_tensor(linear_sum_assignment(gain.t().numpy(), maximize=True)[1])
    idx = torch.arange(cols)
    idx[starts + position] = chosen * m + position
    return idx


@METHODS.register("ria")
@dataclass
class RIA(Wanda):
    a: float = option(0.5, ge=0)  # the exponent of the input norm (released default 0.5)
    per_row: bool = False  # the released --per_outneuron: int(cols x s) per row
    # N:M only: permute input channels before forming the groups (released --reallocation,
    # --importance_score, --lsa; all off / "sum" by default as released)
    reallocation: bool = False
    importance: str = option("sum", choices=IMPORTANCES)
    lsa: bool = False

    @property
    def permutes_columns(self) -> bool:  # type: ignore[override]
        return self.reallocation

    def __post_init__(self):
        if self.lsa and not self.reallocation:
            raise SparsebenchError(
                "ria: lsa=true refines the channel reallocation; set method.reallocation=true too"
            )
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def group(self) -> str:  # type: ignore[override]
        return "row" if self.per_row else "tensor+1"

    def score(self, linear, stats):
        return ria_score(linear.weight.detach(), stats.value, self.a)

    def prune_linear(self, linear, stats, sparsity, pattern):
        score = self.score(linear, stats)
        if not (self.reallocation and pattern.is_nm):
            return project(score, sparsity, pattern, self.group)
        order = snake_order(column_importance_order(score, sparsity, self.importance), pattern.m)
        if self.lsa:
            for position in range(pattern.m):
                order = order[
                    lsa_position(score[:, order], position, pattern.m - pattern.n, pattern.m)
                ]
        keep = torch.empty_like(score, dtype=torch.bool)
        keep[:, order] = nm_keep(score[:, order], pattern.n, pattern.m)
        self._orders[id(linear)] = order
        return keep

    def pop_column_order(self, linear):
        return self._orders.pop(id(linear), None)
