"""results.json (written atomically after every stage) and the wandb logger."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..errors import SparsebenchError
from ..registry import option

LOGGER_MODES = ("online", "offline", "disabled")


@dataclass
class LoggerSpec:
    mode: str = option("offline", choices=LOGGER_MODES)
    project: str = "sparsebench"
    entity: str | None = None
    group: str | None = None


def code_version() -> str | None:
    """The git commit of the sparsebench checkout (with '+dirty' for local changes), if any."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, data: dict) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _cpu_model() -> str:
    """The CPU's name with its family and model numbers (a virtual machine often reports only
    'AMD EPYC', which names several generations with different vector units)."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break
        name = fields.get("model name", platform.machine())
        if "cpu family" in fields and "model" in fields:
            name += f" (family {fields['cpu family']}, model {fields['model']})"
        return name
    except OSError:
        return platform.processor() or platform.machine()


def _cpu_vector_flags() -> str:
    """The vector extensions the CPU reports that ATen's kernels choose between."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return " ".join(
        f
        for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")
        if f in flags
    )


def kernel_environment() -> dict[str, Any]:
    """What decides the last bits of every CPU reduction and GEMM, and so a chaotic row's
    value (SparseGPT at high sparsity compounds them through every block): the CPU, the
    ATen vector kernels in use (ATEN_CPU_CAPABILITY caps them), the BLAS and its dispatch
    (MKL_CBWR pins MKL's code path), and the thread counts. Two runs agree bit for bit only
    when all of these agree (docs/results.md, "Kernel environment")."""
    blas = "unknown"
    for line in torch.__config__.show().splitlines():
        if "Math Kernel Library" in line or "OpenBLAS" in line:
            blas = line.strip(" -")
            break
    env = {
        k: os.environ[k]
        for k in (
            "ATEN_CPU_CAPABILITY",
            "MKL_CBWR",
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "OPENBLAS_CORETYPE",
            "SPARSEBENCH_BITMASK_PATH",  # forces a path of the compiled bitmask kernel
            "SPARSEBENCH_EXPAND_MASKS",  # forces how its AVX-512 loop takes its masks
        )
        if os.environ.get(k)
    }
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_vector_flags(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas,
        "mkl_cbwr": os.environ.get("MKL_CBWR", "unset"),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": env,
    }


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    if (code := code_version()) is not None:
        out["sparsebench_commit"] = code
    for pkg in (
        "sparsebench",
        "torch",
        "transformers",
        "hydra-core",
        "datasets",
        "tokenizers",
        "gguf",
        "wandb",
        "lm-eval",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cudnn"] = str(torch.backends.cudnn.version())
    out["kernels"] = kernel_environment()
    return out


def peak_memory(device: torch.device) -> dict[str, float]:
    # ru_maxrss is KiB on Linux: the process's peak resident set.
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def stage_peak(device: torch.device) -> float:
    """Peak memory (GiB) of the stage that ends now, and a fresh start for the next: on CUDA
    the allocator's peak since the last call; on the CPU the process's peak so far (the
    kernel keeps no resettable peak), so a later stage's figure includes earlier ones."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return round(peak, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


class Results:
    """The run's record; every save() rewrites results.json completely and atomically."""

    def __init__(self, path: Path, config: dict[str, Any], seed: Any, **identity: Any):
        self.path = Path(path)
        self.data: dict[str, Any] = {
            "status": "running",
            "config": config,
            "seed": seed,
            **identity,  # fingerprint, protocol_id (sparsebench/records/ledger.py)
            "metrics": {},
            "timings_s": {},
            "versions": versions(),
            "command": " ".join(sys.argv),
        }
        self.save()

    def update(self, **fields) -> None:
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(self.data.get(key), dict):
                self.data[key].update(value)
            else:
                self.data[key] = value
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


class WandbLogger:
    """One wandb run per job; mode 'disabled' imports nothing and logs nothing."""

    def __init__(
        self,
        mode: str,
        project: str,
        entity: str | None,
        group: str | None,
        name: str,
        config: dict,
        directory: Path,
    ):
        if mode not in LOGGER_MODES:
            raise SparsebenchError(
                f"unknown logger.mode '{mode}'; valid: {', '.join(LOGGER_MODES)}"
            )
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise SparsebenchError(
                "wandb is not installed; pip install wandb, or use logger=disabled"
            ) from None
        directory.mkdir(parents=True, exist_ok=True)
        # wandb's banner, sync hints and run summary would be most of a run's console: silent,
        # and one line of our own says where the run went and how to upload it
        self.run = wandb.init(
            mode=mode,
            project=project,
            entity=entity,
            group=group,
            name=name,
            config=config,
            dir=str(directory),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True),
        )
        self.mode = mode
        if mode == "offline":
            self.where = (
                f"wandb: offline run in {self.run.dir.removesuffix('/files')}; upload it with "
                "`wandb sync "
                f"{self.run.dir.removesuffix('/files')}`"
            )
        else:
            self.where = f"wandb: {getattr(self.run, 'url', None) or self.run.dir}"

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
            self.run = None
