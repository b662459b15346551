"""Block-wise reconstruction of a fixed mask ("A Free Lunch in LLM Compression", Wagner,
Roux, Zimmer, Pokutta 2025).

Block by block, on the calibration windows:
  inputs   the block's inputs in the pruned model so far (`inputs: pruned`), or the dense
           model's (`inputs: dense`, the released code's default)
  units    granularity=subblock: the block's attention and its MLP, reconstructed one
           after the other (the paper's best: nearly the cheapest, better than full
           retraining); granularity=block: the whole block at once
  targets  the dense unit's output on the same unit inputs
  training MSE, Adam on the unit's linear weights and biases, pruned weights re-masked
           after every step (the mask is frozen), lr decayed linearly to 0
The reconstructed block then produces the next block's inputs.

A unit is a direct child module of the block that holds linears (self_attn and mlp in
Llama, Mistral, Qwen and Gemma blocks); a linear that sits directly in the block (OPT's
fc1, fc2) is a unit of its own.

Released defaults (the paper's code, main.py): 1 epoch over 128 windows, batch 2, lr 1e-5
linear to 0, Adam(W) without weight decay. The dense model is loaded a second time for the
targets (one block of it on the device at a time).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.driver import Sequential, block_out
from ..engine.training import Budget, MaskHook, Trainer, linear_decay
from ..models import find_blocks, find_linears
from ..plan import Terms
from ..registry import option
from . import RECOVERIES, RecoverContext, Recovery

log = logging.getLogger(__name__)


def units_of(block: nn.Module, granularity: str) -> list[str]:
    """Names (relative to the block) of the units reconstructed one after the other."""
    if granularity == "block":
        return [""]
    names = []
    for name, child in block.named_children():
        if isinstance(child, nn.Linear) or any(isinstance(m, nn.Linear) for m in child.modules()):
            names.append(name)
    return names


class UnitInputs:
    """Records what one unit receives during block forwards: its hidden state for every
    window (first positional argument or `hidden_states`) and, once, the rest of its
    arguments (rotary tables, masks: the same for every window of one length)."""

    def __init__(self, unit: nn.Module):
        self.hidden: list[torch.Tensor] = []
        self.rest: tuple[tuple, dict, bool] | None = None
        self.handle = unit.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if args:
            hidden, rest_args, by_name = args[0], args[1:], False
        else:
            hidden, rest_args, by_name = kwargs["hidden_states"], (), True
        self.hidden.append(hidden.detach())
        if self.rest is None:
            rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.rest = (rest_args, rest_kwargs, by_name)

    def close(self) -> torch.Tensor:
        self.handle.remove()
        return torch.cat(self.hidden)

    def call(self, unit: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        rest_args, rest_kwargs, by_name = self.rest
        out = (
            unit(hidden_states=hidden, **rest_kwargs)
            if by_name
            else unit(hidden, *rest_args, **rest_kwargs)
        )
        return block_out(out)


@RECOVERIES.register("reconstruct")
@dataclass
class Reconstruct(Recovery):
    granularity: str = option("subblock", choices=("subblock", "block"))
    inputs: str = option("pruned", choices=("pruned", "dense"))
    epochs: int = option(1, ge=1)
    batch_size: int = option(2, ge=1)
    lr: float = option(1e-5, gt=0, lt=1)
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1)
    eps: float = option(1e-8, gt=0)
    nsamples: int | None = option(None, ge=1)  # calibration windows; None: data.nsamples
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)

    needs_dense = True  # the dense blocks' outputs are the targets

    def plan_terms(self, device):
        # one unit of a block in training at a time, beside the one-shot terms (no ADMM state)
        return Terms("blockwise", batch=self.batch_size)

    @torch.no_grad()
    def _forward(self, block, inps, args, kwargs) -> torch.Tensor:
        out = torch.empty_like(inps)
        for j in range(0, inps.shape[0], self.batch_size):
            out[j : j + self.batch_size] = block_out(
                block(inps[j : j + self.batch_size], *args, **kwargs)
            )
        return out

    def _unit_inputs(self, block, unit, inps, args, kwargs) -> tuple[torch.Tensor, UnitInputs]:
        rec = UnitInputs(unit)
        try:
            self._forward(block, inps, args, kwargs)
        finally:
            hidden = rec.close()
        return hidden, rec

    @torch.no_grad()
    def _mse(self, rec: UnitInputs, unit, hidden, targets) -> float:
        total = 0.0
        for j in range(0, hidden.shape[0], self.batch_size):
            out = rec.call(unit, hidden[j : j + self.batch_size])
            total += float((out.float() - targets[j : j + self.batch_size].float()).pow(2).sum())
        return total / targets.numel()

    def _train_unit(
        self, unit, rec, hidden, targets, masks: dict[str, torch.Tensor], gen, label
    ) -> dict[str, Any]:
        linears = find_linears(unit)
        params = [lin.weight for lin in linears.values()] + [
            lin.bias for lin in linears.values() if lin.bias is not None
        ]
        for p in unit.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        n = hidden.shape[0]
        total = self.epochs * math.ceil(n / self.batch_size)
        opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0)
        hook = MaskHook((lin.weight, masks[name]) for name, lin in linears.items())
        trainer = Trainer(
            params, opt, linear_decay(total), hooks=[hook], name=f"recover=reconstruct {label}"
        )
        before = self._mse(rec, unit, hidden, targets)
        for _epoch in range(self.epochs):
            order = torch.randperm(n, generator=gen)
            for j in range(0, n, self.batch_size):
                idx = order[j : j + self.batch_size].to(hidden.device)
                x, y = hidden[idx], targets[idx]
                trainer.step(
                    [lambda: (rec.call(unit, x).float() - y.float()).pow(2).mean()],
                    tokens=len(idx) * hidden.shape[1],
                )
        for p in unit.parameters():
            p.requires_grad_(True)
        after = self._mse(rec, unit, hidden, targets)
        self._budget = self.budget().add(trainer.budget())
        return {
            "unit": label,
            "error_before": before,
            "error_after": after,
            "steps": trainer.steps_done,
        }

    def run(self, ctx: RecoverContext) -> None:
        from ..data import calibration_windows

        calib = calibration_windows(
            ctx.data, ctx.tokenizer, ctx.seqlen, ctx.model.config.vocab_size, self.nsamples
        )
        self._budget = Budget(calib_tokens=int(calib.numel()))
        dense = ctx.load_dense()
        _, dense_blocks = find_blocks(dense)
        # blocks, inputs, rotary tables and additive masks in float32: the units train in it; the
        # driver runs each reconstructed block for the next one's inputs
        driver = Sequential(
            ctx.model,
            calib,
            ctx.device,
            batch=self.batch_size,
            dtype=torch.float32,
            desc="recover reconstruct",
        )
        dense_inps = None
        gen = torch.Generator().manual_seed(self.seed)
        units_report = []
        for step in driver:
            i, block, args, kwargs = step.index, step.block, step.args, step.kwargs
            if self.inputs == "dense" and dense_inps is None:
                dense_inps = step.inputs.clone()  # block 0's inputs are the dense model's too
            dblock = dense_blocks[i].to(ctx.device, torch.float32)
            x = dense_inps if dense_inps is not None else step.inputs
            prefix = f"{driver.path}.{i}."
            block_masks = {
                n.removeprefix(prefix): m for n, m in ctx.masks.items() if n.startswith(prefix)
            }
            for uname in units_of(block, self.granularity):
                unit = block.get_submodule(uname) if uname else block
                dunit = dblock.get_submodule(uname) if uname else dblock
                hidden, rec = self._unit_inputs(block, unit, x, args, kwargs)
                with torch.no_grad():
                    targets = torch.cat(
                        [
                            rec.call(dunit, hidden[j : j + self.batch_size])
                            for j in range(0, hidden.shape[0], self.batch_size)
                        ]
                    )
                # the unit's masks by the names find_linears(unit) gives ("" for a bare linear)
                masks = {
                    n: block_masks[f"{uname}.{n}".strip(".") if uname else n]
                    for n in find_linears(unit)
                }
                entry = self._train_unit(
                    unit, rec, hidden, targets, masks, gen, f"{i}.{uname or 'block'}"
                )
                units_report.append({"block": i, **entry})
                log.info(
                    "reconstruct block %d %s: error %.4g -> %.4g",
                    i,
                    uname or "(whole)",
                    entry["error_before"],
                    entry["error_after"],
                )
                del hidden, targets
            if dense_inps is not None:
                dense_inps = self._forward(dblock, dense_inps, args, kwargs)
            dblock.to("cpu")
        del dense
        self._report = {
            "units": units_report,
            "steps_run": self.budget().optimizer_steps,
            "error_sum_before": sum(u["error_before"] for u in units_report),
            "error_sum_after": sum(u["error_after"] for u in units_report),
        }
