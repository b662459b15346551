"""Export a pruned model (safetensors via save_pretrained) with its masks and metadata.

The folder loads back with `model=local model.path=<folder>`; with `method=dense`
that is the eval-only mode, and the masks saved beside the weights are verified
again (hard zeros outside them) and their sparsity reported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MASKS_FILE = "sparsebench_masks.safetensors"
META_FILE = "sparsebench.json"


def save_pruned(model, tokenizer, masks: dict[str, torch.Tensor], folder: Path, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if masks:
        save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp / MASKS_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def load_masks(folder: str | Path) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / MASKS_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(path)).items()}


def load_meta(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None
