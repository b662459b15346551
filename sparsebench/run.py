"""A run of the command, top to bottom: specs -> claim -> plan -> stages -> record.

Before any heavy work a run validates every option (specs.py), checks its data files and
output folders, claims its folder (records/ledger.py), plans its memory and resolves what
runs (launch.py), and compares its fingerprint with a result already there: the same run is
skipped (resume), another config's complete result is never overwritten. The work itself is
the stages of pipeline.py, each recorded in results.json with its time.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import pipeline
from .engine.shard import share_pruned
from .engine.training import Budget, sync_cuda  # noqa: F401 (scripts import sync_cuda from here)
from .errors import Interrupted, SparsebenchError
from .evaluation.perplexity import place_for_eval
from .launch import (
    Launch,
    dry_run,
    end_own_group,
    init_distributed,
    memory_plan,
    resolve_engine,
    slurm_ranks,
)  # noqa: F401
from .masks import summarize
from .models import load_model, prunable_linears
from .plan import check_fits
from .pruners import PruneContext
from .records import ledger
from .records.export import check_save_dir, load_saved, save_pruned
from .records.tracking import Results, WandbLogger, peak_memory, stage_peak
from .recover import RecoverContext
from .sparsity import parse_pattern
from .specs import Specs, build_specs, check_data_files, resolve_device, saved_targets  # noqa: F401

log = logging.getLogger(__name__)


def run_worker(
    specs: Specs, launch: Launch, workdir: Path | None = None, fingerprint: str | None = None
) -> dict[str, Any]:
    """Ranks > 0 under torchrun: load, join the training, write nothing but their checkpoint
    shards (rank 0 records)."""
    model, tok = load_model(specs.model, specs.seed)
    if not specs.pruner.distributed:  # a sharded recovery: rank 0 prunes, every rank fine-tunes
        masks = share_pruned(model, None, str(fingerprint))
        pipeline.recover(specs.recover, recover_context(specs, launch, model, masks, tok))
        return {"metrics": {}}
    ctx = PruneContext(
        model,
        specs.sparsity,
        specs.pattern,
        specs.schedule,
        specs.device,
        tokenizer=tok,
        data=specs.data,
        seqlen=specs.model.seqlen,
        engine=launch.engine,
        offload=launch.offload,
        workdir=workdir,
        fingerprint=fingerprint,
        checkpoint_every=specs.checkpoint_every,
    )
    pipeline.prune(specs.pruner, ctx)
    return {"metrics": {}}


def recover_context(
    specs: Specs, launch: Launch, model, masks, tok, log=lambda metrics: None
) -> RecoverContext:
    return RecoverContext(
        model,
        masks,
        specs.device,
        tok,
        specs.data,
        specs.model.seqlen,
        load_dense=lambda: load_model(specs.model, specs.seed)[0],
        log=log,
        engine=launch.engine,
        offload=launch.offload,
    )


@contextmanager
def timed(results: Results, key: str):
    sync_cuda()
    start = time.perf_counter()
    yield
    sync_cuda()  # CUDA work is asynchronous: a phase ends when its kernels have finished
    results.update(timings_s={key: round(time.perf_counter() - start, 3)})


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that cannot be resolved
        raise SparsebenchError(
            f"the config cannot be resolved: {str(err).splitlines()[0]}"
        ) from None


def resume_decision(
    existing: dict[str, Any] | None, fp: dict[str, Any], resume: bool, out_dir: Path
) -> bool:
    """True if `existing` (the folder's results.json) is this run's complete result and may
    be returned as it is; raises if the folder holds a complete result of another config."""
    if existing is None or existing.get("status") != "complete":
        return False  # nothing, or a failed or interrupted attempt: run (again)
    old = ledger.stored_fingerprint(existing)
    if old["digest"] == fp["digest"]:
        return resume
    diffs = (
        ledger.differences(old, fp)
        if old["digest"]
        else ["it was written before run fingerprints existed"]
    )
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
WANDB_LINES: dict[
    str, str
] = {}  # folder -> where its wandb run went (the summary's one wandb line)


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
        log.warning(
            "dense baseline in %s failed (%s); the report has no %% of dense for this protocol",
            folder,
            err,
        )


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


def run(
    cfg: DictConfig, out_dir: Path, sweep_dir: Path | None = None, baseline: bool = False
) -> dict[str, Any]:
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
        fp = ledger.fingerprint(
            config,
            files,
            needs_calibration=specs.reads_calibration,
            dense=specs.pruner.name == "dense",
        )
        if resume_decision(
            ledger.previous_results(out_dir, move_aside=False),
            fp,
            bool(cfg.get("resume", True)),
            out_dir,
        ):
            return {"metrics": {}}
        _, _, launch = memory_plan(
            specs, int(os.environ.get("WORLD_SIZE", 1))
        )  # resolves and checks the engine
        init_distributed(specs, launch)
        return run_worker(specs, launch, out_dir, fp["digest"])
    ledger.check_writable(
        out_dir, "run folder", "set hydra.run.dir=<folder> (hydra.sweep.dir in a sweep)"
    )
    with ledger.claim(out_dir):
        key = str(out_dir)
        OUTCOMES[key] = "failed"
        res = _run_claimed(cfg, config, out_dir, sweep_dir, baseline)
        if OUTCOMES[key] != "skipped":  # _run_claimed marks a resumed job
            OUTCOMES[key] = "done"
        return res


def _run_claimed(
    cfg: DictConfig,
    config: dict[str, Any],
    out_dir: Path,
    sweep_dir: Path | None,
    baseline: bool = False,
) -> dict[str, Any]:
    existing = ledger.previous_results(out_dir)
    # Refused before any work (a SparsebenchError from here to check_fits): nothing is written,
    # and cli.py removes the folder Hydra made.
    specs = build_specs(cfg)
    files, eval_files = check_data_files(specs)
    # an exported pruned model's masks and metadata are read now, not after loading it
    local = specs.model.source == "local" and Path(specs.model.path).is_dir()
    saved = load_saved(specs.model.path) if local else None
    if specs.recover is not None and specs.pruner.name == "dense" and saved is None:
        raise SparsebenchError(
            "a recovery stage needs masks: choose a pruning method, or method=dense on a "
            "saved sparsebench export (model=local model.path=<export>)"
        )
    # the memory plan from the model's config alone (this also checks seqlen against it)
    plan, shapes, launch = memory_plan(specs, int(os.environ.get("WORLD_SIZE", 1)))
    config["device"] = specs.device.type  # "auto" means different things on different machines
    dense = specs.pruner.name == "dense"
    fp = ledger.fingerprint(config, files, needs_calibration=specs.reads_calibration, dense=dense)
    protocol = ledger.protocol_id(config, eval_files)
    if sweep_dir is not None and cfg.get("dense_baseline", False) and not dense:
        dense_baseline(
            cfg, sweep_dir, protocol
        )  # also when this job is done: a deleted baseline comes back
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

    check_fits(
        plan, shapes, specs.plan, specs.device
    )  # before anything loads; a refusal writes nothing

    init_distributed(specs, launch)  # under torchrun: join the ranks (they wait for rank 0 here)
    _save_hydra_files(cfg, out_dir)
    file_log = logging.FileHandler(out_dir / "run.log")
    file_log.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(file_log)
    # lm-eval's per-document notes (truncated contexts, ...) go to run.log only, not the console
    consoles = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    for h in consoles:
        h.addFilter(_quiet_harness)
    torch.manual_seed(specs.seed)
    results = Results(
        out_dir / "results.json",
        config,
        specs.seed,
        fingerprint=fp,
        protocol_id=protocol,
        plan=plan.as_dict(),
    )
    logger = None
    exit_code = 1
    try:
        lg = specs.logger
        logger = WandbLogger(
            lg.mode,
            lg.project,
            lg.entity,
            lg.group or (sweep_dir.name if sweep_dir else None),
            name=f"{specs.pruner.name}-{specs.sparsity}-{specs.pattern}-{specs.model.name}",
            config=config,
            directory=out_dir,
        )
        data = record_stages(specs, launch, results, logger, saved, save_dir, fp["digest"], out_dir)
        exit_code = 0
        return data
    except BaseException as err:
        fields: dict[str, Any] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        if isinstance(err, (KeyboardInterrupt, Interrupted)):
            fields.update(
                error=f"interrupted ({'SIGINT' if isinstance(err, KeyboardInterrupt) else err})",
                reason="interrupted",
            )
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


def record_stages(
    specs: Specs,
    launch: Launch,
    results: Results,
    logger: WandbLogger,
    saved: tuple | None,
    save_dir: Path | None,
    fingerprint: str,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """The stages of pipeline.py for the command: each one timed and recorded in results.json."""
    with timed(results, "load"):
        model, tok = load_model(
            specs.model, specs.seed
        )  # checks seqlen on the config before the weights
    results.update(
        model={
            "class": type(model).__name__,
            "seqlen": specs.model.seqlen,
            "params": sum(p.numel() for p in model.parameters()),
            "random_weights": specs.model.random_weights,
        }
    )

    calib = None
    stage_peak(specs.device)  # the prune stage's peak starts here
    if specs.needs_calibration:
        with timed(results, "calibrate"):
            calib = pipeline.calibrate(specs.data, tok, specs.model.seqlen, model.config.vocab_size)
        results.update(calibration={"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1])})
    allocation = None
    if specs.schedule.needs_calibration:  # schedule=owl: per-block targets from the dense model
        with timed(results, "allocate"):
            allocation = pipeline.allocate_blocks(
                specs.schedule,
                model,
                calib,
                specs.sparsity,
                specs.pattern,
                specs.pruner,
                specs.device,
            )
        results.update(allocation=allocation.report)

    ctx = PruneContext(
        model,
        specs.sparsity,
        specs.pattern,
        specs.schedule,
        specs.device,
        calib,
        tokenizer=tok,
        data=specs.data,
        seqlen=specs.model.seqlen,
        log=logger.log,
        block_targets=allocation.targets if allocation else None,
        engine=launch.engine,
        offload=launch.offload,
        inputs=launch.inputs,
        calib_batch=launch.calib_batch,
        fresh_model=lambda: load_model(specs.model, specs.seed)[0],
        workdir=workdir,
        fingerprint=fingerprint,
        checkpoint_every=specs.checkpoint_every,
    )
    results.update(
        engine=launch.engine,
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        offload=launch.offload,
    )
    with timed(results, "prune"):
        model, masks = pipeline.prune(specs.pruner, ctx)
    if specs.pruner.report():
        results.update(method_report=specs.pruner.report())
    spent = Budget(calib_tokens=int(calib.numel()) if calib is not None else 0).add(
        specs.pruner.budget()
    )
    wall = sum(results.data["timings_s"].get(k, 0.0) for k in ("calibrate", "allocate", "prune"))
    results.update(
        budget={
            "prune": {
                **spent.as_dict(),
                "wall_s": round(wall, 3),
                "peak_mem_gib": stage_peak(specs.device),
            }
        }
    )

    dense = specs.pruner.name == "dense"
    if not dense:  # what each mask must prune, and the masks the recovery keeps
        linears = prunable_linears(model)
        frozen, pattern, group = masks, specs.pattern, specs.pruner.group
        targets = pipeline.targets_of(model, specs.sparsity, allocation, linears)
    elif saved is not None:  # eval-only on an exported pruned model: its masks still hold
        frozen, meta = saved
        pattern, group = parse_pattern(meta["pattern"]), meta["group"]
        targets = saved_targets(meta, model, prunable_linears(model))
        results.update(loaded_pruned_model=meta)
    if not dense or saved is not None:
        per_tensor = pipeline.verify_masks(model, frozen, targets, pattern, group)
    else:
        per_tensor = {
            n: float((lin.weight == 0).float().mean()) for n, lin in prunable_linears(model).items()
        }
    if specs.recover is not None:  # the masks are frozen: trained around, then verified again
        if (
            launch.engine == "fsdp"
            and not specs.pruner.distributed
            and int(os.environ.get("WORLD_SIZE", 1)) > 1
        ):
            share_pruned(model, frozen, fingerprint)  # the other ranks waited for this pruned model
        with timed(results, "recover"):
            model = pipeline.recover(
                specs.recover, recover_context(specs, launch, model, frozen, tok, logger.log)
            )
        per_tensor = pipeline.verify_masks(model, frozen, targets, pattern, group)
        results.update(
            recover_report=specs.recover.report(),
            budget={
                "recover": {
                    **specs.recover.budget().as_dict(),
                    "wall_s": results.data["timings_s"]["recover"],
                    "peak_mem_gib": stage_peak(specs.device),
                }
            },
        )
    summary = summarize(per_tensor, prunable_linears(model))
    nonzero = (
        sum(p.numel() for p in model.parameters()) - summary["pruned_params"]
    )  # Elsa's Figure 3 axis
    results.update(
        sparsity={
            "target": specs.sparsity,
            "pattern": str(specs.pattern),
            **summary,
            "nonzero_params": nonzero,
        },
        per_layer_sparsity=per_tensor,
    )
    logger.table(
        "per_layer_sparsity", ["linear", "sparsity"], [[n, s] for n, s in per_tensor.items()]
    )
    sp = results.data["sparsity"]
    if not dense or saved is not None:
        log.info(
            "sparsity: target %s, actual %.6f over %d prunable weights",
            sp["target"],
            sp["actual_sparsity"],
            sp["prunable_params"],
        )

    if save_dir is not None:
        with timed(results, "save"):
            folder = save_pruned(
                model, tok, masks, save_dir, export_meta(specs, allocation, fingerprint, results)
            )
        results.update(saved_model=str(folder))

    if (
        specs.model.random_weights
    ):  # a measurement run: the perplexity of random weights is no result
        log.info("random weights (model.source=random): no quality evaluation")
        results.update(
            memory=peak_memory(specs.device),
            evaluation="skipped: random weights",
            status="complete",
        )
        return results.data
    placement = results.data["plan"]["eval"]
    place_for_eval(
        model, specs.device, placement, specs.plan.margin
    )  # one GPU, or a device map over several
    results.update(eval_placement=placement["placement"])
    for name in specs.eval.datasets:
        with timed(results, f"eval_{name}"):
            ((ppl, windows),) = pipeline.evaluate_perplexity(
                model,
                tok,
                specs.data,
                [name],
                specs.model.seqlen,
                specs.device,
                specs.eval.batch_size,
                specs.eval.max_windows,
            ).values()
        results.update(metrics={name: ppl, f"{name}_windows": windows})
        logger.log({f"ppl/{name}": ppl})
        log.info("%s perplexity %.4f over %d windows of %d", name, ppl, windows, specs.model.seqlen)

    zs = specs.eval.zeroshot
    if zs.tasks:
        from .evaluation.zeroshot import evaluate_zeroshot
        from .models import cache_root

        with timed(results, "eval_zeroshot"):
            out = evaluate_zeroshot(
                model, tok, zs, specs.data.source, specs.data.root, specs.device, cache_root()
            )
        results.update(
            zeroshot=out,
            metrics={
                **{t: v["headline"] for t, v in out["tasks"].items()},
                "mean_acc": out["mean_acc"],
            },
        )
        logger.log(
            {f"zeroshot/{t}": v["headline"] for t, v in out["tasks"].items()}
            | {"zeroshot/mean_acc": out["mean_acc"]}
        )
        logger.table(
            "zeroshot",
            ["task", "acc", "acc_norm", "n"],
            [[t, v.get("acc"), v.get("acc_norm"), v["n"]] for t, v in out["tasks"].items()],
        )

    results.update(memory=peak_memory(specs.device), status="complete")
    return results.data


def export_meta(specs: Specs, allocation, fingerprint: str, results: Results) -> dict[str, Any]:
    """sparsebench.json of an export: what verifies its masks and re-evaluates it as this run did."""
    return {
        "method": specs.pruner.name,
        "sparsity": specs.sparsity,
        "pattern": str(specs.pattern),
        "block_targets": allocation.targets if allocation else None,
        "group": specs.pruner.group,
        "seed": specs.seed,
        "model": specs.model.name,
        "fingerprint": fingerprint,
        "data": {
            "source": specs.data.source,
            "calib_set": specs.data.calib_set,
            "nsamples": specs.data.nsamples,
            "seqlen": specs.model.seqlen,
        },
        # what `model=local model.path=<export> method=dense` needs to evaluate it as this run did
        "dtype": specs.model.dtype,
        "evaluation": {
            "protocol": results.data["config"].get("protocol"),
            "nsamples": specs.data.nsamples,
            "max_windows": specs.eval.max_windows,
            "batch_size": specs.eval.batch_size,
            "datasets": list(specs.eval.datasets),
        },
    }
