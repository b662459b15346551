"""Structured compression: edits that change the model's shape (ARCHITECTURE: the cut).

A structured method removes whole parts (decoder blocks today) and leaves a smaller model of
the same family: the blocks are gone from the ModuleList, the config says the new depth and
its per-layer lists follow, so everything after the cut (evaluation, speed, size, save, a
plain `from_pretrained`) runs on the smaller model unchanged. Nothing is padded back.

What a run's `sparsity` means for a structured method: the share of the decoder blocks'
weights removed. `blocks_for_share` turns it into a count of blocks (rounded to the nearest;
the actual share is recorded beside the target) and refuses a share that removes no block or
every block.

The scores are pure functions of a block's input and output hidden states (`block_io` walks
the calibration windows through the blocks with the one driver, engine/driver.py), so a
method file holds only its rule: ShortGPT's Block Influence (pruners/shortgpt.py), the
angular distance of Gromov et al. (pruners/angular.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..engine.driver import Sequential, Windows, block_out
from ..errors import SparsebenchError
from ..models import find_blocks


def blocks_for_share(share: float, n_blocks: int) -> int:
    """How many of `n_blocks` decoder blocks a share of the blocks' weights removes (nearest,
    halves up); refused when that is none or all of them."""
    n = math.floor(share * n_blocks + 0.5)
    if n < 1:
        raise SparsebenchError(
            f"sparsity={share} removes no decoder block of {n_blocks} (one block is "
            f"{1 / n_blocks:.4f} of the blocks' weights): use sparsity >= {0.5 / n_blocks:.4f}"
        )
    if n >= n_blocks:
        raise SparsebenchError(
            f"sparsity={share} removes all {n_blocks} decoder blocks: use sparsity < "
            f"{(n_blocks - 0.5) / n_blocks:.4f}"
        )
    return n


@torch.no_grad()
def block_io(
    model: nn.Module,
    calib: torch.Tensor,
    device: torch.device,
    visit: Callable[[int, torch.Tensor, torch.Tensor], None],
    inputs: str = "device",
    batch: int = 1,
) -> None:
    """visit(block index, input, output) for every block and batch of calibration windows:
    each block's hidden states in (n x seqlen x hidden) and out, from the dense blocks."""
    driver = Sequential(model, calib, device, inputs, batch, desc="block scores")
    for step in driver:
        for j, window in zip(
            range(0, step.inputs.shape[0], batch), Windows(step.inputs, device, batch)
        ):
            out = block_out(step.block(window, *step.args, **step.kwargs))
            visit(step.index, window.float(), out.float())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the hidden dimension, per token (float64 accumulators)."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def remove_blocks(model: nn.Module, removed: list[int]) -> dict[str, int]:
    """Delete decoder blocks `removed` in place and make the config say the new depth: the
    per-layer lists (layer_types), the layer indices the attention modules keep for the
    cache, Qwen-MoE's dense-MLP layers and Qwen2's sliding-window boundary. Returns
    {old index: new index} of the kept blocks."""
    path, blocks = find_blocks(model)
    n = len(blocks)
    drop = set(removed)
    if not drop or not drop <= set(range(n)) or len(drop) >= n:
        raise SparsebenchError(f"cannot remove blocks {sorted(drop)} of {n}")
    kept = [i for i in range(n) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    config = model.config
    sparse_moe = _moe_layers(config, n)
    for old, new in new_index.items():  # the cache is indexed by each attention's layer_idx
        for module in blocks[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    for i in sorted(drop, reverse=True):  # in place: the model's own ModuleList object
        del blocks[i]
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n and key != "mlp_only_layers":
            setattr(config, key, [value[i] for i in kept])
    if sparse_moe is not None:  # which kept layers have a dense MLP, as an explicit list
        config.mlp_only_layers = [new for old, new in new_index.items() if not sparse_moe[old]]
        config.decoder_sparse_step = 1
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for old in kept if old < config.max_window_layers)
    config.num_hidden_layers = len(kept)
    return new_index


def _moe_layers(config, n: int) -> list[bool] | None:
    """Qwen-MoE: which layers route to experts (the rest have a dense MLP), before the cut."""
    if not hasattr(config, "mlp_only_layers") or not hasattr(config, "decoder_sparse_step"):
        return None
    step, only = config.decoder_sparse_step, set(config.mlp_only_layers or [])
    experts = getattr(config, "num_experts", 0) or 0
    return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(n)]


def cuts_of(model: nn.Module, block: nn.Module) -> list[str]:
    """The structured cuts this family takes (cut/): blocks always; widths where the block
    has separate q/k/v/o projections and a dense MLP; experts in a mixture of experts."""
    from .experts import moe_layers
    from .widths import parts_of

    cuts = ["blocks (shortgpt, angular)"]
    try:
        parts_of(block, model.config)
        cuts.append("widths (flap)")
    except SparsebenchError:
        pass
    if moe_layers(block):
        cuts.append("experts (reap, expert_frequency)")
    return cuts
