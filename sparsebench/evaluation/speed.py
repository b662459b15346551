"""What sparsity buys in time: prefill throughput and decode latency of the pruned model, with
every pruned linear run by the dense kernel and by a sparse kernel, side by side in one run,
beside the floor that memory bandwidth sets (`eval.speed.enabled=true`; on in `eval=full`).

Measurements (the model's own forward on the run's device, `torch.no_grad`, after `warmup`
runs, median of `repeats`, the dense and the sparse side's samples taken in turn, so the
machine's drift falls on both (timing.py); CUDA work is synchronized before each clock read):
  prefill  tokens/s of one forward of `batch` windows of the protocol's seqlen
  decode   ms per generated token with the KV cache (transformers' DynamicCache), `batch`
           sequences after a 16-token prompt, `decode_tokens` steps
  floor    for decode: the bytes one token reads (every weight once, in the form used) over the
           device's memory bandwidth, measured in the same run by a copy benchmark (bytes read
           + written / time), sampled after each timing of the pruned linears alone (each
           kernel's floor is from its own samples; the whole model's from all of them, which
           the decode timings follow); measured / floor says how much of the possible gain a
           kernel gets.

The sparse kernels are kernels.py's. Every candidate that applies to the device and pattern
is timed on the model's own pruned weights at 1, 8 and 64 tokens; the fastest at one token
runs inputs of fewer than `rows_many` (2) rows (decode of one sequence), the fastest at 8
inputs of fewer than `rows_prefill` (16; decode of a few sequences), the fastest at 64 every
larger input (prefill); the timings are recorded. (An expand kernel gains most at a few rows
and nothing at 64, while CSR's gains grow with the rows: one choice for every batched input
would give one of them away.) There is no 2:4 kernel on the CPU: a 2:4 model's masks run
through the unstructured kernels there, and results.json says so; no dense fallback is ever
timed as sparse. On CUDA, 2:4 runs through torch's semi-structured sparse tensors.

Every decode figure is checked against what the same run says is possible (`plausibility`):
only the pruned linears change between the two runs, so a whole-model speed-up lies between 1
and the speed-up of its kernel alone at the same rows, and decode cannot beat dense by more
than the bandwidth floor's ratio of bytes read. (Prefill runs seqlen x batch rows, where the
kernels were not timed and a dense GEMM is more efficient than at 64: no bound is drawn.)
A figure beyond either (by more than SUSPECT_MARGIN) is listed in
`speed.suspect` with its likely cause and printed as suspect; a model whose weights fit in a
cache (under TOO_SMALL_BYTES) is timed by per-call overhead, and says so.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..errors import SparsebenchError, one_line
from ..registry import option
from . import fusion
from .kernels import FORMS, kernels_for, lowrank_parts, sparse_form, swap_out, unavailable
from .timing import (
    bandwidth_gbs,
    copy_sampler,
    decode_sampler,
    interleaved,
    median_beside,
    median_s,
    prefill_sampler,
    random_tokens,
)


@dataclass
class SpeedSpec:
    enabled: bool = False
    batch_sizes: tuple[int, ...] = (1, 8)
    decode_tokens: int = option(16, ge=1)  # generated tokens per decode measurement
    repeats: int = option(3, ge=1)  # decode measurements per figure; the median is reported
    prefill_repeats: int = option(
        1, ge=1
    )  # prefill forwards (a sparse one at 50% takes seconds on a CPU)
    warmup: int = option(1, ge=0)
    # candidates (empty: every kernel that applies to the device and pattern); the fastest
    # at one token runs decode, the fastest at 64 tokens prefill
    kernels: tuple[str, ...] = field(default=())
    # inputs of fewer rows than this (decode of one sequence) run the kernel picked at one
    # token; from it to below rows_prefill (decode of a few sequences) the one picked at 8
    # tokens; from rows_prefill (prefill) the one picked at 64 tokens
    rows_many: int = option(2, ge=1)
    rows_prefill: int = option(16, ge=2)
    # linears that read the same input (q/k/v, gate/up) multiplied as one matrix, on both
    # sides (fusion.py): what a serving runtime does, and what a small sparse matrix needs
    fuse: bool = True

    def __post_init__(self):
        self.batch_sizes, self.kernels = tuple(self.batch_sizes), tuple(self.kernels)
        for kernel in self.kernels:  # unknown: one line with did-you-mean and the valid names
            FORMS.get(kernel)
        if self.rows_prefill < self.rows_many:
            raise SparsebenchError(
                f"eval.speed.rows_prefill={self.rows_prefill} is below eval.speed.rows_many="
                f"{self.rows_many}: the tiers are one token < rows_many <= a few < rows_prefill"
            )
        if self.enabled and (not self.kernels or {"bitmask", "gather"} & set(self.kernels)):
            native.check_forced_path()  # a bad SPARSEBENCH_BITMASK_PATH: refused before any work


# ----------------------------------------------------------------------------- timing


def prefill_tps(model: nn.Module, batch: int, seqlen: int, spec: SpeedSpec) -> float:
    sample = prefill_sampler(model, batch, seqlen)
    return batch * seqlen / median_s(sample, spec.prefill_repeats, 0)


def decode_ms(model: nn.Module, batch: int, spec: SpeedSpec) -> float:
    """Median ms per generated token (greedy, with the KV cache) after a 16-token prompt."""
    sample = decode_sampler(model, batch, spec.decode_tokens)
    return 1000 * median_s(sample, spec.repeats, spec.warmup)


def pick_kernel(
    linears: dict[str, nn.Linear],
    kernels: tuple[str, ...],
    spec: SpeedSpec,
    tokens: int,
    failed: dict[str, str],
    probe: Callable[[], float] | None = None,
) -> tuple[str | None, dict[str, float]]:
    """The fastest of `kernels` for `tokens` input rows over the model's own pruned weights
    (each kernel timed on every pruned linear in turn, side by side with the dense product,
    after a warm-up). A kernel that raises (a backend missing from this build of torch, say) is
    recorded in `failed` with its error's first line and left out; None when none ran.
    With a bandwidth `probe` (timing.copy_sampler), each kernel's time over its own floor too,
    `<kernel>_over_floor`: the bytes of its form over the bandwidth sampled after each of its
    runs (`<kernel>_gbs`, their median), the dense product's beside them: how far each is from
    what memory allows, so a speed-up is never credited to a slow dense product."""
    device = next(iter(linears.values())).weight.device
    x = {
        n: torch.randn(tokens, lin.in_features, generator=torch.Generator().manual_seed(2)).to(
            device, lin.weight.dtype
        )
        for n, lin in linears.items()
    }
    gbs: dict[str, float] = {}

    def timed(kernel: str, fn) -> float:
        seconds, samples = median_beside(fn, probe, spec.repeats, max(1, spec.warmup))
        if samples:
            gbs[kernel] = statistics.median(samples)
        return seconds

    totals, nbytes = {}, {}
    for kernel in (k for k in kernels if k not in failed):
        try:
            forms = {n: sparse_form(lin.weight, kernel) for n, lin in linears.items()}
            totals[kernel] = timed(kernel, lambda: [forms[n](x[n]) for n in forms])
            nbytes[kernel] = sum(f.bytes for f in forms.values())
        except (RuntimeError, NotImplementedError, ValueError) as err:
            failed[kernel] = one_line(err, 300)
        forms = None  # free the forms before the next kernel's
    dense_s = timed("dense", lambda: [F.linear(x[n], lin.weight) for n, lin in linears.items()])
    best = min(totals, key=totals.get) if totals else None
    out = {
        "dense_ms": round(1000 * dense_s, 3),
        **{f"{k}_ms": round(1000 * v, 3) for k, v in totals.items()},
    }
    if probe is not None:
        nbytes["dense"] = sum(
            lin.weight.numel() * lin.weight.element_size() for lin in linears.values()
        )
        for k, t in {"dense": dense_s, **totals}.items():
            out[f"{k}_gbs"] = round(gbs[k], 2)
            out[f"{k}_over_floor"] = round(t / (nbytes[k] / (gbs[k] * 1e9)), 2)
    return best, out


# ----------------------------------------------------------------------------- plausibility

# A figure beyond what the run's own measurements allow by more than this factor is suspect:
# medians of a few repeats move by some percent on an idle machine, by more on a busy one.
SUSPECT_MARGIN = 1.2
# Weights below this fit in the last-level cache of current CPUs (and read in microseconds on
# any device): a token then costs per-call overhead, not memory traffic, and no ratio of such
# timings says anything about a real model's speed.
TOO_SMALL_BYTES = 64 * 2**20


def _kernel_at(out: dict[str, Any], rows: int) -> tuple[dict[str, float], str]:
    """The kernel an input of `rows` rows ran and the timings it was picked by."""
    if rows < out["rows_many"]:
        return out["kernels_one_token"], out["kernel"]
    if rows < out.get("rows_prefill", out["rows_many"]) and "kernels_8_tokens" in out:
        return out["kernels_8_tokens"], out["batch_kernel"]
    return out["kernels_64_tokens"], out["prefill_kernel"]


def plausibility(out: dict[str, Any], seqlen: int) -> list[str]:
    """Why the measured speed-ups of `out` (measure's record) cannot all be what the kernels
    do: one sentence per suspect figure, empty when every figure is possible."""
    dense_bytes = out["dense"]["bytes_per_token"]
    if dense_bytes < TOO_SMALL_BYTES:  # every other figure is then noise too: one reason
        return [
            f"too small to time: the model's weights ({dense_bytes / 1e6:.2g} MB) fit in a "
            "cache, so a token costs per-call overhead, not memory traffic; no speed-up of "
            "such a model says anything about a real one"
        ]
    reasons = []
    for key, ratio in out["kernels_one_token"].items():  # no kernel reads faster than memory
        if key.endswith("_over_floor") and ratio < 1 / SUSPECT_MARGIN:
            k = key.removesuffix("_over_floor")
            reasons.append(
                f"{k} at one token ran at {ratio:.2f} of its floor: the copy sampled beside it "
                f"({out['kernels_one_token'][f'{k}_gbs']:.1f} GB/s) was slowed, so that floor "
                "is none (a busy machine)"
            )
    for key, x in out["speedup"].items():
        kind, _, b = key.rpartition("_b")
        if kind != "decode":  # prefill: seqlen x batch rows, far from the 64 the kernels were
            continue  # timed at, where a dense GEMM's efficiency differs: no bound holds
        table, kernel = _kernel_at(out, int(b))
        alone = table["dense_ms"] / table[f"{kernel}_ms"] if table.get(f"{kernel}_ms") else None
        if alone is not None and x > max(1.0, alone) * SUSPECT_MARGIN:
            reasons.append(
                f"{kind} at batch {b}: {x:.2f}x dense for the whole model, while its kernel "
                f"alone ({kernel}) is {alone:.2f}x dense; a whole model gains less than its "
                "linears (the dense run was likely slowed by a busy machine)"
            )
        elif alone is not None and x < min(1.0, alone) / SUSPECT_MARGIN:
            reasons.append(
                f"{kind} at batch {b}: {x:.2f}x dense for the whole model, while its kernel "
                f"alone ({kernel}) is {alone:.2f}x dense; a whole model loses less than its "
                "linears (the sparse run was likely slowed by a busy machine)"
            )
        # the sparse run cannot beat its own floor, so dense / sparse <= (dense / its floor) x
        # (the floors' ratio): the floors' ratio itself where dense runs at its floor (one
        # sequence), more where dense runs slower than memory allows (a few sequences, whose
        # small GEMMs are far from it)
        slack = max(1.0, out["dense"].get(f"decode_over_floor_b{b}", 1.0))
        allowed = out["speedup"]["floor"] * slack
        if x > allowed * SUSPECT_MARGIN:
            reasons.append(
                f"decode at batch {b}: {x:.2f}x dense, beyond the {allowed:.2f}x that the "
                "bandwidth floor allows (bytes read dense over sparse, times dense's measured "
                "/ floor); a busy machine or a model too small to time"
            )
    return reasons


# ----------------------------------------------------------------------------- the measurement


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter once (a tied weight counts once), in its dtype."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def candidates(
    linears: dict[str, nn.Linear], device: torch.device, pattern: str, spec: SpeedSpec
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The kernels to time (asked, or every one that applies) and why each other one is not."""
    weights = {n: lin.weight.detach() for n, lin in linears.items()}
    asked = spec.kernels or kernels_for(device, pattern)
    reasons = {k: unavailable(k, device, pattern, weights) for k in asked}
    return tuple(k for k in asked if reasons[k] is None), {k: r for k, r in reasons.items() if r}


def speedups(dense: dict[str, Any], other: dict[str, Any], batches) -> dict[str, float]:
    """Decode and prefill of `other` over `dense` at each batch size, and the floor's ratio."""
    return {
        **{
            f"decode_b{b}": round(dense[f"decode_ms_b{b}"] / other[f"decode_ms_b{b}"], 3)
            for b in batches
        },
        **{
            f"prefill_b{b}": round(other[f"prefill_tps_b{b}"] / dense[f"prefill_tps_b{b}"], 3)
            for b in batches
        },
        "floor": round(dense["bytes_per_token"] / other["bytes_per_token"], 3),
    }


@torch.no_grad()
def measure(
    model: nn.Module,
    names: list[str],
    seqlen: int,
    device: torch.device,
    pattern: str,
    spec: SpeedSpec,
) -> dict[str, Any]:
    """Dense and sparse prefill / decode of `model` with its pruned linears `names`, the floor
    beside them, the sparse model's logits checked against the dense one's (results.json)."""
    linears = {n: model.get_submodule(n) for n in names}
    kernels, not_run = candidates(linears, device, pattern, spec)
    if not kernels:
        return {"skipped": "no sparse kernel can run this model here", "not_run": not_run}
    factored, factor_bytes = lowrank_parts(linears)  # OATS: dense is S + U V, one weight
    probe = random_tokens(model.config.vocab_size, (1, min(seqlen, 64)), device, 1)
    plain = [n for n in names if n not in factored]
    groups = fusion.shared_inputs(model, plain, probe[:, :2]) if spec.fuse else []
    units = fusion.units(linears, groups)  # what the kernels multiply, timed as it runs
    failed: dict[str, str] = {}
    kernel, kernels_one = pick_kernel(units, kernels, spec, 1, failed, copy_sampler(device))
    # the whole model's floor: the bandwidth sampled beside the kernels' timings (their median)
    beside = [v for k, v in kernels_one.items() if k.endswith("_gbs")]
    bandwidth = statistics.median(beside)
    batch_kernel, kernels_eight = pick_kernel(units, kernels, spec, 8, failed)
    prefill_kernel, kernels_many = pick_kernel(units, kernels, spec, 64, failed)
    not_run.update(failed)
    if kernel is None or batch_kernel is None or prefill_kernel is None:
        return {"skipped": "every sparse kernel failed here", "not_run": not_run}
    dense_bytes = weight_bytes(model) - factor_bytes
    pruned_dense = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears.values())
    out: dict[str, Any] = {
        "device": device.type,
        "kernel": kernel,
        "batch_kernel": batch_kernel,
        "prefill_kernel": prefill_kernel,
        "rows_many": spec.rows_many,
        "rows_prefill": spec.rows_prefill,
        "kernels_one_token": kernels_one,
        "kernels_8_tokens": kernels_eight,
        "kernels_64_tokens": kernels_many,
        "bandwidth_gbs": round(bandwidth, 2),
        "bandwidth_gbs_range": [min(beside), max(beside)],  # how much it moved in the run
        "pattern": pattern,
        "threads": torch.get_num_threads(),
        "fused": fusion.summary(groups),  # {} unfused; the kernels' tables time the units
    }
    if not_run:
        out["not_run"] = not_run
    compiled = [k for k in ("bitmask", "gather") if k in kernels and k not in not_run]
    out.update({f"{k}_path": native.chosen_path() for k in compiled})  # the path each timed
    if out.get("bitmask_path") == "avx512":  # and how its one-token loop took its masks
        out["bitmask_masks"] = native.expand_masks()
    if ":" in pattern and "semi_structured" not in kernels:
        out["note"] = (
            f"no {pattern} kernel on {device.type}: its masks run through the unstructured "
            f"{kernel} kernel"
        )
    dense_logits = model(input_ids=probe, use_cache=False).logits.float()
    tiers = (kernel, prefill_kernel, spec.rows_many, batch_kernel, spec.rows_prefill)
    sides = fusion.sides(model, linears, units, groups, factored, tiers)
    use = lambda side: swap_out(model, sides[side])  # noqa: E731 (puts that side's modules in)
    both = ("dense", "sparse")
    try:
        stats: dict[str, dict[str, Any]] = {side: {} for side in both}
        for b in spec.batch_sizes:  # the two sides' samples in turn (timing.py says why)
            pre = interleaved(use, prefill_sampler(model, b, seqlen), both, spec.prefill_repeats, 0)
            dec = interleaved(
                use, decode_sampler(model, b, spec.decode_tokens), both, spec.repeats, spec.warmup
            )
            for side in both:
                stats[side][f"prefill_tps_b{b}"] = round(b * seqlen / pre[side], 2)
                stats[side][f"decode_ms_b{b}"] = round(1000 * dec[side], 3)
        use("sparse")
        sparse = fusion.distinct_units(sides["sparse"].values())  # each SparseLinear once
        logits = model(input_ids=probe, use_cache=False).logits.float()
        # products served sparse, a member of a group counted as its own linear (so a multiple
        # of the pruned linears when none fell back), and the kernels' own calls
        stats["sparse"]["sparse_calls"] = sum(m.calls for m in sides["sparse"].values())
        stats["sparse"]["kernel_calls"] = sum(m.calls for m in sparse)
        stats["sparse"]["logits_max_abs_diff"] = float((logits - dense_logits).abs().max())
        stats["sparse"]["logits_max_abs"] = float(dense_logits.abs().max())
        reads = {"dense": dense_bytes,
                 "sparse": dense_bytes - pruned_dense + sum(m.bytes for m in sparse)}  # fmt: skip
        for side in both:
            st = stats[side]
            st["bytes_per_token"] = reads[side]
            st["floor_ms_per_token"] = round(1000 * reads[side] / (bandwidth * 1e9), 4)
            for b in spec.batch_sizes:
                st[f"decode_over_floor_b{b}"] = round(
                    st[f"decode_ms_b{b}"] / st["floor_ms_per_token"], 2
                )
            out[side] = st
    finally:
        use("original")
    out["speedup"] = speedups(out["dense"], out["sparse"], spec.batch_sizes)
    if factored:  # dense: each such linear as one dense linear of S + U V
        out["lowrank"] = {"linears": len(factored), "factor_bytes": factor_bytes}
    suspect = plausibility(out, seqlen)
    if suspect:
        out["suspect"] = suspect
    return out


@torch.no_grad()
def measure_cut(
    dense: nn.Module, cut: nn.Module, seqlen: int, device: torch.device, spec: SpeedSpec
) -> dict[str, Any]:
    """A structured run's speed: the model before the cut and the smaller one, both through the
    dense kernel, side by side in this process; the floor is their bytes' ratio (results.json
    `speed` with `dense` and `cut`, and the same `speedup` keys as the sparse kernels')."""
    bandwidth = bandwidth_gbs(device)
    out: dict[str, Any] = {
        "device": device.type,
        "kernel": "dense (the smaller model)",
        "prefill_kernel": "dense",
        "compared_with": "the dense model before the cut, loaded again",
        "bandwidth_gbs": round(bandwidth, 2),
        "threads": torch.get_num_threads(),
    }
    for mode, model in (("dense", dense), ("cut", cut)):
        model.to(device)
        stats: dict[str, Any] = {}
        for b in spec.batch_sizes:
            stats[f"prefill_tps_b{b}"] = round(prefill_tps(model, b, seqlen, spec), 2)
            stats[f"decode_ms_b{b}"] = round(decode_ms(model, b, spec), 3)
        stats["bytes_per_token"] = weight_bytes(model)
        stats["floor_ms_per_token"] = round(1000 * stats["bytes_per_token"] / (bandwidth * 1e9), 4)
        out[mode] = stats
        if mode == "dense":
            model.to("cpu")
    d = out["dense"]
    out["speedup"] = speedups(d, out["cut"], spec.batch_sizes)
    suspect = []
    if d["bytes_per_token"] < TOO_SMALL_BYTES:
        suspect.append(
            f"too small to time: the model's weights ({d['bytes_per_token'] / 1e6:.2g} MB) fit in "
            "a cache, so a token costs per-call overhead, not memory traffic"
        )
    for b in spec.batch_sizes:
        x = out["speedup"][f"decode_b{b}"]
        if x > out["speedup"]["floor"] * SUSPECT_MARGIN:
            suspect.append(
                f"decode at batch {b}: {x:.2f}x the model before the cut, beyond the "
                f"{out['speedup']['floor']:.2f}x its bytes allow; a busy machine"
            )
    if suspect:
        out["suspect"] = suspect
    return out
