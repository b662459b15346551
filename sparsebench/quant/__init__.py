"""Quantization after pruning (`quant=<name>`): a stage after pruning (and after recovery when
there is one) that rounds every pruned linear's weight to a b-bit grid. A pruned weight stays
exactly zero through every quantizer, and the pipeline verifies the masks again after it.

  none  no quantization (default)
  rtn   round to nearest on the grid (the released GPTQ code's `--nearest` baseline)
  gptq  GPTQ's column sweep with the calibration Hessian (IST-DASLab/gptq `fasterquant`):
        each column rounded, its error compensated into the columns not yet rounded; with a
        mask, a pruned weight is rounded to 0 and its error compensated into kept weights

The grid is the released `Quantizer` (quant.py: per output row, `perchannel=True`, no MSE
search) over each group of `group_size` input columns (-1: the whole row): asymmetric,
scale = (max(x, 0) - min(x, 0)) / (2^b - 1) and zero = round(-min(x, 0) / scale); symmetric,
the range is +-max|x| and zero = 2^(b-1). Because the range always contains 0, the code of 0
is `zero` exactly and it dequantizes to scale x (zero - zero) = 0: a pruned weight is 0 on
every grid, and a kept weight may round to 0 too (then it is a zero the mask keeps).

The layer holds the dequantized values scale x (q - zero) in its own dtype, and evaluation
runs on them, as the papers evaluate; the integers, scales and zero points are what an export
stores and what the bits per parameter count (`bits_of`).

SparseGPT's joint mode (`method=sparsegpt quant=gptq quant.joint=true`) rounds inside the
pruning sweep instead (pruners/sparsegpt.py); this stage then adds nothing.

Every quantizer is one file registered by name, configured by `conf/quant/<name>.yaml`. It
may import the package's foundations and engine/ (the driver, the statistics, the grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.grid import codes, grid_params, groups_of, quantize  # noqa: F401
from ..errors import SparsebenchError
from ..registry import Registry, option

QUANTIZERS = Registry("quantizer")
BITS = (2, 3, 4, 8)


@dataclass
class QuantContext:
    model: nn.Module
    masks: dict[str, torch.Tensor] | None  # {linear: keep}; None: a dense model (no mask)
    device: torch.device
    calib: torch.Tensor | None = None  # calibration windows, for a quantizer that reads data
    inputs: str = "device"
    calib_batch: int = 1


@dataclass
class Quantization:
    """run(ctx) rounds every pruned linear of ctx.model in place to the grid (the dequantized
    values), keeping every pruned weight at exactly zero; report() says what it did."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # the statistic the stage keeps per block, for the memory plan (plan.Terms.stats)
    stats: ClassVar[str] = "none"
    bits: int = option(4, choices=BITS)  # bits per stored value
    group_size: int = option(-1, ge=-1)  # input columns per grid; -1: one grid per output row
    sym: bool = False  # symmetric grid (the released default is asymmetric)
    joint: bool = False  # gptq with method=sparsegpt: round inside the pruning sweep

    def __post_init__(self):
        self.grids = {}
        if self.bits not in BITS:
            raise SparsebenchError(f"quant.bits={self.bits}: supported {list(BITS)}")
        if self.group_size == 0 or self.group_size < -1:
            raise SparsebenchError(
                f"quant.group_size={self.group_size}: -1 (one grid per output row) or a "
                "positive number of input columns"
            )

    @property
    def grid(self) -> tuple[int, int, bool]:
        return self.bits, self.group_size, self.sym

    # {linear module: (scales, zero points)}, each (rows, groups) in input-column order, float:
    # what an export stores beside the integer codes; a linear whose grids do not follow the
    # column order (GPTQ's act_order without static groups) has none
    grids: ClassVar[dict]  # set per instance (__post_init__)

    def check_widths(self, widths: dict[str, int]) -> None:
        """Refuse a group size that does not divide a pruned linear's input width (a
        linear's name -> its input columns), before any work."""
        if self.group_size == -1:
            return
        bad = sorted({c for c in widths.values() if c % self.group_size})
        if bad:
            raise SparsebenchError(
                f"quant.group_size={self.group_size} does not divide the input width of every "
                f"pruned linear ({', '.join(map(str, bad))} columns); use a divisor or -1"
            )

    def run(self, ctx: QuantContext) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        group = "per row" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.bits}-bit {self.name}, {group}, {'sym' if self.sym else 'asym'}"

    def report(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            **({"joint": True} if self.joint else {}),
            **getattr(self, "_report", {}),
        }


def bits_of(
    linears: dict[str, nn.Linear],
    masks: dict[str, torch.Tensor] | None,
    quant: Quantization | None,
    rest_params: int,
    rest_bits: int,
) -> dict[str, Any]:
    """The bits a stored model needs, counted once here. Per pruned linear: its kept values
    (the mask's ones; every value without masks) at `bits`, or at the weight's own width
    without quantization; the mask, 1 bit per weight when the run has masks; per row and
    group a 16-bit scale and, on an asymmetric grid, a `bits`-bit zero point. `rest_params`
    / `rest_bits`: every other weight (embeddings, head, norms, biases), kept in float. A
    sparse + low-rank linear's factors (OATS) count as its dense values."""
    from ..lowrank import lowrank_params

    total = values = mask = grids = factors = 0
    for name, lin in linears.items():
        factors += sum(p.numel() * p.element_size() * 8 for p in lowrank_params(lin))
        w = lin.weight.detach()
        rows, cols = w.shape
        total += w.numel()
        kept = int(masks[name].sum()) if masks is not None else w.numel()
        if quant is None:
            values += kept * w.element_size() * 8
        else:
            values += kept * quant.bits
            per_row = len(groups_of(cols, quant.group_size))
            grids += rows * per_row * (16 + (0 if quant.sym else quant.bits))
        mask += w.numel() if masks is not None else 0
    linear_bits = values + mask + grids + factors
    whole = linear_bits + rest_bits
    return {
        "pruned_linears_bits": linear_bits,
        "values_bits": values,
        "mask_bits": mask,
        "grid_bits": grids,
        **({"lowrank_bits": factors} if factors else {}),
        "bits_per_pruned_weight": round(linear_bits / total, 4),
        "model_bits": whole,
        "bits_per_model_param": round(whole / (total + rest_params), 4),
    }


def _register_all() -> None:
    """Import every module of this package: a new quantizer file registers itself."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_register_all()
