"""SAFE and SAFE+ (Lee, Lee, Chung, Lee, ICML 2025): sharpness-aware ADMM, block by block.

For LLMs the objective f is the block-wise reconstruction error. Block by block:
  inputs   the calibration windows after the already-pruned earlier blocks
  targets  the dense block's outputs on those same inputs
  f(w)     MSE(block_w(inputs), targets) over a mini-batch
and every linear of the block is an ADMM variable (engine: engine/admm.py; same z/u
updates and projection as Elsa). The x-step is a SAM step:
  g1 = grad f(w);  e = rho * g1 / ||g1||  (one global norm over the block's linears)
  g2 = grad f(w + e);  restore w;  grad = g2 + lam * (w - z + u);  Adam step.
rho = 0 makes e = 0 and the step is exactly the plain ADMM step.

SAFE projects with |w + u|; SAFE+ with the Wanda metric |w + u| * ||X_j||_2, the
input column norms collected while the dense block computes its targets. Both
compare within each output row (as Wanda), or N:M groups.

Schedule per block: `epochs` passes over the windows in shuffled mini-batches, lr with
linear warm-up over `warmup_epochs` then linear decay to 0, lam, rho, z/u update every
`interval` steps (step 0 included). Only the block's linear weights train; norms stay.
Published defaults (docs/methods.md): 128 x 2048 C4 windows, batch 8, lr 2e-4, warm-up 2
of 30 epochs, lam 1e-3, rho 2e-4, interval 32, betas (0.9, 0.95).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ..engine.admm import ADMM, LambdaSchedule
from ..engine.driver import Sequential, block_out
from ..engine.training import ADMMHook, Budget, Trainer, use_bf16, warmup_linear
from ..errors import SparsebenchError
from ..masks import apply_mask
from ..models import find_linears
from ..plan import Terms
from ..registry import METHODS, option
from .base import PruneContext, Pruner
from .layerwise import LayerwisePruner, RunningMean

log = logging.getLogger(__name__)


@METHODS.register("safe")
@dataclass
class Safe(Pruner):
    needs_calibration: ClassVar[bool] = True
    iterative: ClassVar[bool] = True

    epochs: int = option(30, ge=1)
    batch_size: int = option(8, ge=1)
    lr: float = option(2e-4, gt=0, lt=1)
    warmup_epochs: float = option(2, ge=0)
    lam: float = option(1e-3, ge=0)
    lam_schedule: str = option(
        "constant", choices=("constant", "linear", "cosine", "exponential")
    )  # per block
    lam_start: float = option(0.0, ge=0)
    rho: float = option(2e-4, ge=0)
    interval: int = option(32, ge=1)
    betas: tuple[float, float] = option((0.9, 0.95), ge=0, lt=1)
    eps: float = option(1e-8, gt=0)
    projection: str = option(
        "magnitude", choices=("magnitude", "wanda")
    )  # SAFE: |w+u|; SAFE+: wanda
    # One threshold per tensor, as the released code (which prunes every score <= the
    # k-th: k+1 and ties; sparsebench prunes exactly k). "row" compares per output row.
    group: str = option("tensor", choices=("row", "tensor"))
    # The block's other parameters (norms, biases) train with SAM + Adam and no penalty,
    # as in the released code; false trains only the ADMM linears.
    train_others: bool = True
    update_offset: int = option(
        1, ge=0
    )  # z/u update when (step + offset) % interval == 0; released: (step+1)
    bf16: bool | None = None  # bf16 autocast; None: on CUDA (the released code), never on the CPU
    # A layer-wise one-shot method (wanda, sparsegpt) whose solution for each block, from
    # the same inputs, starts w and z; None starts from the dense block (published).
    warm_start: str | None = None
    seed: int = 0
    blocks: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _state_bytes: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        # the ranges are checked once, by the registry (option(...)); what no single field says:
        self.betas = tuple(self.betas)
        self._oneshot = None
        if self.warm_start is not None:
            layerwise = [  # (not OATS: its block holds factors SAFE does not train)
                n for n in METHODS.names()
                if issubclass(METHODS.get(n), LayerwisePruner)
                and not getattr(METHODS.get(n), "lowrank", False)
            ]  # fmt: skip
            if self.warm_start not in layerwise:
                raise SparsebenchError(
                    f"{self.name}: warm_start '{self.warm_start}' is not a layer-wise one-shot "
                    "method; "
                    f"valid: {', '.join(layerwise)} (or null)"
                )
            self._oneshot = METHODS.build(self.warm_start, {})
        self.lam_sched = LambdaSchedule(self.lam_schedule, self.lam_start, self.lam)

    def use_bf16(self, device: torch.device) -> bool:
        return use_bf16(self.bf16, device)

    def plan_terms(self, device):
        # a block in training beside one-shot's terms; its linears' input norms; z and u in float32
        return Terms("blockwise", stats="norms", batch=self.batch_size, z_bytes=4, u_bytes=4)

    def budget(self) -> Budget:
        return getattr(self, "_budget", Budget())

    # ------------------------------------------------------------------ one block

    @torch.no_grad()
    def _mse(self, forward, inps, targets) -> float:
        """Mean squared error of forward(batch) against the targets, over all windows."""
        total = 0.0
        for j in range(0, inps.shape[0], self.batch_size):
            out = block_out(forward(inps[j : j + self.batch_size]))
            total += float((out.float() - targets[j : j + self.batch_size].float()).pow(2).sum())
        return total / targets.numel()

    def _targets(self, block, linears, inps, args, kwargs, targets):
        """Dense outputs on the block's inputs (into `targets`), and ||X_j||_2 of every linear's
        input."""
        norms = {
            name: RunningMean(torch.zeros(lin.in_features, device=inps.device))
            for name, lin in linears.items()
        }
        hooks = (
            [
                lin.register_forward_hook(
                    lambda m, a, o, s=norms[name]: s.add(a[0].detach(), lambda x: x.pow(2).sum(0))
                )
                for name, lin in linears.items()
            ]
            if self.projection == "wanda"
            else []
        )
        try:
            with torch.no_grad():
                for j in range(inps.shape[0]):
                    targets[j] = block_out(block(inps[j : j + 1], *args, **kwargs))[0]
        finally:
            for h in hooks:
                h.remove()
        return targets, {name: s.value.sqrt() for name, s in norms.items()} if hooks else None

    def _train_block(
        self, i, nblocks, block, inps, targets, args, kwargs, norms, ctx, gen, z_init=None
    ):
        linears = find_linears(block)
        n = inps.shape[0]
        steps_per_epoch = math.ceil(n / self.batch_size)
        total = self.epochs * steps_per_epoch
        others = [
            p for p in block.parameters() if all(p is not lin.weight for lin in linears.values())
        ]
        for p in others:
            p.requires_grad_(self.train_others)
        params = {name: lin.weight for name, lin in linears.items()}
        weights = list(params.values())
        trained = weights + (others if self.train_others else [])
        groups = [{"params": weights}] + (
            [{"params": others}] if self.train_others and others else []
        )
        opt = torch.optim.Adam(groups, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0)
        admm = ADMM(
            params,
            opt,
            ctx.sparsity,
            ctx.pattern,
            total,
            interval=self.interval,
            lam=self.lam_sched,
            ramp=ctx.schedule.ramp,
            projection=self.projection,
            input_norms=norms,
            group=self.group,
            z_init=z_init,
            offset=self.update_offset,
        )
        trainer = Trainer(
            trained,
            opt,
            warmup_linear(math.ceil(self.warmup_epochs * steps_per_epoch), total),
            rho=self.rho,
            hooks=[ADMMHook(admm)],
            name=f"{self.name} block {i}",
        )
        autocast = torch.autocast(
            inps.device.type, dtype=torch.bfloat16, enabled=self.use_bf16(inps.device)
        )
        # "before": the one-shot solution ADMM starts from. Warm-started, that is the block
        # as it is; else the projection of its dense weights by the same metric, evaluated
        # without touching the weights.
        if z_init is not None:
            before = self._mse(lambda x: block(x, *args, **kwargs), inps, targets)
        else:
            oneshot = {
                f"{name}.weight": w.detach()
                * admm.mask_of(name, w.detach().float(), ctx.sparsity, self.projection)
                for name, w in params.items()
            }
            before = self._mse(
                lambda x: functional_call(block, oneshot, (x, *args), kwargs), inps, targets
            )
            del oneshot
        first = None
        bar = tqdm(
            range(self.epochs),
            desc=f"{self.name} block {i + 1}/{nblocks}",
            unit="epoch",
            leave=False,
        )
        for epoch in bar:
            order = torch.randperm(n, generator=gen)
            epoch_loss = 0.0
            for j in range(0, n, self.batch_size):
                idx = order[j : j + self.batch_size].to(inps.device)
                x, y = inps[idx], targets[idx]

                def loss_fn():
                    with autocast:
                        out = block_out(block(x, *args, **kwargs))
                    return (out.float() - y.float()).pow(2).mean()

                loss = trainer.step([loss_fn], tokens=len(idx) * inps.shape[1])
                epoch_loss += loss * len(idx)
            epoch_loss /= n
            first = epoch_loss if first is None else first
            bar.set_postfix(loss=f"{epoch_loss:.3g}", dist=f"{admm.distance():.3g}")
        for p in others:
            p.requires_grad_(True)
        self._budget = self.budget().add(trainer.budget())
        dist = admm.distance()
        masks = admm.finalize()
        self._state_bytes = admm.state_bytes()
        return masks, {
            "recon_error_before": before,
            "loss_first_epoch": first,
            "loss_last_epoch": epoch_loss,
            "dist_before_final": dist,
            "steps": total,
        }

    # ------------------------------------------------------------------ the driver

    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        if ctx.calib is None:
            raise SparsebenchError(f"{self.name} needs calibration windows")
        # blocks, inputs, dense targets, rotary tables and additive masks in float32: the block
        # trains in it
        driver = Sequential(
            ctx.model,
            ctx.calib,
            ctx.device,
            batch=self.batch_size,
            dtype=torch.float32,
            desc=f"{self.name} blocks",
        )
        gen = torch.Generator().manual_seed(self.seed)
        masks: dict[str, torch.Tensor] = {}
        self.blocks = []
        self._budget = Budget()
        for step in driver:
            i, block, inps, args, kwargs = (
                step.index,
                step.block,
                step.inputs,
                step.args,
                step.kwargs,
            )
            bctx = ctx.for_block(i)  # this block's target (schedule=owl gives blocks their own)
            linears = find_linears(block)
            # the dense outputs go into the driver's output buffer, which then receives the pruned
            # block's
            targets, norms = self._targets(block, linears, inps, args, kwargs, step.outputs)
            z_init = None
            if self._oneshot is not None:  # prune this block in place from the same inputs
                self._oneshot.prune_block(block, inps, args, kwargs, bctx.sparsity, ctx.pattern)
                z_init = {
                    name: lin.weight.detach().float().clone() for name, lin in linears.items()
                }
            block_masks, rec = self._train_block(
                i, len(driver), block, inps, targets, args, kwargs, norms, bctx, gen, z_init
            )
            with torch.no_grad():
                for name, lin in linears.items():
                    apply_mask(lin, block_masks[name])
                    masks[f"{driver.path}.{i}.{name}"] = block_masks[name]
            after = self._mse(lambda x: block(x, *args, **kwargs), inps, targets)
            rec = {"block": i, **rec, "recon_error_after": after}
            before = rec["recon_error_before"]
            self.blocks.append(rec)
            log.info(
                "%s block %d: reconstruction error %.4g (one-shot) -> %.4g",
                self.name,
                i,
                before,
                after,
            )
            ctx.log(
                {
                    f"{self.name}/block": i,
                    f"{self.name}/recon_error_before": before,
                    f"{self.name}/recon_error_after": after,
                }
            )
        return masks

    def report(self) -> dict[str, Any]:
        if not self.blocks:
            return {}
        before = sum(b["recon_error_before"] for b in self.blocks)
        after = sum(b["recon_error_after"] for b in self.blocks)
        return {
            "blocks": self.blocks,
            "steps_run": sum(b["steps"] for b in self.blocks),
            "recon_error_sum_before": before,
            "recon_error_sum_after": after,
            "state_bytes_last_block": self._state_bytes,
        }


@METHODS.register("safe_plus")
@dataclass
class SafePlus(Safe):
    """SAFE+: the projection ranks |w + u| * ||X_j||_2 (the Wanda metric)."""

    projection: str = option("wanda", choices=("magnitude", "wanda"))
