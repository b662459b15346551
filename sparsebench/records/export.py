"""Export a pruned model (safetensors via save_pretrained) with its masks and metadata.

The masks are stored once: beside dense weights as sparsebench_masks.safetensors (one byte a
weight), or, with save.format=bitmask, as the bitmask file's own bits (formats.py).

The folder loads back with `model=local model.path=<folder>`; with `method=dense`
that is the eval-only mode, and the masks saved beside the weights are verified
again (hard zeros outside them) and their sparsity reported.

sparsebench never deletes what it did not write: an export goes into a new or empty
folder, or replaces an earlier export of the same run (same fingerprint); any other
existing folder is refused before pruning starts (`check_save_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import SparsebenchError
from ..families import masks_from_original, original_masks, original_state_dict
from ..formats import BITMASK_FILE, bitmask_state, load_bitmask_masks, save_quantized
from ..lowrank import LOWRANK_FILE, save_factors
from .labels import label_of

MASKS_FILE = "sparsebench_masks.safetensors"
ORDERS_FILE = "sparsebench_column_orders.safetensors"  # N:M groups of permuted columns (RIA)
META_FILE = "sparsebench.json"


def export_meta(specs, allocation, fingerprint: str, results) -> dict[str, Any]:
    """sparsebench.json of an export: what verifies its masks and re-evaluates it as this run
    did."""
    return {
        "method": specs.pruner.name,
        "sparsity": specs.sparsity,
        "pattern": str(specs.pattern),
        "block_targets": allocation.targets if allocation else None,
        # a searched allocation (EvoPress): each linear's own target
        **(
            {"linear_targets": allocation.linear_targets}
            if allocation is not None and allocation.linear_targets is not None
            else {}
        ),
        # what the masks prune where it differs from the targets (OATS: S beside its factors)
        **_mask_targets(specs, allocation),
        "group": specs.pruner.masks_group,
        "seed": specs.seed,
        "model": specs.model.name,
        # what a reload reports it came from (the report places it beside this run)
        "label": label_of(results.data["config"]),  # the report's: preset, OWL, recovery
        "run": str(results.path.parent),
        "protocol_id": results.data.get("protocol_id"),
        "fingerprint": fingerprint,
        # a structured run's cut (what was removed); its export has no masks to verify
        **(
            {"structure": {k: v for k, v in specs.pruner.report().items() if k != "scores"}}
            if specs.pruner.structured
            else {}
        ),
        "data": {
            "source": specs.data.source,
            "calib_set": specs.data.calib_set,
            "nsamples": specs.data.nsamples,
            "seqlen": specs.model.seqlen,
        },
        # what `model=local model.path=<export> method=dense` needs to evaluate it as this run did
        "dtype": specs.model.dtype,
        "evaluation": {
            "protocol": results.data["config"].get("protocol"),
            "nsamples": specs.data.nsamples,
            "max_windows": specs.eval.max_windows,
            "batch_size": specs.eval.batch_size,
            "datasets": list(specs.eval.datasets),
        },
    }


def _mask_targets(specs, allocation) -> dict[str, Any]:
    rule = lambda s: specs.pruner.mask_target(s, specs.pattern)  # noqa: E731
    if rule(specs.sparsity) == specs.sparsity:
        return {}
    blocks = [rule(t) for t in allocation.targets] if allocation else None
    return {"mask_sparsity": rule(specs.sparsity), "mask_block_targets": blocks}


def check_save_dir(folder: Path, fingerprint: str) -> None:
    """Refuse, now, a save folder that holds anything but an export of this very run."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SparsebenchError(f"save.dir {folder} is a file, not a folder; choose a new folder")
    if not any(folder.iterdir()):
        return
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and meta.get("fingerprint") == fingerprint:
        return
    what = (
        "an export of another run" if isinstance(meta, dict) else "files sparsebench did not write"
    )
    raise SparsebenchError(
        f"save.dir {folder} already holds {what}; sparsebench never deletes it: "
        f"choose a new or empty folder (or leave save.dir unset: <run folder>/model)"
    )


def save_pruned(
    model,
    tokenizer,
    masks: dict[str, torch.Tensor],
    folder: Path,
    meta: dict[str, Any],
    fmt: str = "dense",
    orders: dict[str, torch.Tensor] | None = None,
    quant=None,
) -> Path:
    """Write into a private temporary folder, then put it in place (check_save_dir has
    already said that whatever stands at `folder` may be replaced)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    # in the family's own layout (fused projections, Conv1D, fused experts), which transformers
    # loads; loading it through sparsebench presents the same linears as the masks' names
    state = original_state_dict(model)
    if (
        fmt == "bitmask"
    ):  # kept values + 1-bit masks (sparsebench/formats.py); the config beside them
        tmp.mkdir(parents=True)
        model.config.save_pretrained(tmp)
        grids = _grids_by_key(model, quant, state, masks)  # quantized: b-bit codes, not floats
        save_file(
            bitmask_state(state, original_masks(model, masks), grids), str(tmp / BITMASK_FILE)
        )
        if quant is not None:
            meta["bitmask_values"] = f"{quant.bits}-bit codes" if grids else "floats (fused layout)"
    elif fmt == "quantized":  # compressed-tensors pack-quantized, what transformers and vLLM load
        save_quantized(model, quant, tmp)  # formats.py
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    meta = {**meta, "format": fmt}
    if save_factors(model, tmp):  # S is the stored weight; the factors beside it (lowrank.py)
        meta["lowrank"] = (
            f"{LOWRANK_FILE}: each linear is its stored weight plus U V; loading through "
            "sparsebench (model=local) adds them, a plain transformers load does not"
        )
    tokenizer.save_pretrained(tmp)
    if masks and fmt != "bitmask":  # a bitmask file's bits are the masks: stored once
        save_file(
            {k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp / MASKS_FILE)
        )
    if orders:  # the input-column order each permuted linear's N:M groups were chosen in
        save_file(
            {k: v.to(torch.int64).contiguous() for k, v in orders.items()}, str(tmp / ORDERS_FILE)
        )
        meta["column_orders"] = ORDERS_FILE
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def _grids_by_key(model, quant, state, masks) -> dict[str, tuple]:
    """{state key: (scale, zero, bits, group_size)} of a quantized run's linears stored under
    their own names; {} without quantization or for a family stored fused or transposed (its
    kept values are then stored as floats: the same weights, a larger file)."""
    from ..families import relaid

    if quant is None or not quant.grids or relaid(model):
        return {}
    out = {}
    for name in masks:  # the pruned linears, by their own names
        lin = model.get_submodule(name)
        if lin in quant.grids and f"{name}.weight" in state:
            scale, zero = quant.grids[lin]
            out[f"{name}.weight"] = (scale, zero, quant.bits, quant.group_size)
    return out


def load_saved(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(masks, metadata) of a sparsebench export, None for a folder that is not one.

    The masks come from sparsebench_masks.safetensors (save.format=dense) or from the bits of
    the bitmask file (save.format=bitmask); those are in the family's own layout, and the
    metadata then says `"masks_layout": "original"` (`saved_masks` turns them into the
    loaded model's linears). A folder with metadata but no masks, or a file that cannot be
    read, is an error: an export whose masks cannot be checked must not evaluate as a verified
    pruned model."""
    folder = Path(folder)
    masks_path, meta_path, packed = folder / MASKS_FILE, folder / META_FILE, folder / BITMASK_FILE
    if not masks_path.exists() and not meta_path.exists():
        return None
    if not masks_path.is_file() and meta_path.is_file() and packed.is_file():
        masks_path = packed  # save.format=bitmask: the masks are the file's bits
    if not masks_path.is_file() and meta_path.is_file():
        meta = _read_meta(meta_path)
        if meta.get("structure"):  # a structured export: a smaller dense model, no masks
            return {}, meta
    for path in (masks_path, meta_path):
        if not path.is_file():
            raise SparsebenchError(
                f"{folder} is a sparsebench export without {path.name}; its masks cannot be "
                f"verified: export it again (save.enabled=true)"
            )
    meta = _read_meta(meta_path)
    from safetensors.torch import load_file

    try:
        if masks_path == packed:
            masks = load_bitmask_masks(packed)
            meta["masks_layout"] = "original"
        else:
            masks = {k: v.bool() for k, v in load_file(str(masks_path)).items()}
        if meta.get("column_orders"):
            meta["orders"] = load_file(str(folder / ORDERS_FILE))
    except Exception as err:  # safetensors raises its own error types for cut-off files
        raise SparsebenchError(
            f"{masks_path} is unreadable ({str(err).splitlines()[0][:120]}); export the model again"
        ) from None
    return masks, meta


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not {"sparsity", "pattern", "group"} <= set(meta):
            raise ValueError("it lacks sparsity, pattern or group")
    except (OSError, ValueError) as err:
        raise SparsebenchError(f"{path} is unreadable ({err}); export the model again") from None
    return meta


def saved_masks(model, saved: tuple[dict[str, torch.Tensor], dict[str, Any]]):
    """The export's masks by the loaded model's linear names."""
    masks, meta = saved
    if meta.get("masks_layout") == "original":
        return masks_from_original(model, masks)
    return masks


def saved_orders(saved) -> dict[str, torch.Tensor]:
    """The export's column orders (RIA's channel reallocation), {} when it has none."""
    return saved[1].get("orders") or {}


def folder_bytes(folder: Path) -> dict[str, int]:
    """What an export takes on disk: every file, and the weights' files alone."""
    files = [f for f in Path(folder).rglob("*") if f.is_file()]
    weights = [
        f for f in files if f.suffix == ".safetensors" and f.name not in (MASKS_FILE, ORDERS_FILE)
    ]
    return {
        "folder": sum(f.stat().st_size for f in files),
        "weights": sum(f.stat().st_size for f in weights),
        "masks": sum(f.stat().st_size for f in files if f.name == MASKS_FILE),
    }
