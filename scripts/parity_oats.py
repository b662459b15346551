"""OATS beside its authors' released code (stephenqz/OATS), on SmolLM2-135M under the CPU protocol.

The authors' code is not part of sparsebench: pass the folder of a checkout. Its driver
`OATS/prune_oats_compress.py` (the variant that keeps S, U and V as separate tensors) runs
unmodified, with its Llama adapter, except where it cannot run here:
- `config` (an ml_collections ConfigDict, not installed) is a namespace with device=cpu and
  dtype=float32;
- its calibration loader is sparsebench's windows, one window per batch (the released runs use
  batches of 32: the statistic is the same running mean of ||X_j||^2, summed in another order);
- its per-layer checkpoints go to a temporary folder.

Both prune the same dense model from the same windows at the released settings (num_iters 80,
rank_ratio 0.25 unless given); compared per linear: the zeros of S, and S, U, V bit for bit
(max |difference| where they differ), prune seconds side by side, and WikiText-2 / C4
perplexity of both through sparsebench's evaluation (16 windows each unless --windows).

    python scripts/parity_oats.py --oats ../ref/OATS --sparsity 0.5

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_oneshot import add_protocol_args, evaluate, load_protocol  # noqa: E402

from sparsebench.lowrank import factors_of  # noqa: E402
from sparsebench.pipeline import prune_model  # noqa: E402


def released_driver(folder: str):
    """The checkout's driver and Llama adapter, with the stand-in config module."""
    config = types.ModuleType("config")
    config.config = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    sys.modules["config"] = config
    sys.path.insert(0, folder)
    compress = importlib.import_module("OATS.prune_oats_compress")
    adapter = importlib.import_module("models.adapters.llama_adapter")
    compress.print = lambda *a, **k: None
    return compress, adapter


def released_run(folder, model, calib, sparsity, options, nm) -> float:
    compress, adapter = released_driver(folder)
    loader = [{"input_ids": calib[i : i + 1]} for i in range(calib.shape[0])]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as ckpt:
        compress.prune_oats_compress(
            adapter.LlamaModelAdapter(model), sparsity, loader, options, ckpt, *nm
        )
    return time.perf_counter() - start


def released_parts(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{linear name: (S, U, V)} of the released CompressedLinear modules."""
    return {
        n: (m.S.detach(), m.U.detach(), m.V.detach())
        for n, m in model.named_modules()
        if type(m).__name__ == "CompressedLinear"
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--oats", required=True, help="a checkout of stephenqz/OATS")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="unstructured", help="unstructured or N:M (released 2:8)")
    ap.add_argument("--rank-ratio", type=float, default=0.25)
    ap.add_argument("--num-iters", type=int, default=80)
    ap.add_argument("--no-eval", action="store_true")
    add_protocol_args(ap)
    ap.set_defaults(windows=16)
    args = ap.parse_args()
    model, calib, streams = load_protocol(args)
    ref = copy.deepcopy(model)
    options = {"rank_ratio": args.rank_ratio, "num_iters": args.num_iters}
    nm = (0, 0) if args.pattern == "unstructured" else tuple(map(int, args.pattern.split(":")))

    start = time.perf_counter()
    prune_model(
        model, method="oats", sparsity=args.sparsity, pattern=args.pattern, calib=calib,
        seqlen=args.seqlen, options=options,
    )  # fmt: skip
    ours_s = time.perf_counter() - start
    ref_s = released_run(args.oats, ref, calib, args.sparsity, options, nm)

    theirs = released_parts(ref)
    ours = factors_of(model)
    if sorted(theirs) != sorted(ours):
        raise SystemExit(f"different linears: {sorted(set(theirs) ^ set(ours))[:4]}")
    diff = {"zeros_of_S": 0, "S": 0, "U": 0, "V": 0}
    worst = {"S": 0.0, "U": 0.0, "V": 0.0}
    identical = 0
    for name, (s, u, v) in theirs.items():
        mine = ours[name]
        pairs = {"S": (mine.weight, s), "U": (mine.lowrank_u, u), "V": (mine.lowrank_v, v)}
        diff["zeros_of_S"] += int(((mine.weight == 0) != (s == 0)).sum())
        same = True
        for key, (a, b) in pairs.items():
            if a.shape != b.shape:
                raise SystemExit(f"{name}.{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            differ = int((a.detach() != b).sum())
            diff[key] += differ
            worst[key] = max(worst[key], float((a.detach() - b).abs().max()) if differ else 0.0)
            same &= differ == 0
        identical += same
    out = {
        "config": f"oats:{args.sparsity}:{args.pattern}",
        "options": options,
        "linears": len(theirs),
        "linears_identical": identical,
        "differing_entries": diff,
        "max_abs_difference": worst,
        "ranks": sorted({int(m.lowrank_v.shape[0]) for m in ours.values()}),
        "prune_s": {"sparsebench": round(ours_s, 1), "released": round(ref_s, 1)},
        "protocol": {"nsamples": args.nsamples, "seqlen": args.seqlen, "windows": args.windows},
    }
    if not args.no_eval:
        out["sparsebench"] = evaluate(model, streams, args)
        out["released"] = evaluate(ref, streams, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
