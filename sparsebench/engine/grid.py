"""The b-bit grid every quantizer rounds to (quant/, and SparseGPT's joint sweep): the released
GPTQ `Quantizer` with perchannel=True and no MSE search, one grid per output row and group of
input columns. Its range always contains 0, so 0 rounds to exactly 0 on every grid."""

from __future__ import annotations

import torch


def grid_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (rows, 1), of the grid for each row of x (rows, cols), as the
    released `Quantizer.find_params(x, weight=True)` with perchannel=True and mse=False."""
    maxq = 2**bits - 1
    x = x.float()
    tmp = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid, 0 exact
    xmin[flat] = -1
    xmax[flat] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes in [0, 2^b - 1] (float) of x on the grid (scale, zero)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to the grid and dequantized: scale x (code - zero), the released `quantize`."""
    return scale * (codes(x, scale, zero, bits) - zero)


def groups_of(columns: int, group_size: int) -> list[tuple[int, int]]:
    """The column spans that share a grid: [(0, g), (g, 2g), ...]; one span for -1."""
    if group_size == -1:
        return [(0, columns)]
    return [(c, min(c + group_size, columns)) for c in range(0, columns, group_size)]
