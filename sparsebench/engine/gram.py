"""The input statistics of the one-shot methods and of GPTQ, as the official code keeps them:
running means over the calibration windows (Wanda's ||X_j||^2, the Gram matrix
H = 2 X^T X / n of SparseGPT, ALPS, L-ADMM and GPTQ), and the upper Cholesky factor of the
damped H^-1 that SparseGPT's and GPTQ's column sweeps use."""

from __future__ import annotations

import logging
import math

import torch

from ..errors import SparsebenchError

log = logging.getLogger(__name__)


class RunningMean:
    """A statistic averaged over forward calls, weighted by their batch size.

    This is how the official Wanda and SparseGPT code keep ||X_j||^2 and H: after n
    calibration windows the value is sum(fn(X_window)) / n.
    """

    def __init__(self, value: torch.Tensor):
        self.value = value
        self.nsamples = 0

    def add(self, x: torch.Tensor, fn) -> None:
        """value += fn(x) / n after rescaling, x flattened to (tokens, columns)."""
        self.add_term(x, lambda x2, n: fn(x2) / n)

    def add_term(self, x: torch.Tensor, term) -> None:
        """value += term(x, n), n the new sample count: for statistics that fold 1/n in
        themselves (SparseGPT scales X by sqrt(2/n) before the product)."""
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.value *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.value += term(x, self.nsamples)


def scaled_gram(x: torch.Tensor, n: int) -> torch.Tensor:
    y = math.sqrt(2.0 / n) * x.t()  # (columns, tokens), the layout the official code holds
    return y @ y.t()


def inverse_factor(
    H: torch.Tensor, percdamp: float, retries: int, who: str, knob: str = "method.percdamp"
) -> torch.Tensor:
    """The upper Cholesky factor of (H + percdamp x mean(diag H) I)^-1, as the released
    SparseGPT and GPTQ code compute it; a failed factorization retries with 10x the damping
    (`retries` times) instead of stopping. H's dead inputs are the caller's to fix first."""
    mean_diag = torch.mean(torch.diag(H))
    damp = percdamp
    for attempt in range(retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                if attempt:
                    log.warning("%s: Cholesky succeeded with percdamp=%g", who, damp)
                return U
        damp *= 10
    raise SparsebenchError(
        f"{who}: Hessian not positive definite even with percdamp={damp / 10:g}; "
        f"raise {knob} or use more calibration samples"
    )
