"""EvoPress's level database (sparsebench/evopress.py runs the search): every pruned linear
at the released grid of levels, pruned by the run's one-shot method from the dense model's
inputs (as the released `prune.py` walks: the block's dense outputs go on), stored as bitmask +
kept values, one file per linear, under a key of what made it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .engine.driver import Sequential, collect_statistics
from .formats import pack, unpack
from .masks import apply_mask
from .sparsity import Pattern, project

# ----------------------------------------------------------------------------- the level grid


def weights_diff(spec, sparsity: float, hidden: int) -> int:
    """Weights one level moves (the released default when `spec.weights_diff` is unset)."""
    if spec.weights_diff:
        return int(spec.weights_diff)
    return int(0.5 * min(sparsity, 1 - sparsity) / spec.num_levels * hidden**2)


def levels_of(numel: int, sparsity: float, diff: int, num_levels: int) -> dict[int, float]:
    """{level: sparsity} of a linear with `numel` weights, as released (a level that would prune
    every weight is left out)."""
    step = diff / numel
    low = min(int(sparsity // step), num_levels)
    high = min(int((1 - sparsity) // step), num_levels)
    out = {lv: sparsity + lv * diff / numel for lv in range(-low, high + 1)}
    return {lv: s for lv, s in out.items() if s < 1.0}


# ----------------------------------------------------------------------------- the database


class Database:
    """The levels of every pruned linear on disk: <folder>/<linear>.safetensors holds each
    level's kept values and bits (formats.pack); index.json the grid."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.levels: dict[str, dict[int, float]] = {
            n: {int(k): v for k, v in lv.items()} for n, lv in index["levels"].items()
        }
        self.shapes = {n: tuple(s) for n, s in index["shapes"].items()}
        self.meta = index["meta"]
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.levels)  # the released order: its folders, sorted

    def _raw(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if name not in self._cache:  # a few MB a linear: kept once read
            self._cache[name] = load_file(str(self.folder / f"{_file(name)}.safetensors"))
        return self._cache[name]

    def weight(self, name: str, level: int) -> torch.Tensor:
        raw = self._raw(name)
        return unpack(raw[f"{level}.__values"], raw[f"{level}.__bits"], self.shapes[name])

    def keep(self, name: str, level: int) -> torch.Tensor:
        """The level's keep mask (its bits; a kept weight that rounds to 0 stays kept)."""
        n = int(np.prod(self.shapes[name]))
        bits = np.unpackbits(self._raw(name)[f"{level}.__bits"].numpy(), count=n).astype(bool)
        return torch.from_numpy(bits).reshape(self.shapes[name])

    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())


def _file(name: str) -> str:
    return name.replace("/", "_")


def database_key(model_id: str, method: dict, calib: torch.Tensor, sparsity, diff, num_levels):
    h = hashlib.sha256()
    h.update(json.dumps([model_id, method, sparsity, diff, num_levels], sort_keys=True).encode())
    h.update(calib.numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def build_database(
    folder: Path,
    pruner,
    model: nn.Module,
    calib: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    diff: int,
    num_levels: int,
    device: torch.device,
    meta: dict[str, Any],
) -> Database:
    """Every pruned linear at every level by `pruner` (a one-shot method's block walk), from
    the dense model's inputs; written to a private folder, then put in place."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    levels, shapes = {}, {}
    driver = Sequential(model, calib, device, desc="evopress database")
    for step in driver:
        linears, groups, stats, _, unused = collect_statistics(
            step.block, step.inputs, step.args, step.kwargs, pruner.new_stats, pruner.add_batch,
            who="evopress",
        )  # fmt: skip
        work = [(pruner.prepare(stats.pop(leader)), names) for leader, names in groups.items()]
        work += [(None, [n]) for n in unused]  # an expert no token reached: magnitude, as the walk
        for prepared, names in work:
            for name in names:
                linear = linears[name]
                dense = linear.weight.detach().clone()
                full = f"{driver.path}.{step.index}.{name}"
                grid = levels_of(dense.numel(), sparsity, diff, num_levels)
                state = {}
                for level, s in grid.items():
                    linear.weight.data.copy_(dense)
                    if prepared is None:
                        keep = project(dense.abs(), s, pattern, pruner.masks_group)
                    else:
                        keep = pruner.prune_group([linear], prepared, s, pattern)[0]
                    apply_mask(linear, keep)
                    values, bits = pack(linear.weight.detach().cpu(), keep.cpu())
                    state[f"{level}.__values"], state[f"{level}.__bits"] = values, bits
                linear.weight.data.copy_(dense)  # the dense block goes on: its outputs propagate
                save_file(state, str(tmp / f"{_file(full)}.safetensors"))
                levels[full], shapes[full] = grid, list(dense.shape)
    index = {"levels": levels, "shapes": shapes, "meta": meta}
    (tmp / "index.json").write_text(json.dumps(index))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return Database(folder)


def masks_of_levels(
    model: nn.Module, db: Database, levels: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Put the database's weights at `levels` into the model; their keep masks (CPU)."""
    masks = {}
    for name, level in levels.items():
        layer = model.get_submodule(name)
        weight = db.weight(name, level)
        layer.weight.data = weight.to(layer.weight.device, layer.weight.dtype)
        masks[name] = db.keep(name, level)
    return masks
