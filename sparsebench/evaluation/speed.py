"""What sparsity buys in time: prefill throughput and decode latency of the pruned model, with
every pruned linear run by the dense kernel and by a sparse kernel, side by side in one run,
beside the floor that memory bandwidth sets (`eval.speed.enabled=true`; on in `eval=full`).

Measurements (the model's own forward, `torch.no_grad`, after `warmup` runs, median of
`repeats`):
  prefill  tokens/s of one forward of `batch` windows of the protocol's seqlen
  decode   ms per generated token with the KV cache (transformers' DynamicCache), `batch`
           sequences after a 16-token prompt, `decode_tokens` steps
  floor    for decode: the bytes one token reads (every weight once, in the form used) over the
           machine's memory bandwidth, measured in the same run by a copy benchmark (bytes read
           + written / time); measured / floor says how much of the possible gain a kernel gets.

Sparse kernels on the CPU (`kernels`, each timed at the model's own shapes for one token; the
fastest is kept for the model and the table says why): torch's CSR (`torch.sparse.mm`, 64-bit
indices), scipy.sparse CSR (int32 indices), and `csr16`, a numba kernel of this file over
CSR with 16-bit column indices and 32-bit row pointers, rows in parallel. There is no 2:4
kernel on the CPU: a 2:4 model's masks run through the same unstructured kernels, and the
table says so; no dense fallback is ever timed as sparse. On CUDA, 2:4 would run through
torch's semi-structured sparse tensors; that path is not built or measured here (no GPU run).
"""

from __future__ import annotations

import functools
import inspect
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..registry import option

KERNELS = ("torch_csr", "scipy_csr", "csr16")


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
    kernels: tuple[str, ...] = field(
        default=KERNELS
    )  # candidates; the fastest at one token is kept

    def __post_init__(self):
        from ..errors import SparsebenchError

        self.batch_sizes, self.kernels = tuple(self.batch_sizes), tuple(self.kernels)
        bad = [k for k in self.kernels if k not in KERNELS]
        if bad or not self.kernels:
            raise SparsebenchError(
                f"eval.speed.kernels has {bad or 'nothing'}; valid: {', '.join(KERNELS)}"
            )


# ----------------------------------------------------------------------------- kernels


@functools.lru_cache(maxsize=None)
def _csr16_kernel():
    """y[t, r] = sum_j values[j] * x[t, cols[j]] over row r's nonzeros (numba, rows in parallel)."""
    import numba

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def spmm(indptr, cols, values, x, y):
        rows = indptr.shape[0] - 1
        for r in numba.prange(rows):
            start, end = indptr[r], indptr[r + 1]
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                for j in range(start, end):
                    acc += values[j] * x[t, cols[j]]
                y[t, r] = acc

    return spmm


class SparseWeight:
    """A pruned weight in one sparse form, applied to (tokens, in) float32 inputs on the CPU."""

    def __init__(self, weight: torch.Tensor, kernel: str):
        w = weight.detach().float().cpu()
        self.kernel, self.out_features = kernel, w.shape[0]
        if kernel == "torch_csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": said once here
                warnings.simplefilter("ignore")
                self.csr = w.to_sparse_csr()
            self.bytes = (
                self.csr.values().numel() * 4
                + (self.csr.col_indices().numel() + w.shape[0] + 1) * 8
            )
        else:
            import scipy.sparse

            sp = scipy.sparse.csr_matrix(w.numpy())
            if kernel == "scipy_csr":
                self.sp = sp
                self.bytes = sp.data.nbytes + sp.indices.nbytes + sp.indptr.nbytes
            else:
                assert w.shape[1] <= 65536, "16-bit column indices"
                self.indptr = sp.indptr.astype(np.int32)
                self.cols = sp.indices.astype(np.uint16)
                self.values = sp.data.astype(np.float32)
                self.spmm = _csr16_kernel()
                self.bytes = self.values.nbytes + self.cols.nbytes + self.indptr.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch_csr":
            return torch.sparse.mm(self.csr, x.t()).t()
        xs = np.ascontiguousarray(x.numpy())
        if self.kernel == "scipy_csr":
            return torch.from_numpy(np.ascontiguousarray((self.sp @ xs.T).T))
        y = np.empty((xs.shape[0], self.out_features), dtype=np.float32)
        self.spmm(self.indptr, self.cols, self.values, xs, y)
        return torch.from_numpy(y)


class SparseLinear(nn.Module):
    """A pruned nn.Linear whose product runs by a sparse kernel; counts its calls (a test can
    assert the sparse kernel really ran)."""

    def __init__(self, linear: nn.Linear, kernel: str):
        super().__init__()
        self.sparse = SparseWeight(linear.weight, kernel)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        shape = x.shape
        y = self.sparse(x.reshape(-1, shape[-1]).float()).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def swap_in(model: nn.Module, names: list[str], kernel: str) -> dict[str, nn.Linear]:
    """Replace the named linears by SparseLinear in place; returns the originals (swap_out)."""
    originals = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        originals[name] = getattr(parent, attr)
        setattr(parent, attr, SparseLinear(originals[name], kernel))
    return originals


def swap_out(model: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)


# ----------------------------------------------------------------------------- timing


def _median_s(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth of this machine now: a copy of `mib` MiB, bytes read + written / time."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    t = _median_s(lambda: b.copy_(a), repeats, 1)
    return 2 * a.numel() * 4 / t / 1e9


@torch.no_grad()
def prefill_tps(model: nn.Module, vocab: int, batch: int, seqlen: int, spec: SpeedSpec) -> float:
    x = torch.randint(vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    return (
        batch
        * seqlen
        / _median_s(lambda: model(input_ids=x, use_cache=False), spec.prefill_repeats, 0)
    )


@torch.no_grad()
def decode_ms(model: nn.Module, vocab: int, batch: int, spec: SpeedSpec) -> float:
    """Median ms per generated token (greedy, with the KV cache) after a 16-token prompt."""
    from transformers import DynamicCache

    prompt = torch.randint(vocab, (batch, 16), generator=torch.Generator().manual_seed(0))
    # transformers 5.24 names the KV cache `cache` (`past_key_values` is deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def generate():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, use_cache=True, **{key: cache})
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(spec.decode_tokens):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            token = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / spec.decode_tokens

    for _ in range(spec.warmup):
        generate()
    return 1000 * statistics.median(generate() for _ in range(spec.repeats))


def pick_kernel(
    linears: dict[str, nn.Linear], spec: SpeedSpec, tokens: int = 1
) -> tuple[str, dict[str, float]]:
    """The fastest candidate for `tokens` input rows over the model's own pruned weights (each
    kernel timed on every pruned linear in turn, side by side, after a warm-up)."""
    x = {n: torch.randn(tokens, lin.in_features) for n, lin in linears.items()}
    totals = {}
    for kernel in spec.kernels:
        forms = {n: SparseWeight(lin.weight, kernel) for n, lin in linears.items()}
        totals[kernel] = _median_s(
            lambda: [forms[n](x[n]) for n in forms], spec.repeats, max(1, spec.warmup)
        )
    dense_s = _median_s(
        lambda: [F.linear(x[n], lin.weight.float()) for n, lin in linears.items()],
        spec.repeats,
        max(1, spec.warmup),
    )
    best = min(totals, key=totals.get)
    return best, {
        "dense_ms": round(1000 * dense_s, 3),
        **{f"{k}_ms": round(1000 * v, 3) for k, v in totals.items()},
    }


# ----------------------------------------------------------------------------- the measurement


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter once (a tied weight counts once), in its dtype."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


@torch.no_grad()
def measure(
    model: nn.Module,
    names: list[str],
    seqlen: int,
    device: torch.device,
    pattern: str,
    spec: SpeedSpec,
) -> dict[str, Any]:
    """Dense and sparse prefill / decode of `model` with its pruned linears `names`, the
    bandwidth floor beside them, and the check that the sparse model computes the dense one's
    logits (results.json `speed`)."""
    if device.type != "cpu":
        return {
            "skipped": "the sparse kernels here run on the CPU; CUDA (2:4 semi-structured) is not "
            "built or measured yet"
        }
    vocab = model.config.vocab_size
    linears = {n: model.get_submodule(n) for n in names}
    bandwidth = bandwidth_gbs()
    kernel, kernels = pick_kernel(linears, spec)  # decode: one token at a time
    prefill_kernel, prefill_kernels = pick_kernel(linears, spec, tokens=64)  # prefill: many rows
    dense_bytes = weight_bytes(model)
    pruned_dense = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears.values())
    probe = torch.randint(vocab, (1, min(seqlen, 64)), generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {
        "kernel": kernel,
        "prefill_kernel": prefill_kernel,
        "kernels_64_tokens": prefill_kernels,
        "kernels_one_token": kernels,
        "bandwidth_gbs": round(bandwidth, 2),
        "pattern": pattern,
        "threads": torch.get_num_threads(),
    }
    if ":" in pattern:
        out["note"] = (
            f"no {pattern} kernel on the CPU: its masks run through the unstructured {kernel} "
            "kernel"
        )
    dense_logits = model(input_ids=probe, use_cache=False).logits
    for mode in ("dense", "sparse"):
        originals = swap_in(model, names, kernel) if mode == "sparse" else {}
        try:
            stats: dict[str, Any] = {}
            for b in spec.batch_sizes:
                stats[f"prefill_tps_b{b}"] = round(prefill_tps(model, vocab, b, seqlen, spec), 2)
                stats[f"decode_ms_b{b}"] = round(decode_ms(model, vocab, b, spec), 3)
            if mode == "sparse":
                sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
                stats["sparse_calls"] = sum(m.calls for m in sparse)
                read = dense_bytes - pruned_dense + sum(m.sparse.bytes for m in sparse)
                logits = model(input_ids=probe, use_cache=False).logits
                stats["logits_max_abs_diff"] = float((logits - dense_logits).abs().max())
                stats["logits_max_abs"] = float(dense_logits.abs().max())
            else:
                read = dense_bytes
            stats["bytes_per_token"] = read
            stats["floor_ms_per_token"] = round(1000 * read / (bandwidth * 1e9), 4)
            for b in spec.batch_sizes:
                stats[f"decode_over_floor_b{b}"] = round(
                    stats[f"decode_ms_b{b}"] / stats["floor_ms_per_token"], 2
                )
            out[mode] = stats
        finally:
            swap_out(model, originals)
    d, s = out["dense"], out["sparse"]
    out["speedup"] = {
        **{
            f"decode_b{b}": round(d[f"decode_ms_b{b}"] / s[f"decode_ms_b{b}"], 3)
            for b in spec.batch_sizes
        },
        **{
            f"prefill_b{b}": round(s[f"prefill_tps_b{b}"] / d[f"prefill_tps_b{b}"], 3)
            for b in spec.batch_sizes
        },
        "floor": round(d["bytes_per_token"] / s["bytes_per_token"], 3),
    }
    return out
