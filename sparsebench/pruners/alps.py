"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024): layer-wise ADMM on the reconstruction
objective with an adaptive penalty, then preconditioned-CG refinement of the kept weights.
Defaults of the released code (mazumder-lab/ALPS, alps.py `ALPS_admm`, called with rho=0.1).

Per distinct input: H = X^T X damped by 0.01 * mean(diag), normalised by its diagonal
(n_j = sqrt(H_jj) + 1e-8), eigendecomposed once (float64) so (H + rho I)^-1 costs one
product for any rho. Per linear, in the normalised space (B = W * n, Y = B_dense H; the released
code holds B^T):
  D = Proj(B); V = 0
  repeat (at most 300):  B = (Y - V + rho D) (H + rho I)^-1;  D = Proj(B + V / rho);
                         V += rho (B - D)
    every 3 iterations, from the support change c (entries that flipped, over the kept count k):
      c/k > 0.1: rho *= 1.3;  c/k > 0.005: rho *= 1.2;  (both mark rho as started)
      else c > 0: rho *= 1.1 if started, else rho /= 5 and restart from the dense B;
      else (no change): stop if started, else rho /= 5.   rho <= 1e6.
      After 30 iterations, stop once c/k < 0.0003.
  B = Proj(B); then 10 CG iterations on B H = Y restricted to B's support.
Proj keeps the largest |B| over the whole layer (group "tensor": int(numel * s) pruned; the
released code keeps round((1 - s) numel), at most one weight apart) or per N:M group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..registry import METHODS, option
from ..sparsity import project
from .layerwise import GramPruner


def masked_cg(
    A: torch.Tensor,
    rhs: torch.Tensor,
    support: torch.Tensor,
    X: torch.Tensor,
    iters: int,
    rtol: float,
) -> torch.Tensor:
    """Conjugate gradients for X A = rhs (A symmetric), one system per row of X (an output
    row of the weight), with X's entries off `support` held at zero (the residual is masked,
    so every update stays on the support). Stops when every column of X A - rhs is within
    rtol of rhs's column norm, the released code's test in its transposed layout."""
    support = support.to(X.dtype)
    R = (rhs - X @ A) * support
    P = R
    rz = (R * R).sum(1)
    stop = rtol * rhs.norm(dim=0)
    for _ in range(iters):
        AP = P @ A
        den = (P * AP).sum(1)
        den[den == 0] = 1e-8
        alpha = (rz / den).unsqueeze(1)
        X = X + alpha * P
        R = (R - alpha * AP) * support
        if bool(((X @ A - rhs).norm(dim=0) <= stop).all()):
            break
        rz_new = (R * R).sum(1)
        rz[rz == 0] = 1e-8
        P = R + (rz_new / rz).unsqueeze(1) * P
        rz = rz_new
    return X


@METHODS.register("alps")
@dataclass
class ALPS(GramPruner):
    rho: float = option(0.1, gt=0)  # initial penalty (the released driver passes 0.1)
    max_iter: int = option(300, ge=1)
    update_iter: int = option(3, ge=1)  # rho and the support check every this many iterations
    switch_iter: int = option(30, ge=0)  # after this many, stop once the support settles
    percdamp: float = option(0.01, ge=0)  # ridge on H, x its mean diagonal
    cg_iters: int = option(10, ge=0)  # CG refinement of the kept weights
    cg_rtol: float = option(1e-4, gt=0)

    group = "tensor"
    statistic = "gram_eig"  # the Gram matrices, an eigendecomposition's copies (plan.py)

    def __post_init__(self):
        self._iters: list[int] = []

    def prepare(self, stats):
        # the released code damps H first, then normalises (so its diagonal is exactly 1)
        H = stats.value.clone()
        H.diagonal().add_(self.percdamp * torch.diag(H).mean())
        norm = torch.diag(H).sqrt() + 1e-8
        Hn = H / norm / norm.unsqueeze(1)
        L, Q = torch.linalg.eigh(Hn.double())
        return Hn, L, Q, norm

    @staticmethod
    def _inverse(L: torch.Tensor, Q: torch.Tensor, rho: float) -> torch.Tensor:
        return ((Q * (1 / (L + rho))) @ Q.T).float()

    def _project(self, B: torch.Tensor, sparsity, pattern) -> tuple[torch.Tensor, torch.Tensor]:
        """(B with its pruned entries zeroed, keep mask)."""
        keep = project(B.abs(), sparsity, pattern, self.group)
        return B * keep, keep

    @torch.no_grad()
    def prune_linear(self, linear, prepared, sparsity, pattern):
        # The released code holds B = (W n)^T as (cols, rows); this is its transpose, the
        # weight's layout (H and its inverses are symmetric), so masks need no transposes.
        Hn, L, Q, norm = prepared
        B0 = linear.weight.data.float() * norm
        Y = B0 @ Hn
        rho = self.rho
        inv = self._inverse(L, Q, rho)
        D, keep = self._project(B0, sparsity, pattern)
        D0, keep_prev = D.clone(), keep
        kept = int(keep.sum())
        V = torch.zeros_like(B0)
        started = False
        it = 0
        for it in range(self.max_iter):
            B = (Y - V + rho * D) @ inv
            D, keep = self._project(B + V / rho, sparsity, pattern)
            V += rho * (B - D)
            if (it + 1) % self.update_iter:
                continue
            change = int((keep != keep_prev).sum())
            if change / kept > 0.1:
                started, rho = True, rho * 1.3
            elif change / kept > 0.005:
                started, rho = True, rho * 1.2
            elif change > 0:
                if started:
                    rho *= 1.1
                else:  # the support still moves at a small rho: restart with a smaller one
                    rho /= 5
                    D, V = D0.clone(), torch.zeros_like(B0)
            elif started:
                break
            else:
                rho /= 5
            keep_prev = keep
            rho = min(rho, 1e6)
            inv = self._inverse(L, Q, rho)
            if it >= self.switch_iter and change / kept < 0.0003:
                break
        self._iters.append(it + 1)
        B, keep = self._project(B, sparsity, pattern)
        if self.cg_iters:
            B = masked_cg(Hn, Y, keep, B, self.cg_iters, self.cg_rtol)
        linear.weight.data.copy_((B / norm).to(linear.weight.dtype))
        return keep

    def report(self) -> dict[str, Any]:
        if not self._iters:
            return super().report()
        return {
            **super().report(),
            "admm_iters_mean": sum(self._iters) / len(self._iters),
            "admm_iters_max": max(self._iters),
            "linears": len(self._iters),
        }
