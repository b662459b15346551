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

from .errors import SparsebenchError
from .registry import option

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
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
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


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    if (code := code_version()) is not None:
        out["sparsebench_commit"] = code
    for pkg in ("sparsebench", "torch", "transformers", "hydra-core", "datasets", "tokenizers", "gguf", "wandb", "lm-eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
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
            **identity,  # fingerprint, protocol_id (sparsebench/ledger.py)
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

    def __init__(self, mode: str, project: str, entity: str | None, group: str | None, name: str, config: dict, directory: Path):
        if mode not in LOGGER_MODES:
            raise SparsebenchError(f"unknown logger.mode '{mode}'; valid: {', '.join(LOGGER_MODES)}")
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise SparsebenchError("wandb is not installed; pip install wandb, or use logger=disabled") from None
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=mode, project=project, entity=entity, group=group, name=name, config=config, dir=str(directory), reinit="finish_previous"
        )

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
