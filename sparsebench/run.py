"""The pipeline, top to bottom: specs -> model -> calibration -> prune -> verify -> evaluate -> record."""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import data as datamod
from .errors import SparsebenchError
from .evaluate import EvalSpec, perplexity
from .export import load_masks, load_meta, save_pruned
from .masks import summarize, verify
from .models import ModelSpec, load_model, prunable_linears
from .pruners import PruneContext, Pruner
from .registry import METHODS, build_dataclass
from .sparsity import Pattern, Ramp, Schedule, check_sparsity, parse_pattern
from .tracking import Results, WandbLogger, peak_memory

log = logging.getLogger(__name__)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparsebenchError(f"unknown device '{name}'; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsebenchError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def build_specs(cfg: DictConfig) -> Specs:
    """Parse and validate every config group once, before any heavy work."""
    c = OmegaConf.to_container(cfg, resolve=True)
    method = dict(c["method"])
    pruner = METHODS.build(method.pop("name"), method)
    pattern = parse_pattern(c["pattern"])
    sched = dict(c["schedule"])
    ramp = build_dataclass(Ramp, sched.pop("ramp", {}) or {}, "schedule.ramp")
    return Specs(
        model=build_dataclass(ModelSpec, c["model"], "model"),
        pruner=pruner,
        sparsity=0.0 if pruner.name == "dense" else check_sparsity(c["sparsity"], pattern),
        pattern=Pattern() if pruner.name == "dense" else pattern,
        schedule=build_dataclass(Schedule, {**sched, "ramp": ramp}, "schedule"),
        data=build_dataclass(datamod.DataSpec, c["data"], "data"),
        eval=build_dataclass(EvalSpec, c["eval"], "eval"),
        device=resolve_device(str(c["device"])),
        seed=int(c["seed"]),
    )


def check_data_files(specs: Specs) -> None:
    """Fail on a missing local data file now, not after the model has loaded."""
    d = specs.data
    if d.source != "local":
        return
    needed = {datamod.WIKI_FILE.format(split="test") if n == "wikitext2" else datamod.C4_FILE for n in specs.eval.datasets}
    if specs.pruner.needs_calibration:
        needed.add(datamod.C4_FILE if d.calib_set == "c4" else datamod.WIKI_FILE.format(split="valid"))
    for rel in sorted(needed):
        datamod._local_file(d, rel)
    specs.eval.zeroshot.check_source(d.source, d.root)


def run_worker(specs: Specs) -> dict[str, Any]:
    """Ranks > 0 under torchrun: load, join the training, write nothing (rank 0 records)."""
    model, tok = load_model(specs.model, specs.seed)
    ctx = PruneContext(model, specs.sparsity, specs.pattern, specs.schedule, specs.device,
                       tokenizer=tok, data=specs.data, seqlen=specs.model.seqlen)
    specs.pruner.prune(ctx)
    return {"metrics": {}}


def sync_cuda() -> None:
    """Wait for queued CUDA work (it runs asynchronously) before reading a clock; a no-op
    where CUDA was never used."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed(results: Results, key: str):
    sync_cuda()
    start = time.perf_counter()
    yield
    sync_cuda()  # CUDA work is asynchronous: a phase ends when its kernels have finished
    results.update(timings_s={key: round(time.perf_counter() - start, 3)})


def init_distributed(specs: Specs) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group; returns this rank."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0
    if not specs.pruner.distributed:
        raise SparsebenchError(
            f"method '{specs.pruner.name}' runs in one process; launch it without torchrun "
            f"(multi-process methods: {', '.join(n for n in METHODS.names() if METHODS.get(n).distributed)})"
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if specs.device.type == "cuda" else "gloo")
    if specs.device.type == "cuda":
        torch.cuda.set_device(specs.device)
    return dist.get_rank()


def completed(out_dir: Path) -> dict[str, Any] | None:
    """The results of an earlier complete run in this folder, if any."""
    import json

    path = out_dir / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("status") == "complete" else None


def dense_baseline(cfg: DictConfig, sweep_dir: Path) -> None:
    """In a sweep, the dense model under the same protocol, once per model: <sweep>/dense_<model>."""
    if cfg.method.name == "dense":
        return
    dense_cfg = cfg.copy()
    OmegaConf.set_struct(dense_cfg, False)
    dense_cfg.method = {"name": "dense"}
    dense_cfg.save.enabled = False
    folder = sweep_dir / f"dense_{cfg.model.name}"
    if completed(folder) is None:
        log.info("sweep baseline: dense %s in %s", cfg.model.name, folder)
        run(dense_cfg, folder)


def run(cfg: DictConfig, out_dir: Path, sweep_dir: Path | None = None) -> dict[str, Any]:
    specs = build_specs(cfg)
    if sweep_dir is not None and cfg.get("dense_baseline", False):
        dense_baseline(cfg, sweep_dir)
    if cfg.get("resume", False) and (done := completed(out_dir)) is not None:
        log.info("%s holds a complete results.json: skipped (resume=false runs it again)", out_dir)
        return done
    check_data_files(specs)
    if init_distributed(specs) != 0:
        return run_worker(specs)
    torch.manual_seed(specs.seed)
    config = OmegaConf.to_container(cfg, resolve=True)
    results = Results(out_dir / "results.json", config, specs.seed)
    lg = cfg.logger
    logger = WandbLogger(
        lg.mode, lg.project, lg.entity, lg.group or (sweep_dir.name if sweep_dir else None),
        name=f"{specs.pruner.name}-{specs.sparsity}-{specs.pattern}-{specs.model.name}",
        config=config, directory=out_dir,
    )
    exit_code = 1
    try:
        with timed(results, "load"):
            model, tok = load_model(specs.model, specs.seed)  # checks seqlen on the config before the weights
        results.update(model={"class": type(model).__name__, "seqlen": specs.model.seqlen,
                              "params": sum(p.numel() for p in model.parameters())})

        calib = None
        if specs.pruner.needs_calibration:
            with timed(results, "calibrate"):
                calib = datamod.calibration(specs.data, tok, specs.model.seqlen)
            results.update(calibration={"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1])})

        ctx = PruneContext(model, specs.sparsity, specs.pattern, specs.schedule, specs.device, calib,
                           tokenizer=tok, data=specs.data, seqlen=specs.model.seqlen, log=logger.log)
        with timed(results, "prune"):
            masks = specs.pruner.prune(ctx)
        if specs.pruner.report():
            results.update(method_report=specs.pruner.report())
        linears = prunable_linears(model)
        saved = load_masks(specs.model.path) if specs.model.source == "local" else None
        if specs.pruner.name != "dense":
            per_tensor = verify(linears, masks, specs.sparsity, specs.pattern, specs.pruner.group)
        elif saved is not None:  # eval-only on an exported pruned model: its masks still hold
            meta = load_meta(specs.model.path) or {}
            per_tensor = verify(linears, saved, meta["sparsity"], parse_pattern(meta["pattern"]), meta["group"])
            results.update(loaded_pruned_model=meta)
        else:
            per_tensor = {n: float((l.weight == 0).float().mean()) for n, l in linears.items()}
        results.update(sparsity={"target": specs.sparsity, "pattern": str(specs.pattern), **summarize(per_tensor, linears)},
                       per_layer_sparsity=per_tensor)
        logger.table("per_layer_sparsity", ["linear", "sparsity"], [[n, s] for n, s in per_tensor.items()])
        log.info("pruned: %s", results.data["sparsity"])

        if cfg.save.enabled:
            meta = {"method": specs.pruner.name, "sparsity": specs.sparsity, "pattern": str(specs.pattern),
                    "group": specs.pruner.group, "seed": specs.seed, "model": specs.model.name,
                    "data": {"source": specs.data.source, "calib_set": specs.data.calib_set,
                             "nsamples": specs.data.nsamples, "seqlen": specs.model.seqlen}}
            with timed(results, "save"):
                folder = save_pruned(model, tok, masks, Path(cfg.save.dir or out_dir / "model"), meta)
            results.update(saved_model=str(folder))

        model.to(specs.device)
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
            from .zeroshot import evaluate_zeroshot

            with timed(results, "eval_zeroshot"):
                out = evaluate_zeroshot(model, tok, zs, specs.data.source, specs.data.root, specs.device, cache_root())
            results.update(zeroshot=out, metrics={**{t: v["headline"] for t, v in out["tasks"].items()}, "mean_acc": out["mean_acc"]})
            logger.log({f"zeroshot/{t}": v["headline"] for t, v in out["tasks"].items()} | {"zeroshot/mean_acc": out["mean_acc"]})
            logger.table("zeroshot", ["task", "acc", "acc_norm", "n"],
                         [[t, v.get("acc"), v.get("acc_norm"), v["n"]] for t, v in out["tasks"].items()])

        results.update(memory=peak_memory(specs.device), status="complete")
        exit_code = 0
        return results.data
    except BaseException as err:
        results.update(status="failed", error=f"{type(err).__name__}: {err}", memory=peak_memory(specs.device))
        raise
    finally:
        logger.finish({**results.data["metrics"], "status": results.data["status"]}, exit_code)
