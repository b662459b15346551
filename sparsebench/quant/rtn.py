"""Round to nearest (RTN): each group of each pruned linear's row rounded to its own grid from
the weight as it is, with no data and no error compensation (the released GPTQ code's
`--nearest` baseline: per row, asymmetric; `group_size` and `sym` as for GPTQ)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.grid import grid_params, groups_of, quantize
from ..models import prunable_linears
from ..registry import option
from . import BITS, QUANTIZERS, QuantContext, Quantization


def rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """W (rows, cols) rounded to nearest per row and group (float32); a zero stays zero."""
    return rtn_grids(W, bits, group_size, sym)[0]


def rtn_grids(W: torch.Tensor, bits: int, group_size: int, sym: bool):
    """(W rounded to nearest, scales, zero points), the grids (rows, groups) in column order."""
    W = W.float()
    Q = torch.empty_like(W)
    scales, zeros = [], []
    for c1, c2 in groups_of(W.shape[1], group_size):
        scale, zero = grid_params(W[:, c1:c2], bits, sym)
        Q[:, c1:c2] = quantize(W[:, c1:c2], scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return Q, torch.cat(scales, 1), torch.cat(zeros, 1)


@QUANTIZERS.register("rtn")
@dataclass
class RTN(Quantization):
    bits: int = option(4, choices=BITS)

    @torch.no_grad()
    def run(self, ctx: QuantContext) -> None:
        linears = prunable_linears(ctx.model)
        self.grids = {}
        for lin in linears.values():
            Q, scale, zero = rtn_grids(lin.weight.data.to(ctx.device), *self.grid)
            lin.weight.data.copy_(Q.to(lin.weight.dtype))
            self.grids[lin] = (scale.cpu(), zero.cpu())
        self._report = {"linears": len(linears)}
