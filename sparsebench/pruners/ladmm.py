"""L-ADMM (Boza 2024, "Fast and effective weight update for pruned LLMs"): layer-wise ADMM
on the reconstruction objective ||X W^T - X W_dense^T||^2 with the mask re-selected in the
first iterations. Defaults of the released code (fmfi-compbio/admm-pruning, lib/admm.py).

Per distinct input (the shared layer-wise driver; q/k/v and gate/up share it):
  H = X^T X, normalised by its diagonal (n_j = sqrt(H_jj) + 1e-8): every input column has
  unit norm, so |W_ij| * n_j, the magnitude in the normalised space, is the Wanda score;
  damped by percdamp * mean(diag); (H + rho I)^-1 once.
Per linear, in the normalised space (W <- (W * n)^T):
  for 20 iterations: in the first 15, mask = the highest |W + U| over the whole layer
  (group "tensor"; optionally the paper's gradual cubic schedule up to the target);
  Z = (W + U) * mask;  U += W - Z;  W = (H + rho I)^-1 (H W_dense + rho (Z - U)).
  The result is Z / n, which keeps the mask exactly.
N:M (the released code has 2:4, always gradual): keep the N:M mask of |W + U| and prune,
beyond it, the lowest of the rest on the cubic schedule up to 0.5, where exactly the N:M
complement is pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SparsebenchError
from ..registry import METHODS, option
from ..sparsity import Pattern, nm_keep, project
from .layerwise import GramPruner


def normalized_gram(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H / (n n^T) with damp * mean(diag) added to its diagonal, n) for n = sqrt(diag H) + 1e-8."""
    norm = torch.diag(H).sqrt() + 1e-8
    Hn = H / norm / norm.unsqueeze(1)
    Hn.diagonal().add_(damp * torch.diag(Hn).mean())
    return Hn, norm


@METHODS.register("ladmm")
@dataclass
class LADMM(GramPruner):
    iters: int = option(20, ge=1)  # ADMM iterations per linear
    reselect: int = option(
        15, ge=1
    )  # the mask is re-chosen from |W + U| in the first `reselect` iterations
    percdamp: float = option(0.1, ge=0)  # dampening of the normalised H, x its mean diagonal
    rho: float = option(1.0, gt=0)  # ADMM penalty in the normalised space
    gradual: bool = (
        False  # unstructured: the paper's cubic schedule to the target over `reselect` iterations
    )

    group = "tensor"  # the mask competes over the whole layer
    statistic = "gram_inv"  # the Gram matrices, an inverse's copies (plan.py)

    def __post_init__(self):
        if self.reselect > self.iters:
            raise SparsebenchError(
                f"ladmm reselect ({self.reselect}) must be <= iters ({self.iters}): the last mask "
                f"must be chosen at the target"
            )

    def prepare(self, stats):
        Hn, norm = normalized_gram(stats.value, self.percdamp)
        inv = torch.linalg.inv(
            Hn + self.rho * torch.eye(Hn.shape[0], device=Hn.device, dtype=Hn.dtype)
        )
        return Hn, inv, norm

    def _mask(self, x: torch.Tensor, it: int, sparsity: float, pattern: Pattern) -> torch.Tensor:
        """Keep mask of x (weight layout) at iteration `it`."""
        score = x.abs()
        if not pattern.is_nm and not self.gradual:
            return project(score, sparsity, pattern, self.group)
        target = 0.5 if pattern.is_nm else sparsity
        now = target - target * (1 - (it + 1) / self.reselect) ** 3
        if pattern.is_nm:  # the N:M survivors are never pruned; the rest go on the schedule
            score = score.masked_fill(nm_keep(score, pattern.n, pattern.m), float("inf"))
        return project(score, now, Pattern(), "tensor")

    @torch.no_grad()
    def prune_linear(self, linear, prepared, sparsity, pattern):
        Hn, inv, norm = prepared
        W = linear.weight.data.float() * norm  # the normalised space, weight layout (rows, cols)
        HW = W @ Hn  # (H W_dense^T)^T: H is symmetric
        U = torch.zeros_like(W)
        keep = None
        for it in range(self.iters):
            if keep is None or it < self.reselect:
                keep = self._mask(W + U, it, sparsity, pattern)
            Z = (W + U) * keep
            U += W - Z
            W = (HW + self.rho * (Z - U)) @ inv  # inv is symmetric
        Z = (W + U) * keep
        linear.weight.data.copy_((Z / norm).to(linear.weight.dtype))
        return keep
