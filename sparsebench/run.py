"""The pipeline, top to bottom: specs -> claim -> model -> calibration -> prune -> verify -> evaluate -> record.

Before any heavy work a run validates every option, checks its data files and output
folders, claims its folder (sparsebench/records/ledger.py) and compares its fingerprint with a
result already there: the same run is skipped (resume), another config's complete
result is never overwritten.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import data as datamod
from .records import ledger
from .errors import Interrupted, SparsebenchError
from .evaluation.perplexity import EvalSpec, perplexity, place_for_eval
from .records.export import check_save_dir, load_saved, save_pruned
from .allocation import allocate
from .masks import summarize, verify
from .models import ModelSpec, load_model, prunable_linears
from .pruners import PruneContext, Pruner
from .pruners.base import targets_by_linear
from .pruners.layerwise import LayerwisePruner
from .plan import PlanSpec, build_plan, check_fits, eval_placement, fit_verdict, fits, knobs_of, shapes_of
from .engine.shard import ENGINES, backend, share_pruned
from .recover import RECOVERIES, RecoverContext
from .registry import METHODS, build_dataclass, check_value
from .sparsity import OWL, Pattern, Ramp, Schedule, check_sparsity, parse_pattern
from .records.tracking import LoggerSpec, Results, WandbLogger, peak_memory, stage_peak
from .engine.training import Budget, sync_cuda  # noqa: F401 (scripts import sync_cuda from here)

log = logging.getLogger(__name__)


@dataclass
class SaveSpec:
    enabled: bool = False
    dir: str | None = None


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
    plan: Any = None  # PlanSpec
    world_size: int = 1  # ranks to plan for (dry runs)
    engine: str = "auto"  # asked for: auto | single | ddp | fsdp (sparsebench/engine/shard.py)
    run_engine: str = "single"  # what runs: set by memory_plan (resolve_engine)
    offload: bool = False  # FSDP2 CPU offload (engine=fsdp; sparsebench/engine/shard.py)
    calib_inputs: str = "auto"  # asked for: auto | device | host (engine/driver.py)
    run_inputs: str = "device"  # what runs: set by memory_plan
    calib_batch: int = 1  # one-shot methods: windows per forward through a block (engine/driver.py)
    checkpoint_every: int = 0  # training checkpoints every N steps (sparsebench/engine/checkpoint.py)

    @property
    def needs_calibration(self) -> bool:
        return self.pruner.needs_calibration or self.schedule.needs_calibration

    @property
    def reads_calibration(self) -> bool:
        """The calibration pool's file is part of the run's identity."""
        return self.pruner.reads_calibration or self.schedule.needs_calibration


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
        raise SparsebenchError(f"device={name} is not supported by sparsebench (valid here: {valid})")
    if device.type == "cuda" and not cuda:
        raise SparsebenchError(f"device={name} but no CUDA GPU is visible to this torch build; valid here: {valid}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SparsebenchError(f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible; valid here: {valid}")
    return device


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
    pattern = parse_pattern(check_value(c["pattern"], str, "pattern"))
    sched = dict(c["schedule"])
    ramp = build_dataclass(Ramp, sched.pop("ramp", {}) or {}, "schedule.ramp")
    owl = sched.pop("owl", None)
    if owl is not None or sched.get("allocation") == "owl":
        owl = build_dataclass(OWL, owl or {}, "schedule.owl")
    for key in ("resume", "dense_baseline", "dry_run"):
        check_value(c.get(key, False), bool, key)
    model = build_dataclass(ModelSpec, c["model"], "model")
    specs = Specs(
        model=model,
        pruner=pruner,
        sparsity=0.0 if pruner.name == "dense" else check_sparsity(c["sparsity"], pattern),
        pattern=Pattern() if pruner.name == "dense" else pattern,
        schedule=build_dataclass(Schedule, {**sched, "ramp": ramp, "owl": owl}, "schedule"),
        # a random-weight model reads random ids, no data file: it runs where no data root is
        data=build_dataclass(datamod.DataSpec, {**c["data"], "needs_files": not model.random_weights}, "data"),
        eval=build_dataclass(EvalSpec, c["eval"], "eval"),
        device=resolve_device(str(c["device"]), planning=bool(c.get("dry_run", False))),
        seed=seed,
        logger=build_dataclass(LoggerSpec, c["logger"], "logger"),
        save=build_dataclass(SaveSpec, c["save"], "save"),
        recover=recovery,
        plan=build_dataclass(PlanSpec, c.get("plan") or {}, "plan"),
        world_size=check_value(c.get("world_size", 1), int, "world_size", ge=1),
        engine=check_value(c.get("engine", "auto"), str, "engine", choices=ENGINES),
        checkpoint_every=check_value(c.get("checkpoint_every", 0), int, "checkpoint_every", ge=0),
        offload=check_value(c.get("offload", False), bool, "offload"),
        calib_inputs=check_value(c.get("calib_inputs", "auto"), str, "calib_inputs", choices=("auto", "device", "host")),
        calib_batch=check_value(c.get("calib_batch", 1), int, "calib_batch", ge=1),
    )
    # Options that change nothing for this run: say so once, never silently ignore them.
    if ramp.kind != "constant" and not pruner.iterative:
        log.warning("schedule.ramp (%s) does nothing for the one-shot method '%s'; it prunes to the target at once",
                    ramp.kind, pruner.name)
    if specs.schedule.allocation != "uniform":
        if pruner.name == "dense":
            raise SparsebenchError(f"schedule={specs.schedule.allocation} allocates sparsity over blocks, but method=dense "
                                   f"prunes nothing; use schedule=uniform")
        if pattern.is_nm:
            raise SparsebenchError(f"schedule={specs.schedule.allocation} gives blocks different sparsities, but pattern "
                                   f"{pattern} fixes every block at 0.5; use pattern=unstructured or schedule=uniform")
    if owl is not None and specs.schedule.allocation != "owl":
        log.warning("schedule.owl is set but schedule.allocation=%s: the OWL options do nothing",
                    specs.schedule.allocation)
    if specs.checkpoint_every and not pruner.distributed:
        log.warning("checkpoint_every=%d does nothing for '%s': only whole-model training (Elsa, Elsa-L) checkpoints",
                    specs.checkpoint_every, pruner.name)
    if specs.calib_batch > 1 and not isinstance(pruner, LayerwisePruner):
        log.warning("calib_batch=%d does nothing for '%s': only the layer-by-layer one-shot methods batch windows",
                    specs.calib_batch, pruner.name)
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
    eval_digests = {rel: h for rel, h in digests.items() if rel in evals or rel.startswith("zeroshot/")}
    return digests, eval_digests


def saved_targets(meta: dict[str, Any], model, linears) -> float | dict[str, float]:
    """The targets an exported model's masks were verified against (per block under OWL)."""
    if not meta.get("block_targets"):
        return meta["sparsity"]
    return targets_by_linear(model, list(meta["block_targets"]), linears)


def run_worker(specs: Specs, workdir: Path | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    """Ranks > 0 under torchrun: load, join the training, write nothing but their checkpoint
    shards (rank 0 records)."""
    model, tok = load_model(specs.model, specs.seed)
    if not specs.pruner.distributed:  # a sharded recovery: rank 0 prunes, every rank fine-tunes
        masks = share_pruned(model, None, str(fingerprint))
        specs.recover.run(recover_context(specs, model, masks, tok))
        return {"metrics": {}}
    ctx = PruneContext(model, specs.sparsity, specs.pattern, specs.schedule, specs.device,
                       tokenizer=tok, data=specs.data, seqlen=specs.model.seqlen, engine=specs.run_engine,
                       offload=specs.offload, workdir=workdir, fingerprint=fingerprint,
                       checkpoint_every=specs.checkpoint_every)
    specs.pruner.prune(ctx)
    return {"metrics": {}}


def recover_context(specs: Specs, model, masks, tok, log=lambda metrics: None) -> RecoverContext:
    return RecoverContext(model, masks, specs.device, tok, specs.data, specs.model.seqlen,
                          load_dense=lambda: load_model(specs.model, specs.seed)[0], log=log,
                          engine=specs.run_engine, offload=specs.offload)


@contextmanager
def timed(results: Results, key: str):
    sync_cuda()
    start = time.perf_counter()
    yield
    sync_cuda()  # CUDA work is asynchronous: a phase ends when its kernels have finished
    results.update(timings_s={key: round(time.perf_counter() - start, 3)})


_own_group = False  # a one-process group init_distributed made (offload): ended with its run


def end_own_group() -> None:
    import torch.distributed as dist

    global _own_group
    if _own_group and dist.is_initialized():
        dist.destroy_process_group()
    _own_group = False


def init_distributed(specs: Specs) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group; in one process FSDP2
    (offload=true) gets a group of one. Returns this rank."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        if specs.run_engine == "fsdp" and not dist.is_initialized():  # offload on one process: a group of one
            dist.init_process_group(backend(specs.device, specs.offload), store=dist.HashStore(), rank=0, world_size=1)
            global _own_group
            _own_group = True
        return 0
    if not specs.pruner.distributed and specs.run_engine != "fsdp":  # fsdp: a sharded recovery after it
        raise SparsebenchError(
            f"method '{specs.pruner.name}' runs in one process; launch it without torchrun "
            f"(multi-process methods: {', '.join(n for n in METHODS.names() if METHODS.get(n).distributed)})"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend(specs.device, specs.offload))
    if specs.device.type == "cuda":
        torch.cuda.set_device(specs.device)
    choice = [specs.run_engine]  # engine=auto read each rank's free memory: rank 0's choice holds for all
    dist.broadcast_object_list(choice, src=0)
    specs.run_engine = choice[0]
    return dist.get_rank()


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that cannot be resolved
        raise SparsebenchError(f"the config cannot be resolved: {str(err).splitlines()[0]}") from None


def resume_decision(existing: dict[str, Any] | None, fp: dict[str, Any], resume: bool, out_dir: Path) -> bool:
    """True if `existing` (the folder's results.json) is this run's complete result and may
    be returned as it is; raises if the folder holds a complete result of another config."""
    if existing is None or existing.get("status") != "complete":
        return False  # nothing, or a failed or interrupted attempt: run (again)
    old = ledger.stored_fingerprint(existing)
    if old["digest"] == fp["digest"]:
        return resume
    diffs = ledger.differences(old, fp) if old["digest"] else ["it was written before run fingerprints existed"]
    shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
    raise SparsebenchError(
        f"{out_dir} holds a complete result of another config ({shown}); sparsebench never overwrites it: "
        f"choose another hydra.run.dir (hydra.sweep.dir for a sweep) or move that folder away"
    )


def save_folder(specs: Specs, out_dir: Path, sweep_dir: Path | None) -> Path:
    """<run folder>/model, or save.dir; in a sweep save.dir gets one subfolder per job."""
    if not specs.save.dir:
        return out_dir / "model"
    return Path(specs.save.dir) / out_dir.name if sweep_dir is not None else Path(specs.save.dir)


# What happened to each job and baseline of this process (the sweep's closing summary):
# folder -> "done" | "skipped" | "failed" (jobs), and the dense baselines apart.
OUTCOMES: dict[str, str] = {}
BASELINES: dict[str, str] = {}
WANDB_LINES: dict[str, str] = {}  # folder -> where its wandb run went (the summary's one wandb line)


def dense_baseline(cfg: DictConfig, sweep_dir: Path, protocol: str) -> None:
    """The dense model under this job's evaluation protocol, once per protocol in a sweep:
    <sweep>/dense_<model>_<protocol id>. Its failure is logged, never the job's."""
    dense_cfg = cfg.copy()
    OmegaConf.set_struct(dense_cfg, False)
    dense_cfg.method = {"name": "dense"}
    dense_cfg.recover = {"name": "none"}
    dense_cfg.save.enabled = False
    dense_cfg.resume = True
    folder = sweep_dir / f"dense_{cfg.model.name}_{protocol[:8]}"
    if BASELINES.get(str(folder)) in ("ran", "reused"):
        return  # this process already has it
    log.info("dense baseline of this evaluation protocol: %s", folder)
    try:
        run(dense_cfg, folder, baseline=True)
        BASELINES[str(folder)] = "reused" if OUTCOMES.pop(str(folder), "") == "skipped" else "ran"
    except ledger.FolderBusy as err:
        log.info("dense baseline: %s", err)
        BASELINES[str(folder)] = "busy in another process"
    except Exception as err:
        OUTCOMES.pop(str(folder), None)
        BASELINES[str(folder)] = "failed"
        log.warning("dense baseline in %s failed (%s); the report has no %% of dense for this protocol", folder, err)


def _save_hydra_files(cfg: DictConfig, out_dir: Path) -> None:
    """Hydra's record of the job (.hydra/), written only for a run that really runs here
    (config.yaml sets hydra.output_subdir to null so Hydra does not overwrite it first)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    folder = out_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), folder / "overrides.yaml")


def memory_plan(specs: Specs, world: int):
    """(plan, shapes) for this run from the model's meta-device shapes (sparsebench/plan.py);
    resolves the engine on the way (specs.run_engine)."""
    from .models import check_block_coverage, meta_model

    meta = meta_model(specs.model)
    check_block_coverage(meta)  # nothing of a block silently left dense (MoE experts, routers)
    shapes = shapes_of(meta)
    specs.run_engine = resolve_engine(specs, world, shapes)
    specs.run_inputs = "device" if specs.calib_inputs == "auto" else specs.calib_inputs
    plan = build_plan(specs.model.name, shapes, knobs_of(specs, world))
    if specs.calib_inputs == "auto" and plan.knobs.kind == "oneshot" and not fits(plan, specs.plan, specs.device):
        host = build_plan(specs.model.name, shapes, replace(plan.knobs, inputs="host"))
        if fits(host, specs.plan, specs.device):  # the inputs do not fit the GPU beside the block: keep them on the host
            specs.run_inputs, plan = "host", host
    plan.eval = eval_placement(shapes, specs.eval.batch_size, specs.model.seqlen, visible_gpus(specs), specs.plan.margin)
    return plan, shapes


def visible_gpus(specs: Specs) -> list[float] | None:
    """GiB of each GPU evaluation may use: the visible ones (plan.device_limit_gib overrides
    their size); [] on the CPU; None when a dry run plans for GPUs it cannot see."""
    if specs.device.type != "cuda":
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if specs.plan.device_limit_gib is not None:
        return [specs.plan.device_limit_gib] * max(count, 1)
    return [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(count)] or None


def resolve_engine(specs: Specs, world: int, shapes=None) -> str:
    """single | ddp | fsdp for this run. auto: one process -> single; several -> DDP when
    its per-rank plan (every rank holds all the state) fits the visible memory, else FSDP2."""
    engine, name = specs.engine, specs.pruner.name  # build_specs checked it against ENGINES
    if not specs.pruner.distributed and getattr(specs.recover, "shardable", False) and (specs.offload or world > 1):
        # a one-shot method on rank 0, then masked fine-tuning sharded with FSDP2 over the
        # ranks (or, with offload=true, in this one process)
        if engine in ("single", "ddp"):
            raise SparsebenchError(f"recover={specs.recover.name} on several ranks or with offload=true runs on "
                                   f"FSDP2, but engine={engine}; use engine=fsdp or auto")
        return "fsdp"
    if not specs.pruner.distributed:
        if engine in ("ddp", "fsdp") or specs.offload:
            what = f"engine={engine}" if engine in ("ddp", "fsdp") else "offload=true"
            raise SparsebenchError(f"{what} is for whole-model training (elsa, elsa_l; offload=true also for "
                                   f"recover=finetune); method '{name}' runs in one process (valid for it: engine=auto "
                                   f"or single, offload=false)")
        return "single"
    if specs.offload:  # CPU offload is FSDP2's: one process runs it as a group of one
        if engine in ("single", "ddp"):
            raise SparsebenchError(f"offload=true is FSDP2's CPU offload, but engine={engine}; use engine=fsdp or auto")
        return "fsdp"
    if world == 1:
        if engine in ("ddp", "fsdp"):
            raise SparsebenchError(f"engine={engine} needs several processes: launch with torchrun --nproc_per_node=N "
                                   f"(sparsebench dry_run=true world_size=N engine={engine} ... plans it); "
                                   f"on one GPU, FSDP2 runs with offload=true")
        return "single"
    if engine == "single":
        raise SparsebenchError(f"engine=single but {world} processes were launched; valid with torchrun: auto, ddp, fsdp")
    if engine == "auto":
        ddp = build_plan(specs.model.name, shapes, knobs_of(replace(specs, run_engine="ddp"), world)) \
            if shapes is not None else None
        engine = "ddp" if ddp is None or fits(ddp, specs.plan, specs.device) else "fsdp"
    return engine


def dry_run(specs: Specs) -> dict[str, Any]:
    """Print the plan and its verdict and return them; nothing is loaded, claimed or written
    (the model's config alone gives the shapes)."""
    plan, shapes = memory_plan(specs, specs.world_size)
    if specs.world_size > 1 and plan.knobs.kind != "train":
        print(f"{specs.pruner.name} runs in one process: planned for 1 rank (world_size={specs.world_size} ignored)")
    print(plan.table())
    ok, verdict = fit_verdict(plan, shapes, specs.plan, specs.device)
    print(f"verdict: {verdict}")
    return {"plan": plan.as_dict(), "metrics": {}, "fits": ok, "verdict": verdict}


def slurm_ranks() -> None:
    """Under SLURM with several tasks (hydra/launcher=slurm, tasks_per_node > 1) and no torchrun:
    set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's variables (submitit's helper)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise SparsebenchError("several SLURM tasks but no torchrun: install hydra-submitit-launcher "
                               "(make install-slurm) or launch with torchrun") from None
    TorchDistributedEnvironment().export()


def run(cfg: DictConfig, out_dir: Path, sweep_dir: Path | None = None, baseline: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    if sweep_dir is not None and (old := ledger.legacy_job_folder(out_dir)) is not None:
        log.info("this job's folder from an earlier version: %s", old)
        try:
            out_dir.rmdir()  # the new name Hydra made, still empty
        except OSError:
            pass
        out_dir = old
    slurm_ranks()
    config = _resolved(cfg)
    if cfg.get("dry_run", False):
        return dry_run(build_specs(cfg))
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun only rank 0 claims and records
        specs = build_specs(cfg)
        files, _ = check_data_files(specs)
        config["device"] = specs.device.type
        fp = ledger.fingerprint(config, files, needs_calibration=specs.reads_calibration,
                                dense=specs.pruner.name == "dense")
        if resume_decision(ledger.previous_results(out_dir, move_aside=False), fp, bool(cfg.get("resume", True)), out_dir):
            return {"metrics": {}}
        memory_plan(specs, int(os.environ.get("WORLD_SIZE", 1)))  # resolves and checks the engine
        init_distributed(specs)
        return run_worker(specs, out_dir, fp["digest"])
    ledger.check_writable(out_dir, "run folder", "set hydra.run.dir=<folder> (hydra.sweep.dir in a sweep)")
    with ledger.claim(out_dir):
        key = str(out_dir)
        OUTCOMES[key] = "failed"
        res = _run_claimed(cfg, config, out_dir, sweep_dir, baseline)
        if OUTCOMES[key] != "skipped":  # _run_claimed marks a resumed job
            OUTCOMES[key] = "done"
        return res


def _run_claimed(cfg: DictConfig, config: dict[str, Any], out_dir: Path, sweep_dir: Path | None,
                 baseline: bool = False) -> dict[str, Any]:
    existing = ledger.previous_results(out_dir)
    # Refused before any work (a SparsebenchError from here to check_fits): nothing is written,
    # and cli.py removes the folder Hydra made.
    specs = build_specs(cfg)
    files, eval_files = check_data_files(specs)
    # an exported pruned model's masks and metadata are read now, not after loading it
    local = specs.model.source == "local" and Path(specs.model.path).is_dir()
    saved = load_saved(specs.model.path) if local else None
    if specs.recover is not None and specs.pruner.name == "dense" and saved is None:
        raise SparsebenchError("a recovery stage needs masks: choose a pruning method, or method=dense on a "
                               "saved sparsebench export (model=local model.path=<export>)")
    # the memory plan from the model's config alone (this also checks seqlen against it)
    plan, shapes = memory_plan(specs, int(os.environ.get("WORLD_SIZE", 1)))
    config["device"] = specs.device.type  # "auto" means different things on different machines
    dense = specs.pruner.name == "dense"
    fp = ledger.fingerprint(config, files, needs_calibration=specs.reads_calibration, dense=dense)
    protocol = ledger.protocol_id(config, eval_files)
    if sweep_dir is not None and cfg.get("dense_baseline", False) and not dense:
        dense_baseline(cfg, sweep_dir, protocol)  # also when this job is done: a deleted baseline comes back
    if resume_decision(existing, fp, bool(cfg.get("resume", True)), out_dir):
        OUTCOMES[str(out_dir)] = "skipped"
        if baseline:
            log.info("dense baseline already complete in %s: reused", out_dir)
        else:
            log.info("already complete in %s: not run again (resume=false runs it again)", out_dir)
        return existing
    save_dir = save_folder(specs, out_dir, sweep_dir) if specs.save.enabled else None
    if save_dir is not None:  # before the expensive part: never delete what is not ours
        check_save_dir(save_dir, fp["digest"])
        ledger.check_writable(save_dir.parent, "save folder", "set save.dir=<writable folder>")

    check_fits(plan, shapes, specs.plan, specs.device)  # before anything loads; a refusal writes nothing

    init_distributed(specs)  # under torchrun: join the ranks (they wait for rank 0 here)
    _save_hydra_files(cfg, out_dir)
    file_log = logging.FileHandler(out_dir / "run.log")
    file_log.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(file_log)
    # lm-eval's per-document notes (truncated contexts, ...) go to run.log only, not the console
    consoles = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    for h in consoles:
        h.addFilter(_quiet_harness)
    torch.manual_seed(specs.seed)
    results = Results(out_dir / "results.json", config, specs.seed, fingerprint=fp, protocol_id=protocol,
                      plan=plan.as_dict())
    logger = None
    exit_code = 1
    try:
        lg = specs.logger
        logger = WandbLogger(
            lg.mode, lg.project, lg.entity, lg.group or (sweep_dir.name if sweep_dir else None),
            name=f"{specs.pruner.name}-{specs.sparsity}-{specs.pattern}-{specs.model.name}",
            config=config, directory=out_dir,
        )
        data = _pipeline(specs, results, logger, saved, save_dir, fp["digest"], out_dir)
        exit_code = 0
        return data
    except BaseException as err:
        fields: dict[str, Any] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        if isinstance(err, (KeyboardInterrupt, Interrupted)):
            fields.update(error=f"interrupted ({'SIGINT' if isinstance(err, KeyboardInterrupt) else err})", reason="interrupted")
        elif isinstance(err, SparsebenchError):
            fields.update(error=str(err))
        else:
            fields.update(traceback=traceback.format_exc())
        results.update(**fields, memory=peak_memory(specs.device))
        raise
    finally:
        end_own_group()
        if logger is not None:
            logger.finish({**results.data["metrics"], "status": results.data["status"]}, exit_code)
            if getattr(logger, "where", None):
                WANDB_LINES[str(out_dir)] = logger.where
        logging.getLogger().removeHandler(file_log)
        file_log.close()
        for h in consoles:
            h.removeFilter(_quiet_harness)


def _quiet_harness(record: logging.LogRecord) -> bool:
    """Console filter: lm-eval's records below ERROR stay in run.log."""
    return not (record.name.startswith("lm_eval") and record.levelno < logging.ERROR)


def _pipeline(specs: Specs, results: Results, logger: WandbLogger, saved: tuple | None, save_dir: Path | None,
              fingerprint: str, workdir: Path | None = None) -> dict[str, Any]:
    with timed(results, "load"):
        model, tok = load_model(specs.model, specs.seed)  # checks seqlen on the config before the weights
    results.update(model={"class": type(model).__name__, "seqlen": specs.model.seqlen,
                          "params": sum(p.numel() for p in model.parameters()),
                          "random_weights": specs.model.random_weights})

    calib = None
    stage_peak(specs.device)  # the prune stage's peak starts here
    if specs.needs_calibration:
        with timed(results, "calibrate"):
            calib = datamod.calibration(specs.data, tok, specs.model.seqlen, model.config.vocab_size)
        results.update(calibration={"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1])})
    allocation = None
    if specs.schedule.needs_calibration:  # schedule=owl: per-block targets from the dense model
        with timed(results, "allocate"):
            allocation = allocate(specs.schedule, model, calib, specs.sparsity, specs.pattern, specs.pruner.group,
                                  specs.device)
        results.update(allocation=allocation.report)

    ctx = PruneContext(model, specs.sparsity, specs.pattern, specs.schedule, specs.device, calib,
                       tokenizer=tok, data=specs.data, seqlen=specs.model.seqlen, log=logger.log,
                       block_targets=allocation.targets if allocation else None, engine=specs.run_engine,
                       offload=specs.offload, inputs=specs.run_inputs, calib_batch=specs.calib_batch, fresh_model=lambda: load_model(specs.model, specs.seed)[0], workdir=workdir, fingerprint=fingerprint,
                       checkpoint_every=specs.checkpoint_every)
    results.update(engine=specs.run_engine, world_size=int(os.environ.get("WORLD_SIZE", 1)), offload=specs.offload)
    with timed(results, "prune"):
        masks = specs.pruner.prune(ctx)
    model = ctx.model  # FSDP2 hands back an unsharded model (PruneContext.engine)
    if specs.pruner.report():
        results.update(method_report=specs.pruner.report())
    spent = Budget(calib_tokens=int(calib.numel()) if calib is not None else 0).add(specs.pruner.budget())
    wall = sum(results.data["timings_s"].get(k, 0.0) for k in ("calibrate", "allocate", "prune"))
    results.update(budget={"prune": {**spent.as_dict(), "wall_s": round(wall, 3), "peak_mem_gib": stage_peak(specs.device)}})
    linears = prunable_linears(model)
    targets = ctx.targets(linears) if allocation else specs.sparsity  # what each mask must prune
    if specs.pruner.name != "dense":
        per_tensor = verify(linears, masks, targets, specs.pattern, specs.pruner.group)
    elif saved is not None:  # eval-only on an exported pruned model: its masks still hold
        saved_masks, meta = saved
        per_tensor = verify(linears, saved_masks, saved_targets(meta, model, linears), parse_pattern(meta["pattern"]),
                            meta["group"])
        results.update(loaded_pruned_model=meta)
    else:
        per_tensor = {n: float((l.weight == 0).float().mean()) for n, l in linears.items()}
    if specs.recover is not None:  # the masks are frozen: trained around, then verified again
        frozen = masks if specs.pruner.name != "dense" else saved[0]
        if specs.run_engine == "fsdp" and not specs.pruner.distributed and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            share_pruned(model, frozen, fingerprint)  # the other ranks waited for this pruned model
        rctx = recover_context(specs, model, frozen, tok, logger.log)
        with timed(results, "recover"):
            specs.recover.run(rctx)
        model = rctx.model  # offloaded (FSDP2) fine-tuning hands back a plain model
        linears = prunable_linears(model)
        if specs.pruner.name != "dense":
            per_tensor = verify(linears, masks, targets, specs.pattern, specs.pruner.group)
        else:
            per_tensor = verify(linears, saved[0], saved_targets(meta, model, linears), parse_pattern(meta["pattern"]),
                                meta["group"])
        results.update(recover_report=specs.recover.report(),
                       budget={"recover": {**specs.recover.budget().as_dict(), "wall_s": results.data["timings_s"]["recover"],
                                           "peak_mem_gib": stage_peak(specs.device)}})
    summary = summarize(per_tensor, linears)
    nonzero = sum(p.numel() for p in model.parameters()) - summary["pruned_params"]  # Elsa's Figure 3 axis
    results.update(sparsity={"target": specs.sparsity, "pattern": str(specs.pattern), **summary, "nonzero_params": nonzero},
                   per_layer_sparsity=per_tensor)
    logger.table("per_layer_sparsity", ["linear", "sparsity"], [[n, s] for n, s in per_tensor.items()])
    sp = results.data["sparsity"]
    if specs.pruner.name != "dense" or saved is not None:
        log.info("sparsity: target %s, actual %.6f over %d prunable weights", sp["target"], sp["actual_sparsity"],
                 sp["prunable_params"])

    if save_dir is not None:
        meta = {"method": specs.pruner.name, "sparsity": specs.sparsity, "pattern": str(specs.pattern),
                "block_targets": allocation.targets if allocation else None,
                "group": specs.pruner.group, "seed": specs.seed, "model": specs.model.name, "fingerprint": fingerprint,
                "data": {"source": specs.data.source, "calib_set": specs.data.calib_set,
                         "nsamples": specs.data.nsamples, "seqlen": specs.model.seqlen},
                # what `model=local model.path=<export> method=dense` needs to evaluate it as this run did
                "dtype": specs.model.dtype,
                "evaluation": {"protocol": results.data["config"].get("protocol"), "nsamples": specs.data.nsamples,
                               "max_windows": specs.eval.max_windows, "batch_size": specs.eval.batch_size,
                               "datasets": list(specs.eval.datasets)}}
        with timed(results, "save"):
            folder = save_pruned(model, tok, masks, save_dir, meta)
        results.update(saved_model=str(folder))

    if specs.model.random_weights:  # a measurement run: the perplexity of random weights is no result
        log.info("random weights (model.source=random): no quality evaluation")
        results.update(memory=peak_memory(specs.device), evaluation="skipped: random weights", status="complete")
        return results.data
    placement = results.data["plan"]["eval"]
    place_for_eval(model, specs.device, placement, specs.plan.margin)  # one GPU, or a device map over several
    results.update(eval_placement=placement["placement"])
    for name in specs.eval.datasets:
        with timed(results, f"eval_{name}"):
            ids = datamod.eval_stream(specs.data, name, tok, specs.model.seqlen)
            ppl, windows = perplexity(model, ids, specs.model.seqlen, specs.device,
                                      specs.eval.batch_size, specs.eval.max_windows, desc=name)
        results.update(metrics={name: ppl, f"{name}_windows": windows})
        logger.log({f"ppl/{name}": ppl})
        log.info("%s perplexity %.4f over %d windows of %d", name, ppl, windows, specs.model.seqlen)

    zs = specs.eval.zeroshot
    if zs.tasks:
        from .models import cache_root
        from .evaluation.zeroshot import evaluate_zeroshot

        with timed(results, "eval_zeroshot"):
            out = evaluate_zeroshot(model, tok, zs, specs.data.source, specs.data.root, specs.device, cache_root())
        results.update(zeroshot=out, metrics={**{t: v["headline"] for t, v in out["tasks"].items()}, "mean_acc": out["mean_acc"]})
        logger.log({f"zeroshot/{t}": v["headline"] for t, v in out["tasks"].items()} | {"zeroshot/mean_acc": out["mean_acc"]})
        logger.table("zeroshot", ["task", "acc", "acc_norm", "n"],
                     [[t, v.get("acc"), v.get("acc_norm"), v["n"]] for t, v in out["tasks"].items()])

    results.update(memory=peak_memory(specs.device), status="complete")
    return results.data
