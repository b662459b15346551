"""Perplexity over non-overlapping seqlen windows (the protocol of every paper of
docs/methods.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import EVAL_SETS
from ..errors import SparsebenchError
from ..registry import option


@dataclass
class EvalSpec:
    datasets: tuple[str, ...] = ("wikitext2", "c4")
    batch_size: int = option(1, ge=1)  # windows per forward; the result does not depend on it
    max_windows: int | None = option(
        None, ge=1
    )  # None: every full window (the papers); N: the first N
    zeroshot: Any = field(default_factory=dict)  # ZeroShotSpec fields; no tasks: no zero-shot
    speed: Any = field(
        default_factory=dict
    )  # SpeedSpec fields (evaluation/speed.py); off by default

    def __post_init__(self):
        from ..registry import build_dataclass
        from .zeroshot import ZeroShotSpec

        if isinstance(self.zeroshot, dict):
            self.zeroshot = build_dataclass(ZeroShotSpec, self.zeroshot, "eval.zeroshot")
        if isinstance(self.speed, dict):
            from .speed import SpeedSpec

            self.speed = build_dataclass(SpeedSpec, self.speed, "eval.speed")
        self.datasets = tuple(self.datasets)
        for name in self.datasets:
            if name not in EVAL_SETS:
                raise SparsebenchError(
                    f"unknown eval dataset '{name}'; valid: {', '.join(EVAL_SETS)}"
                )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SparsebenchError(
                f"eval.batch_size must be a positive integer, got {self.batch_size!r}"
            )
        if self.max_windows is not None and (
            not isinstance(self.max_windows, int) or self.max_windows < 1
        ):
            raise SparsebenchError(
                f"eval.max_windows must be null or a positive integer, got {self.max_windows!r}"
            )


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    device: torch.device,
    batch_size: int = 1,
    max_windows: int | None = None,
    desc: str = "ppl",
) -> tuple[float, int]:
    """exp(mean over windows of the mean next-token NLL in each window); remainder dropped.

    The official code scales each window's mean loss by seqlen and divides the sum
    by windows * seqlen, which is the same number. Returns (ppl, windows used).
    """
    windows = ids.shape[1] // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise SparsebenchError(
            f"eval stream has {ids.shape[1]} tokens, fewer than one window of seqlen={seqlen}"
        )
    stream = ids[0, : windows * seqlen].view(windows, seqlen)
    total = 0.0
    for start in tqdm(range(0, windows, batch_size), desc=desc, unit="batch"):
        x = stream[start : start + batch_size].to(device)
        logits = model(
            input_ids=x, use_cache=False
        ).logits.float()  # on the last GPU under a device map
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            x[:, 1:].reshape(-1).to(logits.device),
            reduction="none",
        ).view(x.shape[0], -1)
        total += loss.mean(1).sum().item()
    mean_nll = total / windows
    if not math.isfinite(mean_nll):
        raise SparsebenchError(
            f"{desc}: the loss is {mean_nll} (NaN/inf); the model output is broken, check dtype "
            "and sparsity"
        )
    return math.exp(mean_nll), windows


def place_for_eval(
    model: nn.Module, device: torch.device, placement: dict[str, Any], margin: float
) -> None:
    """Put the model where the plan's evaluation placement says (plan.eval_placement): on
    `device`, or over the visible GPUs (and the host) with accelerate's device map."""
    if device.type != "cuda" or placement["placement"] in ("one GPU", "host"):
        model.to(device)
        return
    from accelerate import dispatch_model

    from ..plan import mem_available_gib

    gpus = [
        torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
    ]
    host = (
        int(mem_available_gib() * 2**30) if placement["placement"].endswith("offloaded)") else None
    )
    max_memory = eval_max_memory(placement, gpus, margin, host)
    dispatch_model(model, device_map=device_map_for(model, max_memory))


def eval_max_memory(
    placement: dict[str, Any], gpus: list[int], margin: float, host: int | None
) -> dict[Any, int]:
    """Bytes the device map may fill on each GPU (less the margin and one batch's forward)
    and, when offloading, on the host."""
    room = {
        i: int((1 - margin) * total - placement["window_gib"] * 2**30)
        for i, total in enumerate(gpus)
    }
    return {**room, "cpu": int((1 - margin) * host)} if host is not None else room


def device_map_for(model: nn.Module, max_memory: dict[Any, int]) -> dict[str, Any]:
    """accelerate's device map within `max_memory` (bytes per GPU index, and "cpu"); a
    decoder block is never split over two devices."""
    from accelerate import infer_auto_device_map

    from ..models import find_blocks

    _, blocks = find_blocks(model)
    return infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=[type(blocks[0]).__name__]
    )
