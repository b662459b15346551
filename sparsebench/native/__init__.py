"""The compiled CPU kernels for pruned weights, built from source with the machine's C++
compiler against the installed torch into one library, and loaded as torch operators
(`torch.ops.sparsebench.*`): bitmask.cpp (the expand form: a mask bit per weight and the kept
values, what `save.format=bitmask` writes) and gather.cpp (the index-gather form: the kept
values and their 16-bit column indices).

    python -m sparsebench.native           # build (make install runs it); one line either way

The build is keyed by the source, the compile line, torch's version and Python, so an edited
source or a new torch is never served by a stale library: the first use rebuilds it (about 15 s).
Where no
compiler is found or the build fails, `why_unavailable()` says so in one line and the other
kernels of evaluation/kernels.py remain.

Paths (cpu.h, both kernels): `avx512`, `avx2`, `portable`, chosen from the CPU's flags; the
environment variable SPARSEBENCH_BITMASK_PATH forces one (a path this CPU lacks is refused with
the ones it has), so one machine tests every path it has. The AVX-512 expand loop at one token
moves a mask word's quarters into mask registers or loads them (which is faster depends on the
core, bitmask.cpp): measured once a process, or forced by SPARSEBENCH_EXPAND_MASKS=loads|moves;
`expand_masks()` says which ran. Either way the bits are the same.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from ..errors import SparsebenchError

HERE = Path(__file__).parent
SOURCES = (HERE / "bitmask.cpp", HERE / "gather.cpp")
HEADERS = (HERE / "cpu.h",)
PATHS = {"portable": 1, "avx2": 2, "avx512": 3}
PATH_NAMES = {v: k for k, v in PATHS.items()}
ENV_PATH = "SPARSEBENCH_BITMASK_PATH"
ENV_MASKS = "SPARSEBENCH_EXPAND_MASKS"
MASKS = ("loads", "moves")  # bitmask.cpp's masks_mode 0, 1
PAD = 16  # values past nnz that the kernel may read (bitmask.cpp PAD)


def compiler() -> str | None:
    """$CXX, else the first C++ compiler on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build_dir() -> Path:
    here = HERE / "_build"
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here
    except OSError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsebench"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _library_path(cxx: str) -> Path:
    """Keyed by the sources, the compile line (flags, torch's headers), torch and Python."""
    line = " ".join(_command(cxx, Path("out.so")))
    text = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    key = hashlib.sha256(
        text + line.encode() + torch.__version__.encode() + sys.version.encode()
    ).hexdigest()[:16]
    return _build_dir() / f"sparsebench_bitmask_{key}.so"


def _command(cxx: str, out: Path) -> list[str]:
    """The compile line. -fopenmp: at::parallel_for is a header template whose OpenMP loop is
    compiled here (without it the kernel runs on one thread); the library then needs
    libgomp.so.1, the soname torch has already loaded, so both share torch's one thread pool."""
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        cxx,
        "-O3",
        "-fopenmp",
        "-std=c++20",  # torch 2.13's headers use C++20 bit-field initializers
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()),
        f"-I{sysconfig.get_paths()['include']}",
        *(str(f) for f in SOURCES),
        "-o",
        str(out),
        *(f"-L{p}" for p in library_paths()),
        *(f"-Wl,-rpath,{p}" for p in library_paths()),
        "-lc10",
        "-ltorch_cpu",
    ]


def build(force: bool = False) -> Path:
    """Compile the kernels (once per source, torch and compiler); the library's path. Raises
    SparsebenchError with the compiler's first error line when it cannot."""
    cxx = compiler()
    if cxx is None:
        raise SparsebenchError("no C++ compiler found (set CXX or install g++)")
    out = _library_path(cxx)
    if out.exists() and not force:
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # concurrent builds: each writes its own file
    done = subprocess.run(_command(cxx, tmp), capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or [done.stderr[-300:]]
        raise SparsebenchError(f"building the compiled kernels failed: {errors[0].strip()}")
    tmp.replace(out)
    return out


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Build if needed and load the operators; None, or why they are unavailable."""
    if sys.platform != "linux":
        return f"the compiled kernels are built on Linux only, not {sys.platform}"
    try:
        path = build()
        torch.ops.load_library(str(path))
    except (SparsebenchError, OSError, RuntimeError) as err:
        return str(err).splitlines()[0]
    return None


def why_unavailable() -> str | None:
    """None when the kernel is loaded, else one line saying why it is not."""
    return _load()


def supported() -> list[str]:
    """The paths this CPU runs, best first (empty when the kernel is unavailable)."""
    if _load():
        return []
    ops = torch.ops.sparsebench
    return [
        name for name, p in sorted(PATHS.items(), key=lambda kv: -kv[1]) if ops.bitmask_supported(p)
    ]


def chosen_path() -> str:
    """The path the kernel runs: SPARSEBENCH_BITMASK_PATH if set (and this CPU has it), else the
    best this CPU has."""
    have = supported()
    asked = os.environ.get(ENV_PATH, "").strip().lower()
    if asked in ("", "auto"):
        return have[0]
    if asked not in PATHS:
        raise SparsebenchError(
            f"{ENV_PATH}={asked!r} is not a path; allowed: auto, {', '.join(PATHS)}"
        )
    if asked not in have:
        raise SparsebenchError(
            f"{ENV_PATH}={asked}: this CPU lacks it; allowed here: auto, {', '.join(have)}"
        )
    return asked


def expand_masks() -> str:
    """How the AVX-512 expand loop at one token takes its masks: loads | moves (measured on
    first use, or SPARSEBENCH_EXPAND_MASKS)."""
    _require()
    _check_masks()
    return MASKS[int(torch.ops.sparsebench.bitmask_masks(-1))]


def _check_masks() -> None:
    asked = os.environ.get(ENV_MASKS, "").strip().lower()
    if asked not in ("", "auto", *MASKS):
        raise SparsebenchError(f"{ENV_MASKS}={asked!r} is not a mode; allowed: auto, loads, moves")


def check_forced_path() -> None:
    """Refuse a bad SPARSEBENCH_BITMASK_PATH or SPARSEBENCH_EXPAND_MASKS now (one line), not
    when the kernel first runs."""
    _check_masks()
    asked = os.environ.get(ENV_PATH, "").strip().lower()
    if asked in ("", "auto"):
        return
    if asked not in PATHS:
        raise SparsebenchError(
            f"{ENV_PATH}={asked!r} is not a path; allowed: auto, {', '.join(PATHS)}"
        )
    if why_unavailable() is None:
        chosen_path()


def _require() -> None:
    why = _load()
    if why:
        raise SparsebenchError(f"the compiled kernels are unavailable: {why}")


def calls(path: str, kernel: str = "bitmask") -> int:
    """How many products `kernel` (bitmask | gather) has run on `path` in this process."""
    _require()
    return int(getattr(torch.ops.sparsebench, f"{kernel}_calls")(PATHS[path]))


def operator(kernel: str = "bitmask"):
    """torch.ops.sparsebench.bitmask_linear (x, bits, values, rowptr, in_features, path id), or
    gather_linear (x, cols, values, rowptr, in_features, path id)."""
    _require()
    return getattr(torch.ops.sparsebench, f"{kernel}_linear")


def linear(x, index, values, rowptr, in_features: int, path: str, kernel: str = "bitmask"):
    """y = x @ W^T for W in `kernel`'s layout (`layout_of_weight`), x float32 (tokens, in);
    `index` is the mask's bits (bitmask) or the kept weights' columns (gather)."""
    return operator(kernel)(x, index, values, rowptr, in_features, PATHS[path])


def main() -> int:
    try:
        path = build()
    except SparsebenchError as err:
        print(f"bitmask and gather kernels: unavailable ({err}); the other kernels remain")
        return 0
    why = why_unavailable()
    if why:
        print(f"bitmask and gather kernels: built at {path} but do not load ({why})")
        return 0
    print(
        f"bitmask and gather kernels: built ({path.name}); paths on this CPU: "
        f"{', '.join(supported())}"
    )
    return 0


# ----------------------------------------------------------------------------- the layout


def layout(keep: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
    """The kernel's form of a (out, in) weight from its mask `keep` and its kept values in
    row-major order: (bits int64 (out, words), values `dtype` (nnz + PAD), rowptr int64 (out+1)).
    The values are the export's values tensor as stored (formats.pack), padded."""
    out, cols = keep.shape
    words = -(-cols // 64)
    padded = torch.zeros(out, words * 64, dtype=torch.bool)
    padded[:, :cols] = keep
    bits = np.packbits(padded.numpy(), axis=1, bitorder="little").view(np.int64)
    rowptr = torch.zeros(out + 1, dtype=torch.int64)
    rowptr[1:] = keep.sum(1).cumsum(0)
    vals = torch.cat([values.reshape(-1).to(dtype), torch.zeros(PAD, dtype=dtype)])
    return torch.from_numpy(bits.copy()), vals, rowptr


def layout_of_weight(weight: torch.Tensor, dtype: torch.dtype, kernel: str = "bitmask"):
    """`kernel`'s form (bitmask | gather) of a pruned weight: its nonzeros are the kept ones."""
    keep = weight.detach().cpu() != 0
    build = layout if kernel == "bitmask" else gather_layout
    return build(keep, weight.detach().cpu()[keep], dtype)


def layout_of_export(values: torch.Tensor, bits: torch.Tensor, shape, dtype: torch.dtype):
    """From a `save.format=bitmask` entry (formats.pack: numpy.packbits of the flattened mask,
    big-endian bit order): the same bits, reordered within bytes and padded to 64 per row."""
    n = int(np.prod(shape))
    keep = torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).reshape(shape)
    return layout(keep, values, dtype)


def gather_layout(keep: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
    """gather.cpp's form of a (out, in) weight from its mask and its kept values in row-major
    order: (cols int16 (nnz + PAD): each kept weight's column as 16 bits, values `dtype`
    (nnz + PAD), rowptr int64 (out + 1))."""
    if keep.shape[1] > 65536:
        raise SparsebenchError(f"{keep.shape[1]} columns do not fit the gather form's 16 bits")
    cols = keep.nonzero()[:, 1].to(torch.int32)  # row-major order, as the values
    cols = torch.cat([cols, torch.zeros(PAD, dtype=torch.int32)])
    cols = torch.from_numpy(cols.numpy().astype(np.uint16).view(np.int16))
    rowptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    rowptr[1:] = keep.sum(1).cumsum(0)
    vals = torch.cat([values.reshape(-1).to(dtype), torch.zeros(PAD, dtype=dtype)])
    return cols, vals, rowptr
