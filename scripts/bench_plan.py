"""The memory plan against measured peaks (docs/BENCHMARKS.md, "Scale").

Each case runs in a fresh process: imports, then the resident set is read (the baseline),
then the real pipeline runs on a random Llama-shaped model (~470M parameters: hidden 1024,
intermediate 4096, 24 blocks, vocabulary 32000, float32) and the process's peak resident
set minus the baseline is compared with the plan's host total, which the run recorded in
results.json before loading anything.

    python scripts/bench_plan.py                      # all cases, a table on stdout
    python scripts/bench_plan.py sparsegpt elsa       # some of them
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ARCH = ["model=llama2-7b", "model.source=random", "model.name=llama-470m-random", "model.dtype=float32",
        "model.seqlen=512", "model.arch.hidden_size=1024", "model.arch.intermediate_size=4096",
        "model.arch.num_hidden_layers=24", "model.arch.num_attention_heads=16", "model.arch.num_key_value_heads=16",
        "device=cpu", "logger=disabled", "protocol=cpu", "data.nsamples=32"]
CASES = {
    "sparsegpt": ["method=sparsegpt", "sparsity=0.5"],
    "wanda": ["method=wanda", "sparsity=0.5"],
    "elsa": ["method=elsa", "sparsity=0.5", "method.steps=1", "method.batch_size=1"],
    "elsa_l": ["method=elsa_l", "sparsity=0.5", "method.steps=1", "method.batch_size=1"],
}

CHILD = r"""
import json, resource, sys
from pathlib import Path
import torch
import transformers  # noqa: F401
from sparsebench import run as runmod
from hydra import compose, initialize_config_dir

torch.set_num_threads(2)
def rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30
base = rss_gib()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[3:])
res = runmod.run(cfg, Path(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"baseline": base, "peak": peak, "plan": res["plan"], "status": res["status"]}))
"""


def measure(name: str, conf: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(conf), out, *ARCH, *CASES[name]],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = rec["peak"] - rec["baseline"]
    predicted = rec["plan"]["per_rank_gib"]["host"]
    return {"case": name, "predicted": predicted, "measured": measured, "ratio": predicted / measured,
            "terms": rec["plan"]["terms"]}


def main(argv: list[str]) -> None:
    conf = Path(__file__).resolve().parent.parent / "conf"
    names = argv or list(CASES)
    print("| case | plan (GiB) | measured peak - after imports (GiB) | plan / measured |", flush=True)
    print("|---|---|---|---|", flush=True)
    rows = []
    for n in names:  # one row as soon as it is measured
        r = measure(n, conf)
        rows.append(r)
        print(f"| {r['case']} | {r['predicted']:.3f} | {r['measured']:.3f} | {r['ratio']:.3f} |", flush=True)
    for r in rows:
        print(f"\n{r['case']}: " + ", ".join(f"{t['component']} {t['gib']:.3f}" for t in r["terms"]))


if __name__ == "__main__":
    main(sys.argv[1:])
