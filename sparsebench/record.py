"""The stages of pipeline.py as the command runs them: each one timed and its result written
to results.json as it finishes (a run that fails keeps what it had), the model passed from
stage to stage; and the work of the ranks > 0 under torchrun, which record nothing."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import pipeline
from .engine.shard import share_pruned
from .engine.training import Budget, sync_cuda  # noqa: F401 (scripts import sync_cuda from here)
from .errors import one_line
from .evaluation.perplexity import place_for_eval
from .formats import size_of
from .launch import (
    Launch,
)  # noqa: F401
from .masks import count_report, summarize
from .models import find_blocks, load_model, prunable_linears
from .pruners import PruneContext
from .quant import QuantContext
from .records.export import export_meta, folder_bytes, save_pruned, saved_masks, saved_orders
from .records.summary import describe_cut
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
    pipeline.prune(
        specs.pruner, prune_context(specs, launch, model, tok, None, None, workdir, fingerprint)
    )
    return {"metrics": {}}


def prune_context(
    specs: Specs,
    launch: Launch,
    model,
    tok,
    calib,
    allocation,
    workdir,
    fingerprint,
    log=lambda metrics: None,
) -> PruneContext:
    """What a method gets: the asked-for targets, the resolved launch and the run's folder."""
    return PruneContext(
        model,
        specs.sparsity,
        specs.pattern,
        specs.schedule,
        specs.device,
        calib,
        tokenizer=tok,
        data=specs.data,
        seqlen=specs.model.seqlen,
        log=log,
        block_targets=allocation.targets if allocation else None,
        engine=launch.engine,
        offload=launch.offload,
        inputs=launch.inputs,
        calib_batch=launch.calib_batch,
        fresh_model=lambda: load_model(specs.model, specs.seed)[0],
        workdir=workdir,
        fingerprint=fingerprint,
        checkpoint_every=specs.checkpoint_every,
        refine=specs.refine,
    )


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
                specs.seed,
                workdir,
                logger.log,
            )
        results.update(allocation=allocation.report)

    ctx = prune_context(
        specs, launch, model, tok, calib, allocation, workdir, fingerprint, logger.log
    )
    results.update(
        engine=launch.engine,
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        offload=launch.offload,
    )
    with timed(results, "prune"):
        model, masks = pipeline.prune(specs.pruner, ctx, allocation)
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

    dense = not specs.pruner.makes_masks  # dense, or structured: the kept weights are whole
    # a structured run's cut (or a reloaded structured export's): blocks removed, no masks
    structure = (
        specs.pruner.report()
        if specs.pruner.structured
        else (saved[1].get("structure") if dense and saved is not None else None)
    )
    masked = not dense or (saved is not None and structure is None)  # masks to verify
    frozen = {}  # nothing to hold at zero (a structured run's recovery heals every weight)
    if not dense:  # what each mask must prune, and the masks the recovery keeps
        linears = prunable_linears(model)
        frozen, pattern, group = masks, specs.pattern, specs.pruner.masks_group
        targets = pipeline.targets_of(
            model, specs.sparsity, allocation, linears, specs.pruner, specs.pattern
        )
        orders = specs.pruner.column_orders  # N:M groups of permuted input columns (RIA)
    elif masked:  # eval-only on an exported pruned model: its masks still hold
        frozen, meta = saved_masks(model, saved), saved[1]
        pattern, group = parse_pattern(meta["pattern"]), meta["group"]
        targets = saved_targets(meta, model, prunable_linears(model))
        orders = saved_orders(saved)
        results.update(loaded_pruned_model={k: v for k, v in meta.items() if k != "orders"})
    elif saved is not None and structure:  # a reloaded structured export: the cut it had
        pattern = parse_pattern(saved[1]["pattern"])
        results.update(loaded_pruned_model=saved[1])
    if masked:
        per_tensor = pipeline.verify_masks(model, frozen, targets, pattern, group, orders)
        if orders:
            results.update(column_orders=sorted(orders))
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
            keep = frozen or pipeline.whole_masks(model)  # after a cut: every weight trains
            model = pipeline.recover(
                specs.recover, recover_context(specs, launch, model, keep, tok, logger.log)
            )
        if masked:
            per_tensor = pipeline.verify_masks(model, frozen, targets, pattern, group, orders)
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
    if specs.quant is not None:  # rounded to the grid; every pruned weight still exactly 0
        with timed(results, "quantize"):
            pipeline.quantize(
                specs.quant,
                QuantContext(
                    model,
                    frozen if masked else None,
                    specs.device,
                    calib,
                    launch.inputs,
                    launch.calib_batch,
                ),
            )
        if masked:
            per_tensor = pipeline.verify_masks(model, frozen, targets, pattern, group, orders)
        results.update(quant=specs.quant.report())
    summary = summarize(per_tensor, prunable_linears(model))
    if structure:  # the share of the blocks' weights removed, and which
        summary = pipeline.structured_summary(structure, summary)
        log.info(
            "removed %s: %.6f of the blocks' weights",
            describe_cut(summary["structure"]),
            summary["actual_sparsity"],
        )
    if masked:  # how far actual may lie from the target, and why
        summary.update(count_report(prunable_linears(model), targets, pattern, group))
    nonzero = (
        sum(p.numel() for p in model.parameters()) - summary["pruned_params"]
    )  # Elsa's Figure 3 axis
    _, blocks = find_blocks(model)
    # the blocks' weights as the dense model has them (a sparse + low-rank linear's factors,
    # OATS, are kept parameters of the pruned linears, counted in `split`)
    block_params = sum(p.numel() for b in blocks for p in b.parameters()) - summary.get(
        "split", {}
    ).get("lowrank_params", 0)
    removed_params = summary.get("removed_params", summary["pruned_params"])
    results.update(
        sparsity={
            # a reloaded export is the pruned model it is: its own target, never 0
            "target": saved[1]["sparsity"] if dense and saved is not None else specs.sparsity,
            "pattern": str(pattern if saved is not None and dense else specs.pattern),
            **summary,
            # the denominator of actual_sparsity, and the total over every weight of the blocks
            "denominator": "prunable_params: the weights of the pruned linears of the decoder "
            "blocks (plan.model_map.pruned)",
            "block_params": block_params,
            "sparsity_of_block_params": removed_params / block_params,
            "nonzero_params": nonzero,
            **(
                {
                    "denominator": "structure.block_params_before: the decoder blocks' "
                    "weights before the cut",
                    "sparsity_of_block_params": summary["actual_sparsity"],
                }
                if structure
                else {}
            ),
        },
        per_layer_sparsity=per_tensor,
    )
    logger.table(
        "per_layer_sparsity", ["linear", "sparsity"], [[n, s] for n, s in per_tensor.items()]
    )
    removed = (structure or {}).get("block_params_removed", 0)  # a cut's weights, gone
    results.update(size=size_of(model, frozen if masked else None, specs.quant, removed))
    sp = results.data["sparsity"]
    if masked:
        log.info(
            "sparsity: target %s, actual %.6f over %d prunable weights",
            sp["target"],
            sp["actual_sparsity"],
            sp["prunable_params"],
        )

    if save_dir is not None:
        with timed(results, "save"):
            folder = save_pruned(
                model,
                tok,
                masks,
                save_dir,
                export_meta(specs, allocation, fingerprint, results),
                specs.save.format,
                specs.pruner.column_orders,
                specs.quant,
            )
        results.update(saved_model=str(folder), saved_model_bytes=folder_bytes(folder))

    placement = results.data["plan"]["eval"]
    if (
        specs.model.random_weights
    ):  # a measurement run: the perplexity of random weights is no result
        log.info("random weights (model.source=random): no quality evaluation")
        if specs.eval.speed.enabled:  # speed depends on the kept count and pattern, not the values
            place_for_eval(model, specs.device, placement, specs.plan.margin)
            measure_speed(model, specs, results)
        results.update(
            memory=peak_memory(specs.device),
            evaluation="skipped: random weights",
            status="complete",
        )
        return results.data
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

    if specs.eval.speed.enabled:
        measure_speed(model, specs, results)

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


def measure_speed(model, specs, results) -> None:
    """eval.speed: dense and sparse kernels side by side (evaluation/speed.py)."""
    from .evaluation.speed import measure, measure_cut

    with timed(results, "eval_speed"):
        try:
            args = (specs.model.seqlen, specs.device)
            speed = (  # a structured run: the smaller model against the model before the cut
                measure_cut(load_model(specs.model, specs.seed)[0], model, *args, specs.eval.speed)
                if specs.pruner.structured
                else measure(model, list(prunable_linears(model)), *args, str(specs.pattern),
                             specs.eval.speed)
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - an optional measurement never loses the run's result
            speed = {"failed": one_line(err, 300)}
            log.warning(
                "speed measurement failed (the run's other results stand): %s", speed["failed"]
            )
    results.update(speed=speed)
    if "speedup" in speed:
        log.info(
            "speed (%s kernel): decode %s x, prefill %s x dense; floor %s x",
            speed["kernel"],
            speed["speedup"]["decode_b1"],
            speed["speedup"]["prefill_b1"],
            speed["speedup"]["floor"],
        )
    elif "skipped" in speed:
        log.info("speed: %s (%s)", speed["skipped"], speed.get("not_run"))
