"""What a run asks for: every config group parsed and validated once, before any heavy work
(`build_specs`), and the local files it will read checked now (`check_data_files`).

What actually runs (the engine, where the calibration inputs live, the ranks) is resolved
from this by the memory plan: launch.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import data as datamod
from .engine.shard import ENGINES
from .errors import SparsebenchError
from .evaluation.kernels import kernels_for, unavailable
from .evaluation.perplexity import EvalSpec
from .formats import FORMATS
from .models import ModelSpec
from .plan import PlanSpec
from .pruners import Pruner
from .pruners.base import STRUCTURES, targets_by_linear
from .pruners.layerwise import LayerwisePruner
from .records.tracking import LoggerSpec
from .recover import RECOVERIES
from .registry import METHODS, build_dataclass, check_value, option
from .sparsity import (
    OWL,
    EvoPressSearch,
    Pattern,
    Ramp,
    Schedule,
    check_sparsity,
    parse_pattern,
)

log = logging.getLogger(__name__)


@dataclass
class SaveSpec:
    enabled: bool = False
    dir: str | None = None
    format: str = option("dense", choices=FORMATS)  # records/formats.py


@dataclass
class Specs:
    model: ModelSpec
    pruner: Pruner
    sparsity: float
    pattern: Pattern
    schedule: Schedule
    data: datamod.DataSpec
    eval: EvalSpec
    device: torch.device
    seed: int
    logger: LoggerSpec
    save: SaveSpec
    recover: Any = None  # a Recovery (sparsebench/recover/), or None
    refine: Any = None  # a Refinement (sparsebench/refine/), or None
    quant: Any = None  # a Quantization (sparsebench/quant/), or None
    plan: Any = None  # PlanSpec
    world_size: int = 1  # ranks to plan for (dry runs)
    engine: str = (
        "auto"  # auto | single | ddp | fsdp (sparsebench/engine/shard.py); what runs: launch.Launch
    )
    offload: bool = False  # FSDP2 CPU offload (engine=fsdp; sparsebench/engine/shard.py)
    calib_inputs: str = "auto"  # auto | device | host (engine/driver.py); what runs: launch.Launch
    calib_batch: int = 1  # one-shot methods: windows per forward through a block (engine/driver.py)
    checkpoint_every: int = (
        0  # training checkpoints every N steps (sparsebench/engine/checkpoint.py)
    )

    @property
    def needs_calibration(self) -> bool:
        quant = self.quant is not None and self.quant.needs_calibration
        return self.pruner.needs_calibration or self.schedule.needs_calibration or quant

    @property
    def reads_calibration(self) -> bool:
        """The calibration pool's file is part of the run's identity."""
        quant = self.quant is not None and self.quant.needs_calibration
        return self.pruner.reads_calibration or self.schedule.needs_calibration or quant


def resolve_device(name: str, planning: bool = False) -> torch.device:
    """The compute device; `planning` (dry runs) accepts cuda without a visible GPU."""
    cuda = torch.cuda.is_available()
    if planning and not cuda and str(name).startswith("cuda"):
        return torch.device(name if ":" in str(name) else "cuda:0")
    valid = "auto, cpu" + (f", cuda, cuda:0..{torch.cuda.device_count() - 1}" if cuda else "")
    if name == "auto":
        if cuda:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparsebenchError(f"unknown device '{name}'; valid here: {valid}") from None
    if device.type not in ("cpu", "cuda"):
        raise SparsebenchError(
            f"device={name} is not supported by sparsebench (valid here: {valid})"
        )
    if device.type == "cuda" and not cuda:
        raise SparsebenchError(
            f"device={name} but no CUDA GPU is visible to this torch build; valid here: {valid}"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise SparsebenchError(
            f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible; valid here: "
            f"{valid}"
        )
    return device


def build_refinement(cfg: dict | None, pruner: Pruner) -> tuple[Pruner, Any]:
    """(the pruner, the refinement of `refine=<name>`): None for none; the pruner that runs
    it is the method's block-walk form (magnitude's twin walks the blocks for the inputs the
    refinement needs). Refused now for a method whose masks it cannot refine (refine/)."""
    from .refine import REFINEMENTS

    refine = dict(cfg or {"name": "none"})
    name = refine.pop("name", None)
    if name == "none":
        return pruner, None
    refinement = REFINEMENTS.build(name, refine)
    walker = pruner.refinable()
    if walker is None:
        walkable = sorted(
            n for n in METHODS.names() if METHODS.get(n).refinable is not Pruner.refinable
        )
        what = (
            "no masks to refine"
            if pruner.name == "dense"
            else "masks found together with low-rank factors"
            if getattr(pruner, "lowrank", False)
            else "no block-by-block masks"
        )
        raise SparsebenchError(
            f"refine={name} refines a one-shot method's masks block by block, and method "
            f"{pruner.name} has {what}; methods it refines: {', '.join(walkable)}"
        )
    if walker.permutes_columns:
        raise SparsebenchError(
            f"refine={name} swaps weights within consecutive groups; method {pruner.name} "
            "permutes input columns first (method.reallocation=true): use one or the other"
        )
    if refinement.init == "score" and not walker.scored:
        raise SparsebenchError(
            f"refine.init=score: method {pruner.name} has no score of the dense weight to start "
            "from; use refine.init=auto (its masks) or refine.init=mask"
        )
    return walker, refinement


def build_quant(cfg: dict | None, pruner: Pruner):
    """The quantization stage of `quant=<name>` (None for none), refused now where it cannot
    run: SparseGPT's joint mode with any other method, or with what its sweep does not do."""
    from .quant import QUANTIZERS

    quant = dict(cfg or {"name": "none"})
    name = quant.pop("name", None)
    if name == "none":
        return None
    stage = QUANTIZERS.build(name, quant)
    if getattr(pruner, "lowrank", False):
        raise SparsebenchError(
            f"quant={name} rounds each pruned linear's one weight; method {pruner.name} holds "
            "low-rank factors beside it, which no quantizer here rounds: use quant=none"
        )
    if stage.joint:
        if name != "gptq" or pruner.name != "sparsegpt":
            raise SparsebenchError(
                f"quant.joint=true rounds inside SparseGPT's sweep (quant=gptq, "
                f"method=sparsegpt); got quant={name} method={pruner.name}: set quant.joint=false"
            )
        if stage.group_size != -1 or stage.act_order:
            raise SparsebenchError(
                "quant.joint=true: the released joint sweep takes one grid per row from the "
                f"dense weight; got quant.group_size={stage.group_size} quant.act_order="
                f"{str(stage.act_order).lower()}: use -1 and false, or quant.joint=false"
            )
        pruner.joint_quant = stage
    return stage


def _walks_alone(name: str) -> bool:
    """A method whose block walk prunes each linear on its own (EvoPress's database)."""
    try:
        walker = METHODS.build(name, {}).refinable()
    except SparsebenchError:
        return False
    return (
        walker is not None
        and type(walker).prune_block is LayerwisePruner.prune_block
        and not getattr(walker, "lowrank", False)
    )


def build_specs(cfg: DictConfig) -> Specs:
    """Parse and validate every config group once, before any heavy work."""
    c = OmegaConf.to_container(cfg, resolve=True)
    seed = check_value(c["seed"], int, "seed")  # first: data.seed and method.seed copy it
    method = dict(c["method"])
    method.pop("preset", None)  # a preset's own name, for tables: it is not an option
    pruner = METHODS.build(method.pop("name", None), method)
    recover = dict(c.get("recover") or {"name": "none"})
    recover.pop("preset", None)  # as for methods: a name for tables, not an option
    recover_name = recover.pop("name", None)
    recovery = None if recover_name == "none" else RECOVERIES.build(recover_name, recover)
    pruner, refinement = build_refinement(c.get("refine"), pruner)
    quant = build_quant(c.get("quant"), pruner)
    pattern = parse_pattern(check_value(c["pattern"], str, "pattern"))
    sched = dict(c["schedule"])
    ramp = build_dataclass(Ramp, sched.pop("ramp", {}) or {}, "schedule.ramp")
    owl = sched.pop("owl", None)
    if owl is not None or sched.get("allocation") == "owl":
        owl = build_dataclass(OWL, owl or {}, "schedule.owl")
    evo = sched.pop("evopress", None)
    if evo is not None or sched.get("allocation") == "evopress":
        evo = dict(evo or {})
        for key in ("survivors", "tokens"):  # lists in YAML, tuples in the spec
            if isinstance(evo.get(key), list):
                evo[key] = tuple(evo[key])
        evo.pop("preset", None)  # a preset's name, for tables
        evo = build_dataclass(EvoPressSearch, evo, "schedule.evopress")
    for key in ("resume", "dense_baseline", "dry_run"):
        check_value(c.get(key, False), bool, key)
    model = build_dataclass(ModelSpec, c["model"], "model")
    specs = Specs(
        model=model,
        pruner=pruner,
        sparsity=0.0 if pruner.name == "dense" else check_sparsity(c["sparsity"], pattern),
        pattern=Pattern() if pruner.name == "dense" else pattern,
        schedule=build_dataclass(
            Schedule, {**sched, "ramp": ramp, "owl": owl, "evopress": evo}, "schedule"
        ),
        # a random-weight model reads random ids, no data file: it runs where no data root is
        data=build_dataclass(
            datamod.DataSpec, {**c["data"], "needs_files": not model.random_weights}, "data"
        ),
        eval=build_dataclass(EvalSpec, c["eval"], "eval"),
        device=resolve_device(str(c["device"]), planning=bool(c.get("dry_run", False))),
        seed=seed,
        logger=build_dataclass(LoggerSpec, c["logger"], "logger"),
        save=build_dataclass(SaveSpec, c["save"], "save"),
        recover=recovery,
        refine=refinement,
        quant=quant,
        plan=build_dataclass(PlanSpec, c.get("plan") or {}, "plan"),
        world_size=check_value(c.get("world_size", 1), int, "world_size", ge=1),
        engine=check_value(c.get("engine", "auto"), str, "engine", choices=ENGINES),
        checkpoint_every=check_value(c.get("checkpoint_every", 0), int, "checkpoint_every", ge=0),
        offload=check_value(c.get("offload", False), bool, "offload"),
        calib_inputs=check_value(
            c.get("calib_inputs", "auto"), str, "calib_inputs", choices=("auto", "device", "host")
        ),
        calib_batch=check_value(c.get("calib_batch", 1), int, "calib_batch", ge=1),
    )
    # Options that change nothing for this run: say so once, never silently ignore them.
    if ramp.kind != "constant" and not pruner.iterative:
        log.warning(
            "schedule.ramp (%s) does nothing for the one-shot method '%s'; it prunes to the target "
            "at once",
            ramp.kind,
            pruner.name,
        )
    if pruner.structured and (pattern.is_nm or specs.schedule.allocation != "uniform"):
        raise SparsebenchError(
            f"method={pruner.name} removes {STRUCTURES[pruner.structured]}: its sparsity is the "
            f"share of the blocks' weights removed; pattern={pattern} schedule="
            f"{specs.schedule.allocation} do not apply: use pattern=unstructured schedule=uniform"
        )
    if pruner.structured and recovery is not None and recovery.needs_dense:
        raise SparsebenchError(
            f"recover={recovery.name} matches each pruned block to its dense twin, and "
            f"method={pruner.name} removes blocks: use recover=finetune or recover=perp (healing)"
        )
    if specs.schedule.allocation != "uniform":
        if pruner.name == "dense":
            raise SparsebenchError(
                f"schedule={specs.schedule.allocation} allocates sparsity over blocks, but "
                "method=dense "
                f"prunes nothing; use schedule=uniform"
            )
        if pattern.is_nm:
            raise SparsebenchError(
                f"schedule={specs.schedule.allocation} gives blocks different sparsities, but "
                "pattern "
                f"{pattern} fixes every block at 0.5; use pattern=unstructured or schedule=uniform"
            )
    speed = specs.eval.speed
    if speed.enabled and speed.kernels:  # a kernel that cannot run here: before any work
        where = (specs.device, str(specs.pattern))
        refused = [why for k in speed.kernels if (why := unavailable(k, *where, {}))]
        if refused:
            fits = ", ".join(kernels_for(*where)) or "none"
            raise SparsebenchError(
                f"eval.speed.kernels: {refused[0]}; kernels for {specs.device.type} and "
                f"{specs.pattern}: {fits} (or [] for all of them)"
            )
    if specs.schedule.allocation == "evopress":
        walker = pruner.refinable()
        ok = walker is not None and not getattr(pruner, "lowrank", False)
        ok = ok and type(walker).prune_block is LayerwisePruner.prune_block
        if not ok or refinement is not None or pruner.permutes_columns:
            able = sorted(n for n in METHODS.names() if _walks_alone(n))
            why = "with a refinement" if refinement is not None else f"method={pruner.name}"
            raise SparsebenchError(
                "schedule=evopress builds its level database from a one-shot method's masks of "
                f"each linear alone; {why} has none: use one of {', '.join(able)}"
            )
    if specs.schedule.allocation == "evopress":  # the search's pool holds its largest stage
        evo = specs.schedule.evopress or EvoPressSearch()
        windows = min(evo.kl_windows or specs.data.nsamples, specs.data.nsamples)
        pool = windows * specs.model.seqlen
        if max(evo.tokens) > pool:
            raise SparsebenchError(
                f"schedule.evopress.tokens={list(evo.tokens)}: the search draws from {windows} "
                f"calibration windows of {specs.model.seqlen} ({pool} tokens); lower the tokens "
                "or raise schedule.evopress.kl_windows / data.nsamples"
            )
    if owl is not None and specs.schedule.allocation != "owl":
        log.warning(
            "schedule.owl is set but schedule.allocation=%s: the OWL options do nothing",
            specs.schedule.allocation,
        )
    if specs.checkpoint_every and not pruner.distributed:
        log.warning(
            "checkpoint_every=%d does nothing for '%s': only whole-model training (Elsa, Elsa-L) "
            "checkpoints",
            specs.checkpoint_every,
            pruner.name,
        )
    if specs.calib_batch > 1 and not isinstance(pruner, LayerwisePruner):
        log.warning(
            "calib_batch=%d does nothing for '%s': only the layer-by-layer one-shot methods batch "
            "windows",
            specs.calib_batch,
            pruner.name,
        )
    if specs.save.format == "quantized" and specs.save.enabled:
        q = specs.quant
        if q is None:
            raise SparsebenchError(
                "save.format=quantized stores the codes of a quantized run: add quant=rtn or "
                "quant=gptq, or use save.format=dense or bitmask"
            )
        if getattr(q, "act_order", False) and not getattr(q, "static_groups", False):
            raise SparsebenchError(
                "save.format=quantized: quant.act_order=true takes each group's grid in the "
                "permuted column order, which the packed format cannot store; add "
                "quant.static_groups=true"
            )
    if specs.save.dir and not specs.save.enabled:
        log.warning("save.dir is set but save.enabled=false: nothing will be saved")
    return specs


def check_data_files(specs: Specs) -> tuple[dict[str, str], dict[str, str]]:
    """Check every local file the run will read, now (missing, empty, corrupt, too short),
    not after the model has loaded. Returns the content digests of (all of them, the ones
    the evaluation reads)."""
    d = specs.data
    zs = specs.eval.zeroshot
    if specs.model.random_weights:
        return {}, {}  # random token ids, no evaluation: no data file is read
    zs.check_source(d.source, d.root)
    if d.source != "local":
        return {}, {}
    evals = {datamod.eval_file(n) for n in specs.eval.datasets}
    reads = evals | ({datamod.calibration_file(d)} if specs.reads_calibration else set())
    digests = {rel: datamod.check_file(d, rel) for rel in sorted(reads)}
    for rel in zs.local_files():
        digests[rel] = datamod.file_digest(Path(d.root) / rel)
    eval_digests = {
        rel: h for rel, h in digests.items() if rel in evals or rel.startswith("zeroshot/")
    }
    return digests, eval_digests


def saved_targets(meta: dict[str, Any], model, linears) -> float | dict[str, float]:
    """The targets an exported model's masks were verified against (per block under OWL)."""
    if meta.get("linear_targets"):  # a searched allocation (EvoPress): each linear's own
        return {n: float(meta["linear_targets"][n]) for n in linears}
    if "mask_sparsity" in meta:  # the masks of a part beside its factors (OATS)
        if not meta.get("mask_block_targets"):
            return meta["mask_sparsity"]
        return targets_by_linear(model, list(meta["mask_block_targets"]), linears)
    if not meta.get("block_targets"):
        return meta["sparsity"]
    return targets_by_linear(model, list(meta["block_targets"]), linears)
