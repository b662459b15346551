"""The stages of a run, each a named function that takes and returns what it needs:

    calibrate -> allocate -> prune -> verify -> recover -> verify -> evaluate

The model is passed in and handed back (a method trained under FSDP2 returns a plain model
gathered on rank 0, which is another object). `prune_model` runs the stages on a model object
the caller has loaded: the library entry point, in the spirit of lm-eval's `simple_evaluate`.
The `sparsebench` command runs the same stages (run.py), recording each one's result and
time in results.json.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import data as datamod
from .allocation import Allocation, allocate
from .engine.training import Budget, sync_cuda
from .evaluation.perplexity import perplexity
from .masks import summarize, verify
from .models import prunable_linears
from .pruners import PruneContext, Pruner
from .quant import QuantContext
from .recover import RecoverContext, Recovery
from .sparsity import Pattern, Schedule

Log = Callable[[dict[str, Any]], None]


def calibrate(data: datamod.DataSpec, tokenizer, seqlen: int, vocab_size: int) -> torch.Tensor:
    """(nsamples, seqlen) calibration windows (the draw the run's data spec names)."""
    return datamod.calibration(data, tokenizer, seqlen, vocab_size)


def allocate_blocks(
    schedule: Schedule,
    model: nn.Module,
    calib,
    sparsity: float,
    pattern: Pattern,
    pruner: Pruner,
    device: torch.device,
    seed: int = 0,
    workdir=None,
    log: Log = lambda metrics: None,
) -> Allocation | None:
    """Per-block targets of a non-uniform schedule (schedule=owl) from the dense model, or
    each linear's (schedule=evopress, its search resumable from `workdir`); None: uniform."""
    if not schedule.needs_calibration:
        return None
    return allocate(
        schedule, model, calib, sparsity, pattern, pruner.group, device, pruner, seed, workdir, log
    )


def prune(
    pruner: Pruner, ctx: PruneContext, allocation: Allocation | None = None
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the pruned model, {linear name: keep mask}). `ctx.model` goes in; a method that hands
    back another object (FSDP2's gathered plain model) leaves it in `ctx.model`, the one
    place a method may replace the model (PruneContext's contract). A searched allocation
    (EvoPress) already pruned every linear at each level: the model takes the database's
    weights at the found levels, as the released code evaluates them."""
    if allocation is not None and allocation.database is not None:
        from .evopress import masks_of_levels

        return ctx.model, masks_of_levels(
            ctx.model, allocation.database, allocation.report["levels"]
        )
    masks = pruner.prune(ctx)
    return ctx.model, masks


def targets_of(
    model: nn.Module,
    sparsity: float,
    allocation: Allocation | None,
    linears,
    pruner: Pruner | None = None,
    pattern: Pattern | None = None,
) -> float | dict[str, float]:
    """What each mask must prune: the run's sparsity, or each block's allocated target (as the
    method's masks count it: `Pruner.mask_target`, OATS's sparse part)."""
    rule = (lambda s: pruner.mask_target(s, pattern)) if pruner is not None else (lambda s: s)
    if allocation is None:
        return rule(sparsity)
    if allocation.linear_targets is not None:  # a searched allocation: each linear its own
        return {n: rule(allocation.linear_targets[n]) for n in linears}
    from .pruners.base import targets_by_linear

    return targets_by_linear(model, [rule(t) for t in allocation.targets], linears)


def verify_masks(
    model: nn.Module, masks, targets, pattern: Pattern, group: str, orders=None
) -> dict[str, float]:
    """Every pruned linear's sparsity, after checking its mask (count, N:M, hard zeros; N:M
    in a permuted column order where `orders` has one)."""
    return verify(prunable_linears(model), masks, targets, pattern, group, orders)


def structured_summary(report: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A structured run's sparsity: actual = the share of the decoder blocks' weights removed
    (pruners/removal.py's report), beside the zeros left in the kept weights (none)."""
    return {
        **summary,
        "pattern": "structured",  # the report's pattern column: parts removed, not zeros
        "actual_sparsity": report["removed_share"],
        "structure": {k: v for k, v in report.items() if k != "scores"},  # what went
        "zeros_in_kept_linears": summary["actual_sparsity"],
    }


def whole_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All-ones masks of every prunable linear: what a recovery after a structured cut keeps
    (nothing at zero), so the recoveries that adapt the masked linears (PERP's MaskLoRA) see
    every linear of the smaller model."""
    return {n: torch.ones_like(lin.weight, dtype=torch.bool, device="cpu")
            for n, lin in prunable_linears(model).items()}  # fmt: skip


def quantize(quant, ctx) -> None:
    """The quantization stage (quant/): every pruned linear rounded to its grid in place,
    pruned weights left at exactly zero (the caller verifies the masks after it)."""
    quant.run(ctx)


def recover(recovery: Recovery, ctx: RecoverContext) -> nn.Module:
    """The recovery stage: trains around the frozen masks; returns the model (a plain one
    gathered on rank 0 after FSDP2, left in ctx.model as for prune)."""
    recovery.run(ctx)
    return ctx.model


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    data: datamod.DataSpec,
    datasets,
    seqlen: int,
    device: torch.device,
    batch_size: int = 1,
    max_windows: int | None = None,
) -> dict[str, tuple[float, int]]:
    """{dataset: (perplexity, windows)} over non-overlapping seqlen windows."""
    out = {}
    for name in datasets:
        ids = datamod.eval_stream(data, name, tokenizer, seqlen)
        out[name] = perplexity(model, ids, seqlen, device, batch_size, max_windows, desc=name)
    return out


# ----------------------------------------------------------------------------- the entry point


@dataclass
class Outcome:
    """What `prune_model` did: the model (the same object, or FSDP2's gathered one), its masks,
    every pruned linear's sparsity, the totals, perplexities and what the stages spent."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    per_layer_sparsity: dict[str, float]
    sparsity: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    method_report: dict[str, Any] = field(default_factory=dict)
    recover_report: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(
        default_factory=dict
    )  # each stage's wall time (CUDA synchronised)
    quant_report: dict[str, Any] = field(default_factory=dict)  # the quantizer's grid, bits


def prune_model(
    model: nn.Module,
    tokenizer=None,
    *,
    method: str | Pruner = "wanda",
    sparsity: float = 0.5,
    pattern: str | Pattern = "unstructured",
    schedule: Schedule | None = None,
    recovery: str | Recovery | None = None,
    refine: str | Any | None = None,
    quant: str | Any | None = None,
    data: datamod.DataSpec | None = None,
    calib: torch.Tensor | None = None,
    seqlen: int | None = None,
    device: str | torch.device = "cpu",
    calib_batch: int = 1,
    options: dict[str, Any] | None = None,
    recover_options: dict[str, Any] | None = None,
    quant_options: dict[str, Any] | None = None,
    evaluate: tuple[str, ...] = (),
    eval_batch_size: int = 1,
    max_windows: int | None = None,
    log: Log = lambda metrics: None,
    load_dense: Callable[[], nn.Module] | None = None,
) -> Outcome:
    """Prune (and optionally recover and evaluate) a model object the caller loaded.

    `method` / `recovery` / `quant`: a registered name (with `options` / `recover_options` /
    `quant_options`) or a built object; `refine`: a refinement's name ("dsnot", its released
    defaults) or a built one. `quant` rounds every pruned linear after pruning and recovery
    (quant/; `quant_options={"joint": True}` with method sparsegpt rounds inside its sweep).
    `data`: the calibration pool and draw (default: data.DataSpec(), the offline C4
    documents of the data root); `calib` passes calibration windows directly instead. `evaluate`:
    perplexity datasets ("wikitext2", "c4"). `load_dense`: the dense model again, for a recovery
    that reconstructs against it (default: a host copy taken before pruning). The masks are
    verified as the command verifies them."""
    from .recover import RECOVERIES
    from .registry import METHODS
    from .sparsity import check_sparsity, parse_pattern

    pruner = METHODS.build(method, dict(options or {})) if isinstance(method, str) else method
    if isinstance(refine, str):  # a refinement of the method's masks (refine/), checked now
        from .specs import build_refinement

        pruner, refine = build_refinement({"name": refine}, pruner)
    if isinstance(quant, str):  # checked against the method now (joint: sparsegpt only)
        from .specs import build_quant

        quant = build_quant({"name": quant, **(quant_options or {})}, pruner)
    if isinstance(recovery, str):
        recovery = (
            None if recovery == "none" else RECOVERIES.build(recovery, dict(recover_options or {}))
        )
    pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    sparsity = 0.0 if pruner.name == "dense" else check_sparsity(sparsity, pattern)
    schedule = schedule or Schedule()
    quant_reads = quant is not None and quant.needs_calibration and not quant.joint
    if tokenizer is None:  # nothing reads text without one: refused now, before any work
        _needs_tokenizer(pruner, schedule, recovery, calib, evaluate, quant_reads)
    device = torch.device(device)
    if data is None and (calib is None or pruner.reads_data or recovery is not None or evaluate):
        data = datamod.DataSpec()  # the offline C4 documents of the data root
    seqlen = seqlen or int(getattr(model.config, "max_position_embeddings", 2048))
    vocab = model.config.vocab_size
    timings: dict[str, float] = {}
    if calib is None and (pruner.needs_calibration or schedule.needs_calibration or quant_reads):
        with _timed(timings, "calibrate"):
            calib = calibrate(data, tokenizer, seqlen, vocab)
    if recovery is not None and recovery.needs_dense and load_dense is None:
        dense = copy.deepcopy(model).to("cpu")
        load_dense = lambda: dense  # noqa: E731
    with _timed(timings, "allocate"):
        allocation = allocate_blocks(schedule, model, calib, sparsity, pattern, pruner, device)
    ctx = PruneContext(
        model,
        sparsity,
        pattern,
        schedule,
        device,
        calib,
        tokenizer=tokenizer,
        data=data,
        seqlen=seqlen,
        log=log,
        block_targets=allocation.targets if allocation else None,
        calib_batch=calib_batch,
        refine=refine,
    )
    with _timed(timings, "prune"):
        model, masks = prune(pruner, ctx, allocation)
    linears = prunable_linears(model)
    targets = targets_of(model, sparsity, allocation, linears, pruner, pattern)
    check = (
        (
            lambda: verify_masks(
                model, masks, targets, pattern, pruner.masks_group, pruner.column_orders
            )
        )
        if pruner.makes_masks
        else (
            lambda: {
                n: float((lin.weight == 0).float().mean())
                for n, lin in prunable_linears(model).items()
            }
        )
    )
    per_tensor = check()
    spent = {
        "prune": Budget(calib_tokens=int(calib.numel()) if calib is not None else 0)
        .add(pruner.budget())
        .as_dict()
    }
    if recovery is not None:
        rctx = RecoverContext(
            model, masks, device, tokenizer, data, seqlen, load_dense=load_dense, log=log
        )
        with _timed(timings, "recover"):
            model = recover(recovery, rctx)
        per_tensor = check()
        spent["recover"] = recovery.budget().as_dict()
    if quant is not None:
        qctx = QuantContext(
            model, masks if pruner.makes_masks else None, device, calib, "device", calib_batch
        )
        with _timed(timings, "quantize"):
            quantize(quant, qctx)
        per_tensor = check()
    summary = summarize(per_tensor, prunable_linears(model))
    if pruner.structured:  # the share of the blocks' weights removed, not zeros
        summary = structured_summary(pruner.report(), summary)
    metrics = {}
    if evaluate:
        model.to(device)
        for name in evaluate:
            with _timed(timings, f"eval_{name}"):
                metrics[name], _ = evaluate_perplexity(
                    model, tokenizer, data, [name], seqlen, device, eval_batch_size, max_windows
                )[name]
    return Outcome(
        model,
        masks,
        per_tensor,
        {"target": sparsity, "pattern": str(pattern), **summary},
        metrics,
        spent,
        pruner.report(),
        recovery.report() if recovery is not None else {},
        allocation.report if allocation else None,
        timings,
        quant.report() if quant is not None else {},
    )


def _needs_tokenizer(
    pruner: Pruner, schedule: Schedule, recovery, calib, evaluate, quant_reads: bool = False
) -> None:
    """One line for what `prune_model` cannot do without a tokenizer (the command feeds a
    random-weight model random token ids; a caller's model is never calibrated on noise)."""
    from .errors import SparsebenchError

    if calib is None and (pruner.needs_calibration or schedule.needs_calibration or quant_reads):
        what = (
            pruner.name
            if pruner.needs_calibration
            else "this schedule's allocation"
            if schedule.needs_calibration
            else "the quantizer"
        )
        raise SparsebenchError(
            f"prune_model: {what} calibrates on text and no tokenizer was given: pass "
            "tokenizer=<the model's tokenizer>, or calib=<(windows, seqlen) token ids>"
        )
    reader = (
        f"method {pruner.name}"
        if pruner.reads_data
        else f"recovery {recovery.name}"
        if recovery is not None
        else f"evaluate={tuple(evaluate)}"
        if evaluate
        else None
    )
    if reader:
        raise SparsebenchError(
            f"prune_model: {reader} reads text and no tokenizer was given: pass "
            "tokenizer=<the model's tokenizer>"
        )


@contextmanager
def _timed(into: dict[str, float], key: str):
    sync_cuda()
    start = time.perf_counter()
    yield
    sync_cuda()  # CUDA work is asynchronous: a stage ends when its kernels have
    into[key] = round(time.perf_counter() - start, 3)
