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
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import Interrupted, SparsebenchError
from .launch import dry_run, end_own_group, init_distributed, memory_plan, slurm_ranks
from .plan import check_fits
from .record import record_stages, run_worker
from .records import ledger
from .records.export import check_save_dir, load_saved
from .records.tracking import Results, WandbLogger, peak_memory
from .specs import Specs, build_specs, check_data_files

log = logging.getLogger(__name__)


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
        f"{out_dir} holds a complete result of another config ({shown}); sparsebench never "
        "overwrites it: "
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
    dense_cfg.refine = {"name": "none"}  # nothing to refine or round: the unquantized dense model
    dense_cfg.quant = {"name": "none"}
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
            name=run_name(specs, saved),
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


def run_name(specs: Specs, saved) -> str:
    """The wandb run's name: method-sparsity-pattern-model; a reloaded export's are those of
    the run that pruned it (never "dense")."""
    if saved is not None and specs.pruner.name == "dense":
        meta = saved[1]
        return f"{meta.get('label', meta['method'])}-{meta['sparsity']}-{meta['pattern']}-" + (
            f"{meta.get('model', specs.model.name)}-reloaded"
        )
    return f"{specs.pruner.name}-{specs.sparsity}-{specs.pattern}-{specs.model.name}"


def _quiet_harness(record: logging.LogRecord) -> bool:
    """Console filter: lm-eval's records below ERROR stay in run.log."""
    return not (record.name.startswith("lm_eval") and record.levelno < logging.ERROR)
