"""OATS (Zhang & Papyan, ICLR 2025, "OATS: Outlier-Aware Pruning Through Sparse and Low Rank
Decomposition"): each linear becomes a sparse matrix plus a low-rank product.

The weight is scaled by the input's second moment, W D with D = sqrt(mean ||X_j||^2) (Wanda's
statistic, the same running mean), and split by alternating
    L = the rank-r truncated SVD of (W D - S)
    S = W D - L with its smallest |entries| of each row set to zero
`num_iters` times from S = 0; the linear becomes S / D + (U_r Sigma_r)(V_r / D). Taken from the
released code (OATS/prune_oats_compress.py `altern_ls` and its driver), with its defaults
(`num_iters` 80, `rank_ratio` 0.25; the released grid also runs 0.3):
- `sparsity` s is the compression of each linear's parameters: it keeps (1 - s) of them,
  `rank_ratio` of that budget in the factors, rank r = int(rank_ratio x (1 - s) x out x in /
  (out + in)), and S keeps the rest: int(in x (1 - (1 - rank_ratio)(1 - s))) of each row are
  zero, chosen by a stable sort of |S| as released (the masks are verified against that share);
- N:M (the released "2:8" runs): S is N:M (the lowest M - N of every M by |S|) and the factors
  get rank_ratio of a budget (N/M) / (1 - rank_ratio), as released, so the compression is
  1 - (N/M) / (1 - rank_ratio), not 1 - N/M; results.json records it.
The pruned model holds each linear as sparsebench.lowrank.SparsePlusLowRank (weight = S, the
factors beside it): the masks, the export, the size and eval.speed see both parts.
Where the released code divides by D, a column no calibration token reached (D = 0) would be
NaN; here its entries are zero instead (counted in the report as `zero_input_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsebenchError
from ..lowrank import factors_of, replace
from ..plan import Terms
from ..registry import METHODS, option
from .base import Pruner
from .wanda import Wanda


def oats_rank(rank_ratio: float, dense_alloc: float, rows: int, cols: int) -> int:
    """The released target rank, in its order of operations."""
    return int(rank_ratio * dense_alloc * (rows * cols) / (rows + cols))


def altern_ls(
    weight: torch.Tensor,
    norms_sq: torch.Tensor,
    num_iters: int,
    rank: int,
    sparse_share: float,
    nm: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, S, keep) with weight ~ S + U V, as the released `altern_ls` computes them:
    U = U_r Sigma_r, V = V_r / D, S = (sparse part) / D, D = sqrt(norms_sq); float32.
    `sparse_share`: the zeros of each row of S (unstructured); `nm`: (N, M) keeps N of M."""
    w = weight.float()
    d = torch.sqrt(norms_sq.float().reshape(1, -1))
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))  # released: 1 / d (NaN where d = 0)
    scaled = w * d
    sparse = torch.zeros_like(scaled)
    rows, cols = scaled.shape
    for _ in range(num_iters):
        u, sig, vh = torch.linalg.svd(scaled - sparse, full_matrices=False)
        sig[rank:] = 0
        low = u @ torch.diag(sig) @ vh
        sparse = scaled - low
        pruned = torch.zeros_like(sparse, dtype=torch.bool)
        if nm is not None:
            n, m = nm
            groups = sparse.abs().reshape(rows, cols // m, m)
            low_idx = torch.topk(groups, m - n, dim=-1, largest=False)[1]
            pruned.view(rows, cols // m, m).scatter_(-1, low_idx, True)
        else:
            order = torch.sort(torch.abs(sparse), dim=-1, stable=True)[1]
            pruned.scatter_(1, order[:, : int(cols * sparse_share)], True)
        sparse[pruned] = 0
    factor_v = vh[:rank, :] * inv
    factor_u = u[:, :rank] @ torch.diag(sig)[:rank, :rank]
    return factor_u, factor_v, sparse * inv, ~pruned


@METHODS.register("oats")
@dataclass
class OATS(Wanda):
    group = "row"
    scored = False  # no closed-form score of the dense weight: its masks come from the search
    lowrank = True  # each linear gains factors beside its sparse weight (lowrank.py)
    num_iters: int = option(80, ge=1)
    rank_ratio: float = option(0.25, ge=0, lt=1)

    refinable = Pruner.refinable  # S and the factors are found together: no mask refinement

    def plan_terms(self, device):
        # Wanda's norms; one linear's SVD work in float32 (the scaled weight, S, L, U, V^T, the
        # sort's values and indices); the factors the model gains: at most rank_ratio of each
        # pruned linear's weights (r (out + in) <= rank_ratio x (1 - s) x out x in)
        return Terms("oneshot", stats="norms", svd_copies=8, grows=self.rank_ratio)

    def mask_target(self, sparsity: float, pattern=None) -> float:
        """What S's mask prunes for a linear whose target compression is `sparsity`."""
        if pattern is not None and pattern.is_nm:
            return sparsity
        return 1.0 - (1.0 - self.rank_ratio) * (1.0 - sparsity)

    @torch.no_grad()
    def prune_block(self, block, inps, args, kwargs, sparsity, pattern, batch=1, scratch=None):
        if pattern.is_nm:  # released: S is N:M and the factors get a share of (N/M) / (1 - rho)
            self._dense_alloc = (pattern.n / pattern.m) / (1.0 - self.rank_ratio)
            share = sparsity
        else:
            self._dense_alloc = 1 - sparsity
            share = 1.0 - (1.0 - self.rank_ratio) * self._dense_alloc
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        masks = super().prune_block(block, inps, args, kwargs, share, pattern, batch, scratch)
        for name in masks:  # every linear with factors becomes S + U V in the block
            linear = block.get_submodule(name)
            if id(linear) in self._factors:
                u, v = self._factors.pop(id(linear))
                replace(block, name, u, v)
                self.ranks.append(int(v.shape[0]))
        return masks

    def prune_linear(self, linear, stats, sparsity, pattern):
        rows, cols = linear.weight.shape
        if pattern.is_nm and cols % pattern.m:
            raise SparsebenchError(
                f"oats: a linear with {cols} input columns has no {pattern} groups"
            )
        rank = oats_rank(self.rank_ratio, self._dense_alloc, rows, cols)
        norms = stats.value
        self.zero_columns += int((norms == 0).sum())
        u, v, s, keep = altern_ls(
            linear.weight.detach(),
            norms,
            self.num_iters,
            rank,
            sparsity,
            (pattern.n, pattern.m) if pattern.is_nm else None,
        )
        linear.weight.data.copy_(s.to(linear.weight.dtype))
        self._factors[id(linear)] = (u, v)
        return keep

    def prune(self, ctx):
        self.ranks: list[int] = []
        self.zero_columns = 0
        masks = super().prune(ctx)
        # The walk kept V in the SVD's column-major layout, as the released code does (the
        # propagated inputs then round as the released ones); stored and reloaded factors are
        # row-major, so the pruned model gets that layout now: the run evaluates what a reload
        # evaluates, bit for bit.
        for module in factors_of(ctx.model).values():
            for p in (module.lowrank_u, module.lowrank_v):
                p.data = p.data.contiguous()
        return masks

    def report(self):
        ranks = getattr(self, "ranks", [])
        out = {
            "lowrank": {
                "rank_ratio": self.rank_ratio,
                "num_iters": self.num_iters,
                "linears": len(ranks),
                "rank_min": min(ranks, default=0),
                "rank_max": max(ranks, default=0),
                "zero_input_columns": getattr(self, "zero_columns", 0),
            }
        }
        return {**super().report(), **out}
