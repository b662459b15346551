"""The run's side of the plan: what a method or recovery declares it holds (`Terms`), the
plan's view of a run (`Knobs`: the declared terms, the run's sizes and launch) and the plan
itself (`Plan`: named terms, where and when each is held)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import SparsebenchError
from ..registry import option
from .shapes import GIB, PHASES


@dataclass
class PlanSpec:
    """Config of the plan itself (top-level `plan` group)."""

    enforce: bool = True  # refuse a run whose plan does not fit the visible memory
    margin: float = option(0.05, ge=0, lt=1)  # keep this share of the visible memory free
    host_limit_gib: float | None = option(None, gt=0)  # override the visible host memory (tests)
    device_limit_gib: float | None = option(None, gt=0)  # override the visible device memory


@dataclass(frozen=True)
class Terms:
    """What one stage holds, as its method or recovery declares it (`plan_terms(device)`)."""

    kind: str  # oneshot | blockwise | train (the module's docstring says what each holds)
    stats: str = "none"  # oneshot: none | norms | hessian | gram_eig | gram_inv
    prunes: bool = True  # False: nothing is pruned (no masks, no projection)
    batch: int = 1  # windows per optimizer step (train) or per training batch (blockwise)
    grad_accum: int = 1  # train: micro-batches per step
    seqlen: int | None = None  # train: the training window; None: the model's
    z_bytes: int = 0  # ADMM z and u per pruned weight; 0: no ADMM state
    u_bytes: int = 0
    adam8: bool = False  # Adam's moments in 8 bits
    trained: str = "all"  # all | no_embeddings | linears | none (a few parameters)
    checkpointing: bool = False
    bf16: bool = False  # activations in bfloat16
    merged_copy: bool = False  # each linear's merged weight kept for the backward (adapters)
    svd_copies: int = 0  # oneshot: float32 copies of the largest linear one pruning holds (SVD)
    grows: float = 0.0  # new parameters the pruned model gains, as a share of the pruned weights
    # oneshot: (widest linear side x calibration tokens) float32 arrays a block's pruning holds
    activation_copies: int = 0
    # lighter variants the method offers a refusal: (the option to name, the fields it changes)
    lighter: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


@dataclass
class Knobs:
    """What the plan varies: the run's own settings, and the alternatives it suggests."""

    kind: str  # oneshot | blockwise | train
    method: str
    prunes: bool = True
    stats: str = "none"  # Terms.stats
    nsamples: int = 0
    seqlen: int = 2048
    micro_batch: int = 1
    world: int = 1
    engine: str = "single"  # single | ddp | fsdp
    offload: bool = False  # fsdp: shards, gradients, moments, z and u on the host
    inputs: str = (
        "device"  # one-shot: a block's calibration inputs and outputs on the device or the host
    )
    calib_batch: int = 1  # one-shot: windows per forward through a block
    z_bytes: int = 0  # 0: no ADMM state
    u_bytes: int = 0
    adam8: bool = False
    trained: str = "all"  # all | no_embeddings | linears | none (only a few parameters)
    extra_trained: int = 0  # trained = none: adapters or norms
    checkpointing: bool = False
    act_bytes: int = 4  # 2 under bf16 autocast
    merged_copy: bool = False  # adapters keep each linear's merged weight for the backward
    refine: bool = False  # one-shot: a mask refinement in the block walk (refine/)
    svd_copies: int = 0  # Terms.svd_copies
    grows: float = 0.0  # Terms.grows
    activation_copies: int = 0  # Terms.activation_copies
    device: str = "cpu"
    lighter: tuple = ()  # Terms.lighter: the method's own lighter variants


@dataclass
class Plan:
    model: str
    knobs: Knobs
    terms: list[tuple[str, str, float, str]] = field(
        default_factory=list
    )  # (component, where, GiB, phase)
    eval: dict[str, Any] = field(
        default_factory=dict
    )  # eval_placement: where evaluation puts the model
    rank0: set[str] = field(default_factory=set)  # terms only rank 0 holds (the final gather)
    model_map: dict[str, Any] = field(default_factory=dict)  # families.model_map: pruned and kept
    inference: dict[str, int] = field(
        default_factory=dict
    )  # build.inference_bytes: each stored form
    disk: dict[str, int] = field(default_factory=dict)  # what a stage writes to disk (bytes)

    def add(
        self, name: str, where: str, nbytes: float, phase: str = "always", rank0: bool = False
    ) -> None:
        assert phase in PHASES, phase
        if nbytes > 0:
            self.terms.append((name, where, nbytes / GIB, phase))
            if rank0:
                self.rank0.add(name)

    def total(self, where: str, rank: int = 0) -> float:
        """Peak GiB of `rank` on the host or on the device: the `always` terms plus the largest
        phase there; on the CPU every term is on the host. Rank 0 is the largest."""
        if self.knobs.device == "cpu" and where == "device":
            return 0.0
        here = [
            (g, ph)
            for n, w, g, ph in self.terms
            if (self.knobs.device == "cpu" or w == where) and (rank == 0 or n not in self.rank0)
        ]
        phases = [sum(g for g, ph in here if ph == p) for p in PHASES[1:]]
        return sum(g for g, ph in here if ph == "always") + max(phases)

    def as_dict(self) -> dict[str, Any]:
        k = self.knobs
        return {
            **({"model_map": self.model_map} if self.model_map else {}),
            **({"inference_bytes": self.inference} if self.inference else {}),
            "engine": k.engine,
            "offload": k.offload,
            "calib_inputs": k.inputs,
            "calib_batch": k.calib_batch,
            "world_size": k.world,
            "method": k.method,
            "seqlen": k.seqlen,
            "micro_batch": k.micro_batch,
            "device": k.device,
            "per_rank_gib": {
                "host": round(self.total("host"), 3),
                "device": round(self.total("device"), 3),
            },
            **(
                {
                    "other_ranks_gib": {
                        w: round(self.total(w, rank=1), 3) for w in ("host", "device")
                    }
                }
                if self.rank0 and k.world > 1
                else {}
            ),
            "terms": [
                {
                    "component": n,
                    "where": w,
                    "gib": round(g, 4),
                    "bytes": round(g * GIB),
                    "phase": ph,
                }
                for n, w, g, ph in self.terms
            ],
            "eval": self.eval,
            **({"disk_bytes": self.disk} if self.disk else {}),
        }

    def table(self) -> str:
        k = self.knobs
        engine = f"{k.engine} + CPU offload" if k.offload else k.engine
        head = (
            f"memory plan: {self.model}, {k.method}, engine {engine}, {k.world} rank(s), seqlen "
            f"{k.seqlen}, "
            f"micro-batch {k.micro_batch}, device {k.device} (GiB per rank)"
        )
        width = max(len(n) for n, *_ in self.terms) if self.terms else 10
        lines = [head, f"  {'component':<{width}}  where    GiB       held"]
        for name, where, gib, phase in self.terms:
            lines.append(
                f"  {name:<{width}}  {where if k.device != 'cpu' else 'host':<7} {gib:8.3f}  "
                f"{phase}"
            )
        peak = (
            "  (always + the largest phase)" if any(ph != "always" for *_, ph in self.terms) else ""
        )
        lines.append(f"  {'total host':<{width}}  {'':<7} {self.total('host'):8.3f}{peak}")
        if self.rank0 and k.world > 1:
            lines.append(
                f"  {'total host, ranks > 0':<{width}}  {'':<7} {self.total('host', rank=1):8.3f}"
            )
        if k.device != "cpu":
            lines.append(f"  {'total device':<{width}}  {'':<7} {self.total('device'):8.3f}{peak}")
        if self.eval and k.device != "cpu":
            e = self.eval
            lines.append(
                f"  evaluation: {e['placement']} ({e['weights_gib']:.1f} GiB of weights, "
                f"{e['gpus']} GPU(s) "
                f"visible, {e['window_gib']:.2f} GiB kept free on each for one batch)"
            )
        return "\n".join(lines)


def declared(part, device: torch.device, what: str) -> Terms:
    """The terms a method or recovery declares; one clear error when it declares none."""
    terms = part.plan_terms(device)
    if not isinstance(terms, Terms):
        raise SparsebenchError(
            f"{what} '{part.name}' declares no memory-plan terms, so its memory cannot be "
            f"planned: give {type(part).__name__} a plan_terms(device) that returns "
            f"plan.Terms (docs/contributing.md)"
        )
    return terms


def knobs_of(specs, launch) -> Knobs:
    """The plan's view of a run: the declared terms, the asked-for sizes (specs.Specs) and
    the resolved launch (launch.Launch: engine, inputs placement, ranks)."""
    p, r = specs.pruner, specs.recover
    world = launch.world
    t = declared(p, specs.device, "method")
    quant = getattr(specs, "quant", None)
    if quant is not None and quant.stats == "hessian" and t.stats in ("none", "norms"):
        # quant=gptq's walk holds a Hessian per distinct input after the method's own walk:
        # the larger of the two stages is planned
        t = replace(t, stats="hessian")
    common = dict(
        method=p.name,
        prunes=t.prunes,
        nsamples=specs.data.nsamples
        if p.needs_calibration or (quant is not None and quant.needs_calibration)
        else 0,
        seqlen=specs.model.seqlen,
        device=specs.device.type,
    )
    if t.kind in ("oneshot", "blockwise"):
        if t.kind == "oneshot":
            knobs = Knobs(
                kind="oneshot",
                stats=t.stats,
                svd_copies=t.svd_copies,
                grows=t.grows,
                activation_copies=t.activation_copies,
                inputs=launch.inputs,
                calib_batch=launch.calib_batch,
                refine=getattr(specs, "refine", None) is not None,
                **common,
            )
        else:
            knobs = Knobs(
                kind="blockwise",
                stats=t.stats,
                micro_batch=t.batch,
                z_bytes=t.z_bytes,
                u_bytes=t.u_bytes,
                refine=getattr(specs, "refine", None) is not None,
                **common,
            )
        if r is None:
            return knobs
        rt = declared(r, specs.device, "recovery")
        if rt.kind == "train":  # the training stage is the larger one
            return recover_knobs(r.name, rt, knobs, launch)
        if (
            rt.kind == "blockwise" and knobs.kind == "oneshot"
        ):  # its block in training beside one-shot's terms
            return replace(
                knobs,
                kind="blockwise",
                method=f"{p.name}+{r.name}",
                micro_batch=rt.batch,
                inputs="device",
                calib_batch=1,
            )
        return knobs
    # whole-model training: the engine the run resolved (run.resolve_engine), else DDP on several
    # ranks
    engine = (
        launch.engine
        if launch.engine in ("ddp", "fsdp") and world > 1
        else ("ddp" if world > 1 else "single")
    )
    if launch.offload and launch.engine == "fsdp":  # offload is FSDP2's, on any number of ranks
        engine = "fsdp"
    micro = t.batch // t.grad_accum // max(world, 1)
    return Knobs(
        kind="train",
        stats="none",
        micro_batch=max(micro, 1),
        world=world,
        engine=engine,
        offload=engine == "fsdp" and launch.offload,
        z_bytes=t.z_bytes,
        u_bytes=t.u_bytes,
        adam8=t.adam8,
        trained=t.trained,
        checkpointing=t.checkpointing,
        act_bytes=2 if t.bf16 else 4,
        lighter=t.lighter,
        **{**common, "seqlen": t.seqlen or specs.model.seqlen},
    )


def recover_knobs(name: str, rt: Terms, base: Knobs, launch) -> Knobs:
    world = launch.world
    fsdp = (
        launch.engine == "fsdp"
    )  # sharded training over the ranks, or offloaded in one (engine/shard.py)
    micro = max(rt.batch // rt.grad_accum // (world if fsdp else 1), 1)
    return replace(
        base,
        kind="train",
        method=f"{base.method}+{name}",
        micro_batch=micro,
        seqlen=rt.seqlen or base.seqlen,
        trained=rt.trained,
        act_bytes=2 if rt.bf16 else 4,
        merged_copy=rt.merged_copy,
        engine="fsdp" if fsdp else base.engine,
        world=world if fsdp else 1,
        offload=fsdp and launch.offload,
    )
