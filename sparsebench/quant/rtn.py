"""Round to nearest (RTN): each group of each pruned linear's row rounded to its own grid from
the weight as it is, with no data and no error compensation (the released GPTQ code's
`--nearest` baseline: per row, asymmetric; `group_size` and `sym` as for GPTQ)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import prunable_linears
from ..registry import option
from . import BITS, QUANTIZERS, QuantContext, Quantization, grid_params, groups_of, quantize


def rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """W (rows, cols) rounded to nearest per row and group (float32); a zero stays zero."""
    W = W.float()
    Q = torch.empty_like(W)
    for c1, c2 in groups_of(W.shape[1], group_size):
        scale, zero = grid_params(W[:, c1:c2], bits, sym)
        Q[:, c1:c2] = quantize(W[:, c1:c2], scale, zero, bits)
    return Q


@QUANTIZERS.register("rtn")
@dataclass
class RTN(Quantization):
    bits: int = option(4, choices=BITS)

    @torch.no_grad()
    def run(self, ctx: QuantContext) -> None:
        linears = prunable_linears(ctx.model)
        for lin in linears.values():
            w = lin.weight
            lin.weight.data.copy_(
                rtn(w.data.to(ctx.device), self.bits, self.group_size, self.sym).to(w.dtype)
            )
        self._report = {"linears": len(linears)}
