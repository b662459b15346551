"""Sparse forms of a pruned weight and the kernels that multiply by them; evaluation/speed.py
times them against the dense kernel.

    kernel           device  pattern          form (bytes per kept weight beyond its value)
    torch_csr        both    any              torch CSR tensor, torch.sparse.mm (8: int64
                                              index; cuSPARSE SpMM on CUDA)
    scipy_csr        cpu     any              scipy.sparse.csr_matrix @ x (4: int32 index)
    csr16            cpu     any              CSR, 16-bit column indices, 32-bit row pointers,
                                              numba kernels of this file (2)
    bitmask          cpu     any              the bitmask export's form: 1 bit per weight +
                                              kept values (float32, or bfloat16 for a bfloat16
                                              model), the compiled expand kernel of
                                              sparsebench/native (1/8 per weight, not per kept)
    gather           cpu     any              CSR with 16-bit column indices, the compiled
                                              index-gather kernel of sparsebench/native (2);
                                              values as bitmask's
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
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..registry import Registry

# The 2:4 tensor's rows and columns must be multiples of these, per dtype: the stricter of
# torch 2.13's two backends (CUTLASS; cuSPARSELt asks 16 x 16 for half types and has no float32).
SEMI_STRUCTURED_MULTIPLES = {
    torch.float16: (32, 64),
    torch.bfloat16: (32, 64),
    torch.float32: (32, 32),
}


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of `m` consecutive weights along a row (the input dimension) that keep more than
    `n` nonzeros; 0 for a valid N:M weight."""
    rows, cols = weight.shape
    if cols % m:
        return rows * -(-cols // m)  # no grouping fits: every group counts as invalid
    return int(((weight.reshape(rows, cols // m, m) != 0).sum(-1) > n).sum())


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class SparseForm:
    """A pruned weight in one sparse form: `self(x)` for x of shape (tokens, in) gives
    (tokens, out); `bytes` is what the form stores. The CPU forms compute in float32 (the CPU
    protocol's dtype; scipy and numba have no bfloat16), the CUDA forms in the weight's dtype.

    A kernel says where it runs (`devices`), which patterns it runs (`patterns`, None: any) and
    why it cannot hold a given weight (`refuses`), so nothing is converted that it would get
    wrong."""

    name: ClassVar[str]  # set by FORMS.register
    devices: ClassVar[tuple[str, ...]]
    patterns: ClassVar[tuple[str, ...] | None] = None
    bytes: int

    @classmethod
    def refuses(cls, name: str, weight: torch.Tensor) -> str | None:
        return None

    def __init__(self, weight: torch.Tensor):
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


FORMS = Registry("eval.speed kernel")


@FORMS.register("torch_csr")
class TorchCSR(SparseForm):
    """torch's CSR tensor and `torch.sparse.mm` (MKL on the CPU, cuSPARSE on CUDA); 64-bit
    indices."""

    devices = ("cpu", "cuda")

    def __init__(self, weight):
        w = weight.detach()
        w = w.float() if w.device.type == "cpu" else w  # CUDA: cuSPARSE in the weight's dtype
        with warnings.catch_warnings():  # "sparse CSR support is in beta": said once here
            warnings.simplefilter("ignore")
            self.csr = w.to_sparse_csr()
        self.bytes = tensor_bytes(
            self.csr.values(), self.csr.col_indices(), self.csr.crow_indices()
        )

    def __call__(self, x):
        return torch.sparse.mm(self.csr, x.to(self.csr.dtype).t()).t()


@FORMS.register("scipy_csr")
class ScipyCSR(SparseForm):
    """scipy.sparse's CSR matrix times a dense one; int32 indices."""

    devices = ("cpu",)

    def __init__(self, weight):
        import scipy.sparse

        self.sp = scipy.sparse.csr_matrix(weight.detach().float().numpy())
        self.bytes = self.sp.data.nbytes + self.sp.indices.nbytes + self.sp.indptr.nbytes

    def __call__(self, x):
        return torch.from_numpy(np.ascontiguousarray((self.sp @ x.float().numpy().T).T))


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
# (7x faster at 64 rows; docs/notes/2026-12-02-cpu-sparse-kernels.md).
CSR16_MANY_FROM = 4


@FORMS.register("csr16")
class CSR16(SparseForm):
    """CSR with 16-bit column indices and 32-bit row pointers, the numba kernels above."""

    devices = ("cpu",)

    @classmethod
    def refuses(cls, name, weight):
        if weight.shape[1] > 65536:
            return f"{name} has more than 65536 columns (16-bit indices)"
        return None

    def __init__(self, weight):
        import scipy.sparse

        sp = scipy.sparse.csr_matrix(weight.detach().float().numpy())
        self.out_features = weight.shape[0]
        self.indptr = sp.indptr.astype(np.int32)
        self.cols = sp.indices.astype(np.uint16)
        self.values = sp.data.astype(np.float32)
        self.few, self.many = csr16_kernels()
        self.bytes = self.values.nbytes + self.cols.nbytes + self.indptr.nbytes

    def __call__(self, x):
        import numba

        # as many threads as torch's dense kernel has: the comparison is side by side
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        xs = x.float().numpy()
        if xs.shape[0] < CSR16_MANY_FROM:
            y = np.empty((xs.shape[0], self.out_features), dtype=np.float32)
            self.few(self.indptr, self.cols, self.values, np.ascontiguousarray(xs), y)
            return torch.from_numpy(y)
        yt = np.empty((self.out_features, xs.shape[0]), dtype=np.float32)
        self.many(self.indptr, self.cols, self.values, np.ascontiguousarray(xs.T), yt)
        return torch.from_numpy(yt).t()


@FORMS.register("bitmask")
class Bitmask(SparseForm):
    """The form `save.format=bitmask` stores (a mask bit per weight, the kept values in row-major
    order), multiplied by the compiled expand kernel (sparsebench/native/bitmask.cpp) on the
    path this CPU has (avx512, avx2, portable; SPARSEBENCH_BITMASK_PATH forces one). Values stay
    in bfloat16 for a bfloat16 weight (half the bytes), float32 otherwise; inputs and outputs
    are float32 like the other CPU forms."""

    devices = ("cpu",)

    @classmethod
    def refuses(cls, name, weight):
        why = native.why_unavailable()
        return f"the compiled {cls.name} kernel is unavailable: {why}" if why else None

    def __init__(self, weight):
        dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
        self._hold(native.layout_of_weight(weight, dtype, self.name), weight.shape[1], self.name)

    @classmethod
    def from_export(cls, values, bits, shape):
        """The form read from a bitmask export's entry (`<name>.__values`, `.__bits`), with
        no dense weight in between."""
        dtype = torch.bfloat16 if values.dtype == torch.bfloat16 else torch.float32
        form = cls.__new__(cls)
        form._hold(native.layout_of_export(values, bits, shape, dtype), int(shape[1]))
        return form

    def _hold(self, layout, in_features, kernel="bitmask"):
        # bits: the mask words (bitmask) or the kept weights' 16-bit columns (gather)
        self.bits, self.values, self.rowptr = layout
        self.in_features, self.path = in_features, native.chosen_path()
        # the operator and its arguments bound once: a decoded token makes 120-210 calls
        self.op = native.operator(kernel)
        self.args = (self.bits, self.values, self.rowptr, in_features, native.PATHS[self.path])
        nnz = int(self.rowptr[-1])
        index = self.bits if kernel == "bitmask" else self.bits[:nnz]  # not the padding
        self.bytes = tensor_bytes(index, self.rowptr) + nnz * self.values.element_size()

    def __call__(self, x):
        # the operator checks the dtype and makes x contiguous itself: no copy asked here
        return self.op(x if x.dtype == torch.float32 else x.float(), *self.args)


@FORMS.register("gather")
class Gather(Bitmask):
    """The kept values and their 16-bit column indices (the form of csr16), multiplied by the
    compiled index-gather kernel (sparsebench/native/gather.cpp): its work falls with the
    sparsity, where the expand kernel multiplies every zero of a group of 16, so it is the one
    picked at high sparsities (docs/speed.md). Paths, values and the forcing switch as bitmask's."""

    @classmethod
    def refuses(cls, name, weight):  # csr16's 16-bit columns, then the compiled library
        return CSR16.refuses(name, weight) or super().refuses(name, weight)

    from_export = None  # a bitmask export holds bits, not indices: built from the weight


@FORMS.register("semi_structured")
class SemiStructured(SparseForm):
    """torch's semi-structured 2:4 tensor (cuSPARSELt, or CUTLASS where cuSPARSELt is absent):
    the kept half of the values plus 2:4 metadata; `F.linear` runs the sparse tensor core
    product."""

    devices, patterns = ("cuda",), ("2:4",)

    @classmethod
    def refuses(cls, name, weight):
        multiple = SEMI_STRUCTURED_MULTIPLES.get(weight.dtype)
        if multiple is None:
            return (
                f"{name} is {weight.dtype}; 2:4 runs {sorted(map(str, SEMI_STRUCTURED_MULTIPLES))}"
            )
        if weight.shape[0] % multiple[0] or weight.shape[1] % multiple[1]:
            return (
                f"{name} {tuple(weight.shape)} is not a multiple of {multiple} for {weight.dtype}"
            )
        bad = nm_violations(weight, 2, 4)  # torch would keep 2 of these silently
        return f"{name} has {bad} groups of 4 with more than 2 nonzeros" if bad else None

    def __init__(self, weight):
        from torch.sparse import to_sparse_semi_structured

        self.w = to_sparse_semi_structured(weight.detach().contiguous())
        self.bytes = tensor_bytes(self.w.packed, self.w.meta)

    def __call__(self, x):
        return F.linear(x, self.w)


KERNELS = tuple(FORMS.names())


def kernels_for(device: torch.device, pattern: str) -> tuple[str, ...]:
    """The candidates that apply to a device and pattern (the default of eval.speed.kernels)."""
    forms = {k: FORMS.get(k) for k in KERNELS}
    return tuple(
        k
        for k, form in forms.items()
        if device.type in form.devices and (form.patterns is None or pattern in form.patterns)
    )


def unavailable(
    kernel: str, device: torch.device, pattern: str, weights: dict[str, torch.Tensor]
) -> str | None:
    """Why `kernel` cannot run these pruned weights on `device` (None: it can)."""
    form = FORMS.get(kernel)
    if device.type not in form.devices:
        return f"{kernel} runs on {' and '.join(form.devices)}, the model is on {device.type}"
    if form.patterns is not None and pattern not in form.patterns:
        return f"{kernel} runs {', '.join(form.patterns)} only, not {pattern}"
    for name, w in weights.items():
        why = form.refuses(name, w)
        if why:
            return why
    return None


def sparse_form(weight: torch.Tensor, kernel: str) -> SparseForm:
    return FORMS.get(kernel)(weight)


class SparseLinear(nn.Module):
    """A pruned nn.Linear whose product runs by sparse kernels chosen by the input's rows:
    `decode` below `rows_many` (one token of one sequence), `batch` from `rows_many` to below
    `rows_prefill` (decode of a few sequences), `prefill` from `rows_prefill` (one form per
    kernel, shared where two tiers use the same kernel). A sparse + low-rank linear (OATS,
    lowrank.py) adds its two thin products U (V x) to the sparse one.
    Counts its calls, so a test can assert the sparse kernel really ran."""

    def __init__(
        self,
        linear: nn.Linear,
        decode: str,
        prefill: str,
        rows_many: int = 2,
        batch: str | None = None,
        rows_prefill: int = 16,
    ):
        super().__init__()
        forms: dict[str, SparseForm] = {}
        for k in (decode, batch or prefill, prefill):  # one form per kernel, built once
            if k not in forms:
                forms[k] = sparse_form(linear.weight, k)
        self.decode, self.batch, self.prefill = (
            forms[decode],
            forms[batch or prefill],
            forms[prefill],
        )
        self.rows_many, self.rows_prefill, self.bias = rows_many, rows_prefill, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.lowrank = (  # OATS's factors (U, V), read as they are
            (linear.lowrank_u.detach(), linear.lowrank_v.detach())
            if hasattr(linear, "lowrank_u")
            else None
        )
        self._calls = [0]  # a list: nn.Module's __setattr__ costs a microsecond a call

    @property
    def calls(self) -> int:
        return self._calls[0]

    @property
    def bytes(self) -> int:  # what one decoded token reads
        return self.decode.bytes + (tensor_bytes(*self.lowrank) if self.lowrank else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose: a decoded token of SmolLM2 makes 210 of these calls (120 fused),
        # each of a few microseconds of kernel, so every tensor op here costs a visible share
        # (one module call measured 11.2 us against nn.Linear's 4.7 before it was trimmed)
        self._calls[0] += 1
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        form = (
            self.decode
            if n < self.rows_many
            else self.batch
            if n < self.rows_prefill
            else self.prefill
        )
        y = form(rows)
        if self.lowrank is not None:
            u, v = self.lowrank
            y = y + F.linear(F.linear(rows.to(v.dtype), v), u).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*x.shape[:-1], self.out_features)  # unpacked: a torch.Size costs 1 us more
        return y if y.dtype == x.dtype else y.to(x.dtype)


def swap_out(model: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, linear)


def merged_in(model: nn.Module, factored: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Swap each sparse + low-rank linear for a dense nn.Linear of S + U V (the dense model
    it is compared with); returns the originals (swap_out puts them back)."""
    originals = {}
    for name, lin in factored.items():
        dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          device=lin.weight.device, dtype=lin.weight.dtype)  # fmt: skip
        dense.weight.data.copy_(lin.merged())
        if lin.bias is not None:
            dense.bias.data.copy_(lin.bias)
        parent, _, attr = name.rpartition(".")
        originals[name] = lin
        setattr(model.get_submodule(parent), attr, dense)
    return originals


def lowrank_parts(linears: dict[str, nn.Module]) -> tuple[dict[str, nn.Module], int]:
    """The sparse + low-rank linears (OATS, lowrank.py) in `linears`, and their factors' bytes."""
    from ..lowrank import SparsePlusLowRank

    factored = {n: lin for n, lin in linears.items() if isinstance(lin, SparsePlusLowRank)}
    return factored, sum(tensor_bytes(lin.lowrank_u, lin.lowrank_v) for lin in factored.values())
