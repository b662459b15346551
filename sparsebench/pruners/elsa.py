"""Elsa (Lee, Jang, Lee, Alistarh, Lee 2025): surrogate-free ADMM on the model's own loss.

The whole model trains on next-token loss over fresh random calibration windows; every
decoder-block linear weight is an ADMM variable (engine: engine/admm.py); every other
parameter (embeddings, norms, lm_head) trains with the same optimizer and no penalty,
as in the released recipe (`train_others=false` freezes them).

Defaults are the published Llama-2-7B recipe: Adam(0.9, 0.95, eps 1e-8, no weight
decay), lr 2e-4 decayed linearly to 0 without warm-up, clipping at 1.0, lambda 0.01,
interval 32, objective-aware projection, 4096 steps x 8 windows of model.seqlen.
Two defects of the released code are NOT copied: its objective-aware projection only
ran with 4-bit Adam (an indentation slip), and it divided the penalty by the number
of GPUs after DDP had already averaged the gradients. Here the penalty is added once,
after the all-reduce, on every rank.

Elsa-L (`elsa_l`) is the same loop with z stored in FP8 e4m3 (per-tensor scale), u
in bfloat16 and, by default, Adam's moments in 8 bits.

Multi-process: under torchrun (torch.distributed initialised) the model is wrapped in
DDP or sharded with FSDP2 (`engine=`, sparsebench/engine/shard.py; `offload=true` keeps the
shards, gradients and optimizer state on the host, also on one GPU); every rank draws
the same global batch and trains on its slice, so the data seen does not depend on the
number of ranks, and the deterministic projection gives every rank the same z.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.adam8bit import Adam8bit
from ..engine.admm import ADMM, LambdaSchedule, Stored
from ..engine.checkpoint import TrainingCheckpoint
from ..engine.shard import place_for_training, unshard
from ..engine.training import (
    ADMMHook,
    Budget,
    Trainer,
    embedding_weights,
    float_master,
    linear_decay,
    mean_over_ranks,
    use_bf16,
)
from ..engine.windows import WindowTraining, ranks
from ..errors import SparsebenchError
from ..models import prunable_linears
from ..plan import FORMAT_BYTES, Terms
from ..registry import METHODS, option
from .base import PruneContext, Pruner

STATE_FORMATS = Stored.FORMATS
LIGHT = ("fp8", "bfloat16", True)  # Elsa-L's z, u and 8-bit moments

log = logging.getLogger(__name__)


@METHODS.register("elsa")
@dataclass
class Elsa(WindowTraining, Pruner):
    """The window-training options (steps, batch_size, grad_accum, seqlen, lr, betas, eps,
    clip, bf16, seed, log_every: engine/windows.py, Elsa's published defaults) and ADMM's."""

    distributed = True
    reads_data = True
    iterative = True

    lr_pruned: float | None = option(None, gt=0, lt=1)  # separate lr for the ADMM weights; None: lr
    lam: float = option(0.01, ge=0)
    lam_schedule: str = option(
        "constant", choices=("constant", "linear", "cosine", "exponential")
    )  # from lam_start to lam
    lam_start: float = option(0.0, ge=0)
    interval: int = option(32, ge=1)
    projection: str = option("objective", choices=("objective", "magnitude"))
    magnitude_updates: int = option(
        0, ge=0
    )  # first z-updates by magnitude (Adam's v is noisy early)
    train_others: bool = True  # train embeddings, norms, lm_head without penalty
    freeze_embeddings: bool = False  # with train_others: keep embeddings and lm_head fixed
    warm_start: str | None = None  # a one-shot method whose solution initialises w and z
    warm_start_nsamples: int = option(64, ge=1)
    grad_checkpointing: bool = False
    z_format: str = option("float32", choices=STATE_FORMATS)
    u_format: str = option("float32", choices=STATE_FORMATS)
    z_residual: bool = (
        True  # a lossy z's rounding residual rides in u's free slots (engine/admm.py)
    )
    optim_8bit: bool = False  # Adam's moments in 8 bits (engine/adam8bit.py)
    _state: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.warm_start is not None:
            METHODS.get(self.warm_start)
        self.lam_sched = LambdaSchedule(self.lam_schedule, self.lam_start, self.lam)

    # ------------------------------------------------------------------ pieces

    def use_bf16(self, device: torch.device) -> bool:
        return use_bf16(self.bf16, device)

    def plan_terms(self, device):
        light = (self.z_format, self.u_format, self.optim_8bit) == LIGHT
        return Terms(
            "train",
            batch=self.batch_size,
            grad_accum=self.grad_accum,
            seqlen=self.seqlen,
            z_bytes=FORMAT_BYTES[self.z_format],
            u_bytes=FORMAT_BYTES[self.u_format],
            adam8=self.optim_8bit,
            trained="no_embeddings"
            if self.freeze_embeddings
            else ("all" if self.train_others else "linears"),
            checkpointing=self.grad_checkpointing,
            bf16=self.use_bf16(device),
            lighter=()
            if light
            else (
                (
                    "method=elsa_l",
                    (
                        ("z_bytes", FORMAT_BYTES[LIGHT[0]]),
                        ("u_bytes", FORMAT_BYTES[LIGHT[1]]),
                        ("adam8", True),
                    ),
                ),
            ),
        )

    def budget(self) -> Budget:
        warm = self.warm_start_nsamples * self._seqlen if self.warm_start else 0
        return Budget(calib_tokens=warm).add(getattr(self, "_budget", Budget()))

    def _trainable(self, model, admm_names: set[str]):
        admm, others = [], []
        embeddings = embedding_weights(model)
        for name, p in model.named_parameters():
            if name.removesuffix(".weight") in admm_names and name.endswith(".weight"):
                admm.append(p)
            elif self.train_others and not (self.freeze_embeddings and id(p) in embeddings):
                others.append(p)
            else:
                p.requires_grad_(False)
        return admm, others

    def _warm_start(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        from ..data import calibration_windows

        calib = calibration_windows(
            ctx.data,
            ctx.tokenizer,
            ctx.seqlen,
            ctx.model.config.vocab_size,
            self.warm_start_nsamples,
        )
        method = METHODS.build(self.warm_start, {})
        sub = PruneContext(
            ctx.model,
            ctx.sparsity,
            ctx.pattern,
            ctx.schedule,
            ctx.device,
            calib,
            block_targets=ctx.block_targets,
        )
        masks = method.prune(sub)
        linears = prunable_linears(ctx.model)
        return {
            n: linears[n].weight.detach().float() * masks[n].to(linears[n].weight.device)
            for n in masks
        }

    # ------------------------------------------------------------------ the loop

    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        if ctx.data is None:
            raise SparsebenchError(f"{self.name} needs a data source")
        rank, world = ranks()
        distributed = world > 1 or (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        )
        engine = ("fsdp" if ctx.engine == "fsdp" else "ddp") if distributed else "single"
        if engine == "fsdp" and ctx.fresh_model is None and rank == 0:
            raise SparsebenchError(
                f"{self.name}: engine=fsdp needs PruneContext.fresh_model to hand back an "
                "unsharded model"
            )
        self.micro_share()  # a micro-batch the ranks cannot split is refused before any work
        seqlen = self.seqlen or ctx.seqlen
        self._seqlen = ctx.seqlen  # the warm start's windows
        model = ctx.model

        z_init = self._warm_start(ctx) if self.warm_start else None
        dtype = float_master(model, self.name)  # cast back at the end
        # under fsdp every block, then the root: rows of every tensor split over the ranks
        place_for_training(
            model, ctx.device, engine == "fsdp", ctx.offload, self.use_bf16(ctx.device)
        )
        linears = prunable_linears(model)
        admm_params, others = self._trainable(model, set(linears))
        groups = [{"params": admm_params, "lr": self.lr_pruned or self.lr}]
        if others:
            groups.append({"params": others, "lr": self.lr})
        if self.optim_8bit:
            opt = Adam8bit(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        else:
            opt = torch.optim.Adam(groups, betas=self.betas, eps=self.eps, weight_decay=0.0)
        admm = ADMM(
            {n: lin.weight for n, lin in linears.items()},
            opt,
            ctx.sparsity,
            ctx.pattern,
            self.steps,
            interval=self.interval,
            lam=self.lam_sched,
            ramp=ctx.schedule.ramp,
            projection=self.projection,
            magnitude_updates=self.magnitude_updates,
            z_format=self.z_format,
            u_format=self.u_format,
            z_init=z_init,
            residual=self.z_residual,
            targets=ctx.targets(linears) if ctx.block_targets is not None else None,
        )
        if self.grad_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        net = (
            torch.nn.parallel.DistributedDataParallel(model) if engine == "ddp" else model
        )  # FSDP2 reduces itself
        sampler = self.windows(ctx.data, ctx.tokenizer, seqlen, model.config.vocab_size)
        hook = ADMMHook(admm)
        trainer = Trainer(
            admm_params + others,
            opt,
            linear_decay(self.steps),
            clip=self.clip,
            hooks=[hook],
            name=self.name,
            reduce_loss=mean_over_ranks(ctx.device) if distributed else (lambda x: x),
        )
        ckpt = TrainingCheckpoint(
            ctx.workdir and Path(ctx.workdir), ctx.checkpoint_every, ctx.fingerprint, engine
        )
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        first = ckpt.load(
            trained, opt, admm, trainer, sampler, self.history
        )  # 0 unless resuming this run

        def checkpoint(step):
            if ckpt.due(step, self.steps):
                ckpt.save(step, trained, opt, admm, trainer, sampler, self.history)

        self.train_on_windows(
            net,
            trainer,
            sampler,
            ctx.device,
            seqlen,
            label=self.name,
            log=ctx.log,
            log_prefix=self.name,
            extras=lambda step: {
                "dist": admm.distance(),
                "churn": admm.churn,
                "lam": hook.lam,
                "target": admm.target(step),
            },
            log_now=lambda: hook.updated,
            after_step=checkpoint,
            first=first,
        )
        self._budget = trainer.budget()
        ckpt.remove()
        if self.grad_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        self._state = {
            "dist_before_final": admm.distance(),
            "state_bytes": admm.state_bytes(),
            "steps_run": trainer.steps_done,
        }
        masks = admm.finalize()
        if (
            engine == "fsdp"
        ):  # gather the trained weights into a plain model on rank 0 (a collective)
            opt.state.clear()  # the training state goes first: the gather then fits under its peak
            admm.z.clear()
            admm.u.clear()
            plain = unshard(model, ctx.fresh_model)
            if plain is not None:
                model = ctx.model = plain
        model.to(dtype)  # zeros stay zeros in any dtype
        return masks

    def report(self) -> dict[str, Any]:
        if not self.history:
            return {}
        sb = self._state["state_bytes"]
        return {
            "steps_run": self._state["steps_run"],
            "history": self.history,
            "dist_before_final_projection": self._state["dist_before_final"],
            "state_bytes": sb,
            "state_bytes_per_param": {k: sb[k] / sb["params"] for k in ("z", "u", "optimizer")},
        }


@METHODS.register("elsa_l")
@dataclass
class ElsaL(Elsa):
    """Elsa with memory-light state: z in FP8 e4m3 (per-tensor scale), u in bfloat16,
    Adam's moments in 8 bits (optim_8bit=false keeps them in float32)."""

    z_format: str = option("fp8", choices=STATE_FORMATS)
    u_format: str = option("bfloat16", choices=STATE_FORMATS)
    optim_8bit: bool = True
