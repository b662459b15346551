"""A linear held as a sparse weight plus a low-rank product (OATS): y = S x + U (V x) + b.

`SparsePlusLowRank` is an nn.Linear whose `weight` is the sparse part S, so everything that
reads a pruned linear's weight sees S: the masks are verified on it (hard zeros outside them),
the export stores it (dense or bitmask), the size counts its kept values, and the sparse
kernels of eval.speed run it. The factors U (out x rank) and V (rank x in) are two more
parameters of the module, never summed into S:
- the export writes them to `sparsebench_lowrank.safetensors` (by sparsebench's linear names)
  and `attach_factors` puts them back when a folder loads through sparsebench (a plain
  transformers load of such an export gets S alone, which is not the pruned model; the
  export's sparsebench.json says so);
- the size counts them as dense parameters, and `compression` turns a run's masks into the
  share of each linear's parameters removed (S's kept values plus the factors' entries).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LOWRANK_FILE = "sparsebench_lowrank.safetensors"


class SparsePlusLowRank(nn.Linear):
    """nn.Linear(in, out) with weight = S (sparse) and two factors: y = S x + U (V x) + b."""

    def __init__(self, linear: nn.Linear, u: torch.Tensor, v: torch.Tensor):
        super().__init__(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",  # the parameters are the linear's own, set below
        )
        self.weight = linear.weight
        self.bias = linear.bias
        w = linear.weight
        if u.shape != (w.shape[0], v.shape[0]) or v.shape[1] != w.shape[1]:
            raise ValueError(f"factors {tuple(u.shape)} x {tuple(v.shape)} for {tuple(w.shape)}")
        self.lowrank_u = nn.Parameter(u.to(w.device, w.dtype), requires_grad=w.requires_grad)
        self.lowrank_v = nn.Parameter(v.to(w.device, w.dtype), requires_grad=w.requires_grad)

    @property
    def rank(self) -> int:
        return self.lowrank_v.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(
            F.linear(x, self.lowrank_v), self.lowrank_u
        )

    def merged(self) -> torch.Tensor:
        """S + U V: the dense weight this linear computes (what a dense runtime would hold)."""
        return self.weight + self.lowrank_u @ self.lowrank_v

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def replace(parent: nn.Module, name: str, u: torch.Tensor, v: torch.Tensor) -> SparsePlusLowRank:
    """Parent's linear `name` (a dotted path inside `parent`) as a SparsePlusLowRank."""
    owner_name, _, attr = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    module = SparsePlusLowRank(getattr(owner, attr), u, v)
    setattr(owner, attr, module)
    return module


def lowrank_params(linear: nn.Module) -> list[nn.Parameter]:
    """The factors of a sparse + low-rank linear ([] for any other linear)."""
    if isinstance(linear, SparsePlusLowRank):
        return [linear.lowrank_u, linear.lowrank_v]
    return []


def factors_of(model: nn.Module) -> dict[str, SparsePlusLowRank]:
    """{module name: module} of every sparse + low-rank linear of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparsePlusLowRank)}


def factor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The factors by sparsebench's linear names (`<name>.lowrank_u`, `<name>.lowrank_v`)."""
    return {
        f"{n}.{k}": getattr(m, k).detach().contiguous()
        for n, m in factors_of(model).items()
        for k in ("lowrank_u", "lowrank_v")
    }


def save_factors(model: nn.Module, folder: Path) -> bool:
    """Write the factors beside an export; False when the model has none."""
    from safetensors.torch import save_file

    state = factor_state(model)
    if state:
        save_file(state, str(Path(folder) / LOWRANK_FILE))
    return bool(state)


def attach_factors(model: nn.Module, folder: Path) -> int:
    """Put an export's factors back (their linears become SparsePlusLowRank); returns how many
    linears got them (0: the folder has none)."""
    from safetensors.torch import load_file

    from .errors import SparsebenchError

    path = Path(folder) / LOWRANK_FILE
    if not path.is_file():
        return 0
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors' own error types for a cut-off file
        raise SparsebenchError(
            f"{path} is unreadable ({str(err).splitlines()[0][:120]}); export the model again"
        ) from None
    names = sorted({k.rpartition(".")[0] for k in state})
    for name in names:
        u, v = state.get(f"{name}.lowrank_u"), state.get(f"{name}.lowrank_v")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if u is None or v is None or not isinstance(linear, nn.Linear):
            raise SparsebenchError(f"{path}: {name} has no linear or lacks a factor in this model")
        replace(model, name, u, v)
    return len(names)


def compression(linears: dict[str, nn.Linear], per_tensor: dict[str, float]) -> dict[str, object]:
    """The share of the pruned linears' parameters removed when each is S (its mask's kept
    weights) plus the factors U, V: 1 - (kept + rank x (out + in)) / (out x in), summed; the
    split between the two parts beside it (results.json sparsity, a sparse + low-rank run)."""
    total = kept = factors = 0
    for name, lin in linears.items():
        n = lin.weight.numel()
        total += n
        kept += round((1.0 - per_tensor[name]) * n)
        if isinstance(lin, SparsePlusLowRank):
            factors += lin.lowrank_u.numel() + lin.lowrank_v.numel()
    removed = total - kept - factors
    return {
        "actual_sparsity": removed / total if total else 0.0,
        "removed_params": removed,  # pruned_params stays the zeros of S (nonzero_params' term)
        "split": {
            "sparse_part_sparsity": 1.0 - kept / total if total else 0.0,
            "sparse_kept_params": kept,
            "lowrank_params": factors,
            "lowrank_share": factors / total if total else 0.0,
            "linears_with_factors": sum(isinstance(m, SparsePlusLowRank) for m in linears.values()),
        },
    }
