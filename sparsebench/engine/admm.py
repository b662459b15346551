"""The ADMM engine, written once for Elsa, Elsa-L, SAFE and SAFE+.

Problem: min f(w) s.t. ||w||_0 <= k per tensor. Scaled ADMM with split z and dual u:
  x-step   the base optimizer's step on grad f(w) + lam * (w - z + u)
           (the penalty gradient is added after gradient clipping, as in the
           released Elsa code, so clipping never shrinks the constraint pull)
  z-step   z = Proj_k(w + u)          every `interval` steps: at (step + offset) % interval
                                      == 0, so step 0 included for Elsa (offset 0) and
                                      after steps 31, 63, ... for SAFE (offset 1)
  u-step   u = u + w - z
u is the scaled dual (y / lam): when lam changes between two z/u updates (a lambda
schedule), u is first rescaled by lam_old / lam_new, so the dual y = lam u carries over.
Final weights: Proj_k(w) with hard zeros; the mask goes to the core's verifier.

Projection (sparsity.project, the one definition of a mask):
  magnitude   rank |w + u|
  objective   rank v * (w + u)^2 with v = Adam's second moment (Elsa's default:
              the diagonal preconditioner), magnitude until Adam's v exists
  wanda       rank |w + u| * ||X_j||_2 given per-column input norms (SAFE+)
Unstructured masks compare within the whole tensor (Elsa) or within each output row
(SAFE and SAFE+, as Wanda does); N:M groups are always along the input dimension.

Storage: z and u in float32 (Elsa), or z in FP8 e4m3 with one dynamic scale per
tensor and u in bfloat16 (Elsa-L); dequantized on use, requantized after each update.

Residual coding of a lossy z (on by default). In exact ADMM, z and u have disjoint
supports: on a kept entry z = w + u, so the u-step gives u + w - z = 0 there. Elsa-L's
bfloat16 u therefore has a free slot on every entry that z keeps, and the engine stores
z's FP8 rounding residual (z_fp8 - z) in it. Without it the penalty pulls every kept
weight onto the FP8 grid (3 mantissa bits: up to 3% off), a fixed point ADMM then
converges to; with it the penalty w - z + u is exact to bfloat16 precision at the same
bytes. The support is read back as z_fp8 != 0 (an entry whose kept value underflows FP8
is then treated as pruned with u = -z, which leaves the penalty exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SparsebenchError
from ..sparsity import Pattern, Ramp, project
from .shard import gather, local, row_sharded, rows_of, sum_over_ranks

PROJECTIONS = ("magnitude", "objective", "wanda")
LAMBDA_KINDS = ("constant", "linear", "cosine", "exponential")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class LambdaSchedule:
    """lam over the run: constant `end`, or from `start` to `end` (linear / cosine /
    exponential)."""

    kind: str = "constant"
    start: float = 0.0
    end: float = 0.01

    def __post_init__(self):
        if self.kind not in LAMBDA_KINDS:
            raise SparsebenchError(
                f"unknown lambda schedule '{self.kind}'; valid: {', '.join(LAMBDA_KINDS)}"
            )
        if self.end < 0 or self.start < 0:
            raise SparsebenchError(f"lambda must be >= 0, got start={self.start}, end={self.end}")
        if self.kind == "exponential" and self.start <= 0:
            raise SparsebenchError("an exponential lambda schedule needs start > 0")

    def at(self, step: int, total: int) -> float:
        if self.kind == "constant":
            return self.end
        frac = min(max(step / max(total - 1, 1), 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * frac))
        return self.start * (self.end / self.start) ** frac


class Stored:
    """A tensor kept in float32, bfloat16, or FP8 e4m3 with a per-tensor dynamic scale."""

    FORMATS = ("float32", "bfloat16", "fp8")

    def __init__(self, value: torch.Tensor, fmt: str, sharded: bool = False):
        if fmt not in self.FORMATS:
            raise SparsebenchError(
                f"unknown ADMM state format '{fmt}'; valid: {', '.join(self.FORMATS)}"
            )
        self.fmt = fmt
        self.sharded = (
            sharded  # this rank holds some rows (FSDP2): the per-tensor scale is over all ranks
        )
        self.scale: torch.Tensor | None = None
        self.set(value)

    def set(self, value: torch.Tensor) -> None:
        if self.fmt == "float32":
            self.data = value.detach().float().clone()
        elif self.fmt == "bfloat16":
            self.data = value.detach().to(torch.bfloat16)
        else:
            # scale = amax / fp8_max * 1.05: headroom so rounding never overflows to NaN.
            amax = value.detach().abs().max().float()
            if self.sharded:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX)
            self.scale = torch.where(amax > 0, amax / FP8_MAX * 1.05, torch.ones_like(amax))
            self.data = (value.detach().float() / self.scale).to(torch.float8_e4m3fn)

    def get(self) -> torch.Tensor:
        if self.fmt == "fp8":
            return self.data.float() * self.scale
        return self.data.float()

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (4 if self.scale is not None else 0)


class ADMM:
    """Wraps a torch optimizer: penalty gradients, z/u updates, final projection.

    Usage per step (after backward and gradient clipping):
        admm.add_penalty(step); optimizer.step(); admm.after_step(step)
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        sparsity: float,
        pattern: Pattern,
        total_steps: int,
        interval: int = 32,
        lam: LambdaSchedule = LambdaSchedule(),
        ramp: Ramp = Ramp(),
        projection: str = "objective",
        magnitude_updates: int = 0,
        z_format: str = "float32",
        u_format: str = "float32",
        input_norms: dict[str, torch.Tensor] | None = None,
        z_init: dict[str, torch.Tensor] | None = None,
        group: str = "tensor",
        residual: bool = True,
        offset: int = 0,
        targets: dict[str, float] | None = None,
    ):
        if projection not in PROJECTIONS:
            raise SparsebenchError(
                f"unknown projection '{projection}'; valid: {', '.join(PROJECTIONS)}"
            )
        if projection == "wanda" and input_norms is None:
            raise SparsebenchError("the wanda projection needs input norms")
        if interval < 1:
            raise SparsebenchError(f"ADMM interval must be >= 1, got {interval}")
        self.params, self.opt = params, optimizer
        self.sparsity, self.pattern, self.total = sparsity, pattern, total_steps
        self.interval, self.lam, self.ramp = interval, lam, ramp
        self.projection, self.magnitude_updates = projection, magnitude_updates
        self.input_norms = input_norms or {}
        self.group = group  # unstructured comparison group: tensor (Elsa) or row (SAFE, as Wanda)
        self.residual = residual and z_format != "float32"  # a float32 z has no residual
        self.offset = offset
        self.targets = (
            targets or {}
        )  # per-tensor final targets (non-uniform allocation), else `sparsity`
        self.sharded = any(
            row_sharded(p) for p in params.values()
        )  # FSDP2: sums over ranks (DDP: every rank has all)
        self.updates = 0  # z/u updates done
        self.lam_at_update: float | None = None  # lam at the last z/u update (u's scale)
        self.churn = 0.0  # fraction of mask entries that flipped at the last z-update
        self.z: dict[str, Stored] = {}
        self.u: dict[str, Stored] = {}
        for name, p in params.items():
            # z0 = Proj_k(w0) by magnitude (or a given one-shot solution), u0 = 0.
            w = local(
                p.detach()
            ).float()  # this rank's rows under FSDP2 (sparsebench/engine/shard.py)
            if z_init is not None and name in z_init:
                z0 = z_init[name].to(w.device, torch.float32)
                if row_sharded(p):
                    z0 = rows_of(z0, p)
            else:
                # Adam's v does not exist yet: the objective-aware metric starts as magnitude.
                how = "magnitude" if projection == "objective" else projection
                z0 = w * self.mask_of(name, w, self.target(0, name), how)
            self.z[name] = Stored(z0, z_format, sharded=row_sharded(p))
            self.u[name] = Stored(
                self._u_slot(name, z0, torch.zeros_like(z0)), u_format, sharded=row_sharded(p)
            )

    def _u_slot(self, name: str, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """What the u tensor stores: u, plus z's rounding residual on z's support."""
        return u + (self.z[name].get() - z) if self.residual else u

    def z_value(self, name: str) -> torch.Tensor:
        z = self.z[name].get()
        return z - self.u[name].get() * (z != 0) if self.residual else z

    def u_value(self, name: str) -> torch.Tensor:
        u = self.u[name].get()
        return u * (self.z[name].get() == 0) if self.residual else u

    def keep(self, name: str) -> torch.Tensor:
        """The current mask: the support of z (no separate mask is held)."""
        return self.z[name].get() != 0

    def target(self, step: int, name: str | None = None) -> float:
        """The ramped target at `step`, of tensor `name` (its allocation), else the overall one."""
        return self.ramp.at(step, self.total, self.targets.get(name, self.sparsity))

    def mask_of(self, name: str, x: torch.Tensor, sparsity: float, how: str) -> torch.Tensor:
        """Keep mask of x (w, or w + u) for tensor `name` by metric `how` at `sparsity`."""
        if how == "magnitude":
            score = x.abs()
        elif how == "objective":
            v = self.second_moment(self.params[name])
            score = x.abs() if v is None else v.float() * x.pow(2)
        else:
            score = x.abs() * self.input_norms[name].to(x.device).unsqueeze(0)
        p = self.params[name]
        if row_sharded(p) and self.group == "tensor" and not self.pattern.is_nm:
            # one threshold over the whole tensor: project the gathered score exactly as one
            # process would (same ties), keep this rank's rows
            return rows_of(project(gather(score, p), sparsity, self.pattern, self.group), p)
        return project(
            score, sparsity, self.pattern, self.group
        )  # per row / N:M: local to a row shard

    def second_moment(self, p: torch.Tensor) -> torch.Tensor | None:
        """Adam's v for p (dequantized for 8-bit Adam), or None before the first step."""
        if hasattr(self.opt, "moments"):
            moments = self.opt.moments(p)
            return None if moments is None else moments[1]
        v = self.opt.state.get(p, {}).get("exp_avg_sq")
        return None if v is None else local(v)

    @torch.no_grad()
    def add_penalty(self, step: int) -> float:
        """grad += lam * (w - z + u) on every ADMM tensor. Call after clipping."""
        lam = self.lam.at(step, self.total)
        if lam == 0:
            return lam
        for name, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            # = w - z_value + u_value, also with residual coding (the residual cancels)
            pen = local(p.detach()).float() - self.z[name].get() + self.u[name].get()
            g = local(p.grad)
            g.add_(pen.to(g.dtype), alpha=lam)
        return lam

    def u_scale(self, step: int) -> float:
        """lam_old / lam_new for the scaled dual at this update (1 if lam did not change, or
        either is 0: a dual of a zero penalty has no scale to carry)."""
        lam = self.lam.at(step, self.total)
        old, self.lam_at_update = self.lam_at_update, lam
        if old is None or old == lam or old <= 0 or lam <= 0:
            return 1.0
        return old / lam

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """The z- and u-updates every `interval` steps (see offset). True if it ran."""
        if (step + self.offset) % self.interval:
            return False
        how = "magnitude" if self.updates < self.magnitude_updates else self.projection
        ratio = self.u_scale(step)
        flipped = total = 0
        for name, p in self.params.items():
            w = local(p.detach()).float()
            u = self.u_value(name)
            wu = w + (u * ratio if ratio != 1.0 else u)
            keep = self.mask_of(name, wu, self.target(step, name), how)
            flipped += int((keep != self.keep(name)).sum())
            total += keep.numel()
            z = wu * keep
            self.z[name].set(z)
            self.u[name].set(self._u_slot(name, z, wu - z))  # u + w - z
        if self.sharded:
            dev = next(iter(self.z.values())).get().device
            flipped, total = sum_over_ranks(flipped, dev), sum_over_ranks(total, dev)
        self.churn = flipped / max(total, 1)
        self.updates += 1
        return True

    @torch.no_grad()
    def distance(self) -> float:
        """||w - z|| over all ADMM tensors: how far the weights are from feasibility."""
        sq = sum(
            float((local(p.detach()).float() - self.z_value(n)).pow(2).sum())
            for n, p in self.params.items()
        )
        if self.sharded:
            sq = sum_over_ranks(sq, next(iter(self.z.values())).get().device)
        return math.sqrt(sq)

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor]:
        """w = Proj_k(w) with hard zeros at the final target; returns the keep masks."""
        masks = {}
        how = "magnitude" if self.updates < self.magnitude_updates else self.projection
        for name, p in self.params.items():
            w = local(p.detach())
            keep = self.mask_of(name, w.float(), self.targets.get(name, self.sparsity), how)
            w.mul_(keep.to(w.dtype))
            # the whole mask on every rank (a collective under FSDP2; gloo gathers no bool)
            masks[name] = (gather(keep.to(torch.uint8), p).bool() if row_sharded(p) else keep).cpu()
        return masks

    def state_bytes(self) -> dict[str, int]:
        """Bytes held for z, u and the optimizer's state of the ADMM tensors, measured."""
        opt = 0
        for p in self.params.values():
            for v in self.opt.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    v = local(v)  # this rank's share under FSDP2
                    opt += v.numel() * v.element_size()
        return {
            "z": sum(s.nbytes() for s in self.z.values()),
            "u": sum(s.nbytes() for s in self.u.values()),
            "optimizer": opt,
            "params": sum(p.numel() for p in self.params.values()),
        }
