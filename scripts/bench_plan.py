"""The memory plan against measured peaks (docs/results.md (history: docs/notes/), "Scale").

Each case runs in a fresh process: imports, then the resident set is read (the baseline),
then the real pipeline runs on a random Llama-shaped model (~470M parameters: hidden 1024,
intermediate 4096, 24 blocks, vocabulary 32000, float32) and the process's peak resident
set minus the baseline is compared with the plan's host total, which the run recorded in
results.json before loading anything.

    python scripts/bench_plan.py                      # all cases, a table on stdout
    python scripts/bench_plan.py sparsegpt elsa       # some of them
    python scripts/bench_plan.py elsa_fsdp2 elsa_l_fsdp2   # FSDP2, 2 gloo ranks under torchrun,
    ~300M model
    python scripts/bench_plan.py --glibc-default elsa      # glibc's default allocator (see below)

The FSDP2 cases run the CLI's pipeline under `torchrun --nproc_per_node=2` (one thread per
rank) on a ~300M model (14 blocks) and compare each rank's measured peak with the plan's
per-rank total.

The plan counts live tensors. glibc's malloc keeps freed blocks below its mmap threshold
in its heap, and that threshold grows (up to 32 MiB) each time a larger block is freed,
so the resident set of a long run also holds freed tensors (measured: ~1.8 GiB per rank
in the FSDP2 case). The children therefore run with MALLOC_MMAP_THRESHOLD_=65536: every
block over 64 KiB is its own mapping, returned when freed, and the resident set follows
the live tensors. `--glibc-default` measures with glibc's default instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ARCH = [
    "model=llama2-7b",
    "model.source=random",
    "model.name=llama-470m-random",
    "model.dtype=float32",
    "model.seqlen=512",
    "model.arch.hidden_size=1024",
    "model.arch.intermediate_size=4096",
    "model.arch.num_hidden_layers=24",
    "model.arch.num_attention_heads=16",
    "model.arch.num_key_value_heads=16",
    "device=cpu",
    "logger=disabled",
    "protocol=cpu",
    "data.nsamples=32",
]
CASES = {
    "sparsegpt": ["method=sparsegpt", "sparsity=0.5"],
    "wanda": ["method=wanda", "sparsity=0.5"],
    "wanda_batch8": ["method=wanda", "sparsity=0.5", "calib_batch=8"],  # eight windows per forward
    "elsa": ["method=elsa", "sparsity=0.5", "method.steps=1", "method.batch_size=1"],
    "elsa_l": ["method=elsa_l", "sparsity=0.5", "method.steps=1", "method.batch_size=1"],
}

ARCH_300M = [
    a.replace("num_hidden_layers=24", "num_hidden_layers=14").replace(
        "llama-470m-random", "llama-300m-random"
    )
    for a in ARCH
]
FSDP_CASES = {
    "elsa_fsdp2": [
        "method=elsa",
        "sparsity=0.5",
        "method.steps=2",
        "method.batch_size=2",
        "engine=fsdp",
    ],
    "elsa_l_fsdp2": [
        "method=elsa_l",
        "sparsity=0.5",
        "method.steps=2",
        "method.batch_size=2",
        "engine=fsdp",
    ],
}

CHILD = r"""
import json, resource, sys
from pathlib import Path
import torch
import transformers  # noqa: F401
from sparsebench import run as runmod
from hydra import compose, initialize_config_dir

import os
torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 2)
def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30
base = rss_gib()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[3:])
res = runmod.run(cfg, Path(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "baseline": base, "peak": peak, "plan":
res.get("plan"),
                  "status": res.get("status")}))
"""


MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child_env(glibc_default: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    return env if glibc_default else {**env, **MMAP}


def measure(name: str, conf: Path, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(conf), out, *ARCH, *CASES[name]],
            capture_output=True,
            text=True,
            env=env,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = rec["peak"] - rec["baseline"]
    predicted = rec["plan"]["per_rank_gib"]["host"]
    return {
        "case": name,
        "predicted": predicted,
        "measured": measured,
        "ratio": predicted / measured,
        "terms": rec["plan"]["terms"],
    }


def measure_fsdp(name: str, conf: Path, env: dict) -> list[dict]:
    """One row per rank: the plan's per-rank total against that rank's measured peak."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        child = Path(out) / "child.py"
        child.write_text(CHILD)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                f"--master_port={port}",
                str(child),
                str(conf),
                str(Path(out) / "run"),
                *ARCH_300M,
                *FSDP_CASES[name],
            ],
            capture_output=True,
            text=True,
            env=env,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    recs = sorted(
        (json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')),
        key=lambda r: r["rank"],
    )
    plan = recs[0]["plan"]
    # rank 0 also gathers the trained model at the end: the plan gives it its own total
    predicted = {
        r["rank"]: plan.get("other_ranks_gib", plan["per_rank_gib"])["host"]
        if r["rank"]
        else plan["per_rank_gib"]["host"]
        for r in recs
    }
    return [
        {
            "case": f"{name} rank {r['rank']}",
            "predicted": predicted[r["rank"]],
            "measured": r["peak"] - r["baseline"],
            "ratio": predicted[r["rank"]] / (r["peak"] - r["baseline"]),
            "terms": plan["terms"] if r["rank"] == 0 else [],
        }
        for r in recs
    ]


def main(argv: list[str]) -> None:
    conf = Path(__file__).resolve().parent.parent / "conf"
    env = child_env("--glibc-default" in argv)
    names = [a for a in argv if a != "--glibc-default"] or list(CASES)
    unknown = [n for n in names if n not in CASES and n not in FSDP_CASES]
    if unknown:
        raise SystemExit(
            f"bench_plan: unknown case(s) {unknown}; choose from {', '.join([*CASES, *FSDP_CASES])}"
        )
    print(
        "| case | plan (GiB) | measured peak - after imports (GiB) | plan / measured |", flush=True
    )
    print("|---|---|---|---|", flush=True)
    rows = []
    for n in names:  # one row as soon as it is measured
        for r in measure_fsdp(n, conf, env) if n in FSDP_CASES else [measure(n, conf, env)]:
            rows.append(r)
            print(
                f"| {r['case']} | {r['predicted']:.3f} | {r['measured']:.3f} | {r['ratio']:.3f} |",
                flush=True,
            )
    for r in (r for r in rows if r["terms"]):
        print(
            f"\n{r['case']}: "
            + ", ".join(
                f"{t['component']} {t['gib']:.3f} ({t.get('phase', 'always')})" for t in r["terms"]
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
