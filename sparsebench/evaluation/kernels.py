"""Sparse forms of a pruned weight and the kernels that multiply by them; evaluation/speed.py
times them against the dense kernel.

    kernel           device  pattern          form (bytes per kept weight beyond its value)
    torch_csr        both    any              torch CSR tensor, torch.sparse.mm (8: int64
                                              index; cuSPARSE SpMM on CUDA)
    scipy_csr        cpu     any              scipy.sparse.csr_matrix @ x (4: int32 index)
    csr16            cpu     any              CSR, 16-bit column indices, 32-bit row pointers,
                                              numba kernels of this file (2)
    semi_structured  cuda    2:4              torch's SparseSemiStructuredTensor (cuSPARSELt,
                                              or CUTLASS where cuSPARSELt is absent; packed
                                              values + metadata)

`unavailable` says why a kernel cannot run a model's pruned weights (wrong device, a pattern it
does not support, a shape its backend refuses, a weight that is not really 2:4) before anything
is converted: torch's 2:4 compression keeps two values of every group of four without checking,
so a weight with three would be pruned further, silently, and timed as if it were the model.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEVICES = {
    "torch_csr": ("cpu", "cuda"),
    "scipy_csr": ("cpu",),
    "csr16": ("cpu",),
    "semi_structured": ("cuda",),
}
KERNELS = tuple(DEVICES)
# The 2:4 tensor's rows and columns must be multiples of these, per dtype: the stricter of
# torch 2.13's two backends (CUTLASS; cuSPARSELt asks 16 x 16 for half types and has no float32).
SEMI_STRUCTURED_MULTIPLES = {
    torch.float16: (32, 64),
    torch.bfloat16: (32, 64),
    torch.float32: (32, 32),
}


def kernels_for(device: torch.device, pattern: str) -> tuple[str, ...]:
    """The candidates that apply to a device and pattern (the default of eval.speed.kernels)."""
    return tuple(
        k
        for k in KERNELS
        if device.type in DEVICES[k] and (k != "semi_structured" or pattern == "2:4")
    )


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of `m` consecutive weights along a row (the input dimension) that keep more than
    `n` nonzeros; 0 for a valid N:M weight."""
    rows, cols = weight.shape
    if cols % m:
        return rows * -(-cols // m)  # no grouping fits: every group counts as invalid
    return int(((weight.reshape(rows, cols // m, m) != 0).sum(-1) > n).sum())


def unavailable(
    kernel: str, device: torch.device, pattern: str, weights: dict[str, torch.Tensor]
) -> str | None:
    """Why `kernel` cannot run these pruned weights on `device` (None: it can)."""
    if device.type not in DEVICES[kernel]:
        return f"{kernel} runs on {' and '.join(DEVICES[kernel])}, the model is on {device.type}"
    if kernel == "csr16":
        wide = [n for n, w in weights.items() if w.shape[1] > 65536]
        if wide:
            return f"{wide[0]} has more than 65536 columns (16-bit indices)"
    if kernel == "semi_structured":
        if pattern != "2:4":
            return f"semi-structured sparse tensors run 2:4 only, not {pattern}"
        for name, w in weights.items():
            multiple = SEMI_STRUCTURED_MULTIPLES.get(w.dtype)
            if multiple is None:
                return (
                    f"{name} is {w.dtype}; 2:4 runs {sorted(map(str, SEMI_STRUCTURED_MULTIPLES))}"
                )
            if w.shape[0] % multiple[0] or w.shape[1] % multiple[1]:
                return f"{name} {tuple(w.shape)} is not a multiple of {multiple} for {w.dtype}"
            bad = nm_violations(w, 2, 4)
            if bad:
                return f"{name} has {bad} groups of 4 with more than 2 nonzeros"
    return None


@functools.lru_cache(maxsize=None)
def csr16_kernels():
    """Two numba kernels over the same CSR form, rows of W in parallel; each output is the sum
    of its row's kept products in column order, so both give the same bits.

    few(x (tokens, in)): per output, one pass over the row per token; best for one token.
    many(xt (in, tokens)): per row, one pass over its nonzeros, each scaling a contiguous row of
    xt into `tokens` accumulators; indices are read once for all tokens (prefill)."""
    import numba

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def few(indptr, cols, values, x, y):
        for r in numba.prange(indptr.shape[0] - 1):
            start, end = indptr[r], indptr[r + 1]
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                for j in range(start, end):
                    acc += values[j] * x[t, cols[j]]
                y[t, r] = acc

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def many(indptr, cols, values, xt, yt):
        tokens = xt.shape[1]
        for r in numba.prange(indptr.shape[0] - 1):
            acc = np.zeros(tokens, dtype=np.float32)
            for j in range(indptr[r], indptr[r + 1]):
                v, c = values[j], cols[j]
                for t in range(tokens):
                    acc[t] += v * xt[c, t]
            yt[r, :] = acc

    return few, many


# At this many input rows and more, csr16 switches to its `many` kernel: on SmolLM2's
# 1536 x 576 MLP shape (2 threads, 0.5 and 0.9) `few` wins at 1 and 2 rows, `many` from 4
# (7x faster at 64 rows; docs/speed.md).
CSR16_MANY_FROM = 4


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class SparseWeight:
    """A pruned weight in one sparse form: `self(x)` for x of shape (tokens, in) gives
    (tokens, out). The CPU forms compute in float32 (the CPU protocol's dtype; scipy and numba
    have no bfloat16), the CUDA forms in the weight's dtype. `bytes`: what the form stores."""

    def __init__(self, weight: torch.Tensor, kernel: str):
        self.kernel, self.out_features = kernel, weight.shape[0]
        if kernel == "semi_structured":
            from torch.sparse import to_sparse_semi_structured

            self.w = to_sparse_semi_structured(weight.detach().contiguous())
            self.bytes = tensor_bytes(self.w.packed, self.w.meta)
            return
        w = weight.detach()
        w = w.float() if w.device.type == "cpu" else w  # CUDA: cuSPARSE in the weight's dtype
        if kernel == "torch_csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": said once here
                warnings.simplefilter("ignore")
                self.csr = w.to_sparse_csr()
            self.bytes = tensor_bytes(
                self.csr.values(), self.csr.col_indices(), self.csr.crow_indices()
            )
            return
        import scipy.sparse

        sp = scipy.sparse.csr_matrix(w.numpy())
        if kernel == "scipy_csr":
            self.sp = sp
            self.bytes = sp.data.nbytes + sp.indices.nbytes + sp.indptr.nbytes
            return
        assert kernel == "csr16" and w.shape[1] <= 65536, (kernel, w.shape)
        self.indptr = sp.indptr.astype(np.int32)
        self.cols = sp.indices.astype(np.uint16)
        self.values = sp.data.astype(np.float32)
        self.few, self.many = csr16_kernels()
        self.bytes = self.values.nbytes + self.cols.nbytes + self.indptr.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "semi_structured":
            return F.linear(x, self.w)
        if self.kernel == "torch_csr":
            return torch.sparse.mm(self.csr, x.to(self.csr.dtype).t()).t()
        xs = x.float().numpy()
        if self.kernel == "scipy_csr":
            return torch.from_numpy(np.ascontiguousarray((self.sp @ xs.T).T))
        if xs.shape[0] < CSR16_MANY_FROM:
            y = np.empty((xs.shape[0], self.out_features), dtype=np.float32)
            self.few(self.indptr, self.cols, self.values, np.ascontiguousarray(xs), y)
            return torch.from_numpy(y)
        yt = np.empty((self.out_features, xs.shape[0]), dtype=np.float32)
        self.many(self.indptr, self.cols, self.values, np.ascontiguousarray(xs.T), yt)
        return torch.from_numpy(yt).t()


class SparseLinear(nn.Module):
    """A pruned nn.Linear whose product runs by sparse kernels: `decode` for inputs of fewer
    than `rows_many` rows (one token of one sequence), `prefill` for the rest (the same form
    when the two are one kernel).
    Counts its calls, so a test can assert the sparse kernel really ran."""

    def __init__(self, linear: nn.Linear, decode: str, prefill: str, rows_many: int = 2):
        super().__init__()
        self.decode = SparseWeight(linear.weight, decode)
        self.prefill = self.decode if prefill == decode else SparseWeight(linear.weight, prefill)
        self.rows_many, self.bias = rows_many, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.calls = 0

    @property
    def bytes(self) -> int:  # what one decoded token reads
        return self.decode.bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        form = self.prefill if rows.shape[0] >= self.rows_many else self.decode
        y = form(rows).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def swap_in(
    model: nn.Module, names: list[str], decode: str, prefill: str, rows_many: int = 2
) -> dict[str, nn.Linear]:
    """Replace the named linears by SparseLinear in place; returns the originals (swap_out)."""
    originals = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        originals[name] = getattr(parent, attr)
        setattr(parent, attr, SparseLinear(originals[name], decode, prefill, rows_many))
    return originals


def swap_out(model: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)
