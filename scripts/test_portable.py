"""`make test-portable`: the numerical tests as other CPUs would run them.

The last bits of a float32 reduction depend on three things a user's machine chooses:
- ATen's vector kernels (`ATEN_CPU_CAPABILITY`: `default`, `avx2`, `avx512`; a CPU runs the
  widest it has, and the variable can only lower it), which sets how elementwise and
  reduction loops are split into lanes;
- MKL's code path for GEMMs (`MKL_CBWR`: unset lets MKL pick per CPU, `COMPATIBLE` the
  portable SSE2 path);
- the thread count (`OMP_NUM_THREADS`), which splits reductions.
This runs the numerical test files (FSDP2, layer-wise, ADMM, 8-bit Adam, Elsa, SAFE,
recovery, plan, pruners, OWL and baselines, perplexity, the golden results, the model
families, the sparse kernels) once per setting, each in a fresh
process, prints one line per setting and a summary, and exits 1 if any setting fails.
Every setting must pass: the tests compare exact results where the code promises
exactness and use derived bounds elsewhere (tests/numerics.py).

    python scripts/test_portable.py                 # every setting this CPU can run (<= 12)
    python scripts/test_portable.py --capability avx2 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUMERICAL = [
    "tests/test_fsdp.py",
    "tests/test_layerwise.py",
    "tests/test_admm.py",
    "tests/test_adam8bit.py",
    "tests/test_elsa.py",
    "tests/test_safe.py",
    "tests/test_recover.py",
    "tests/test_plan.py",
    "tests/test_pruners.py",
    "tests/test_baselines.py",
    "tests/test_evaluate.py",
    "tests/test_sparsity.py",
    "tests/test_golden.py",
    "tests/test_models.py",
    "tests/test_speed.py",
]
# plumbing, not numbers (subprocess launches of the CLI and the GPU script): left to `make test`
DESELECT = "not prepared_gpu_script and not cli_under_torchrun"
ORDER = ["default", "avx2", "avx512"]  # x86-64 capabilities, narrowest first


def capabilities() -> list[str]:
    """The ATen capabilities this CPU can run: every one up to the widest it supports."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"},
    )
    widest = out.stdout.strip().lower()
    if widest not in ORDER:  # another architecture (e.g. ARM's SVE): its own widest and the default
        return ["default", widest] if widest and widest != "default" else ["default"]
    return ORDER[: ORDER.index(widest) + 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--capability", nargs="*", help="ATen capabilities (default: every one this CPU has)"
    )
    ap.add_argument(
        "--cbwr",
        nargs="*",
        default=["unset", "COMPATIBLE"],
        help="MKL_CBWR values ('unset' leaves it out)",
    )
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("tests", nargs="*", default=NUMERICAL, help="test files or node ids")
    args = ap.parse_args(argv)
    caps = args.capability or capabilities()
    settings = list(itertools.product(caps, args.cbwr, args.threads))
    print(f"{len(settings)} settings x {len(args.tests)} test files", flush=True)
    failed, start = [], time.perf_counter()
    for cap, cbwr, threads in settings:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")
        }
        env.update(
            ATEN_CPU_CAPABILITY=cap,
            OMP_NUM_THREADS=str(threads),
            SPARSEBENCH_TEST_THREADS=str(threads),
        )
        if cbwr != "unset":
            env["MKL_CBWR"] = cbwr
        name = f"ATEN_CPU_CAPABILITY={cap} MKL_CBWR={cbwr} OMP_NUM_THREADS={threads}"
        t0 = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-k",
                DESELECT,
                *args.tests,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(
            f"{'ok  ' if out.returncode == 0 else 'FAIL'} {name}: {last} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        if out.returncode != 0:
            failed.append(name)
            print(
                "\n".join(
                    ln for ln in out.stdout.splitlines() if ln.startswith(("FAILED", "ERROR", "E "))
                ),
                flush=True,
            )
    total = time.perf_counter() - start
    print(
        f"{len(settings) - len(failed)} passed, {len(failed)} failed settings in {total / 60:.1f} "
        "min"
    )
    for name in failed:
        print(f"  failed: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
