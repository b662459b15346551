"""A block-wise method (safe, safe_plus, their presets) on the first K decoder blocks only.

Full SAFE runs take ~40 minutes on 2 CPU cores; the per-block reconstruction error of
the first few blocks separates recipes in minutes. The overrides are sparsebench's own
(Hydra syntax), so the model, data and protocol are those of the default job:

    python scripts/probe_blocks.py --blocks 3 method=safe_cpu sparsity=0.5 method.warm_start=wanda

Prints one JSON line per block (the method's report: reconstruction error of the
one-shot start, after ADMM, ||w - z|| before the final projection) and a summary line
with the sums over the K blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sparsebench import data as datamod
from sparsebench.models import find_blocks, load_model
from sparsebench.pruners import PruneContext
from sparsebench.specs import build_specs

CONF = Path(__file__).resolve().parent.parent / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--blocks", type=int, default=3, help="prune only the first K decoder blocks")
    ap.add_argument(
        "overrides", nargs="*", help="sparsebench overrides, e.g. method=safe_cpu sparsity=0.5"
    )
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    specs = build_specs(cfg)
    if not hasattr(specs.pruner, "blocks"):
        sys.exit(
            f"probe_blocks: method '{specs.pruner.name}' does not report per-block errors (use "
            "safe, safe_plus)"
        )
    torch.manual_seed(specs.seed)
    model, tok = load_model(specs.model, specs.seed)
    path, blocks = find_blocks(model)
    if not 1 <= args.blocks <= len(blocks):
        sys.exit(f"probe_blocks: --blocks must be in [1, {len(blocks)}], got {args.blocks}")
    # capture() stops after the last block it is given, so the tail is never run.
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(parent, path.rpartition(".")[2], blocks[: args.blocks])
    calib = datamod.calibration(specs.data, tok, specs.model.seqlen)
    ctx = PruneContext(
        model,
        specs.sparsity,
        specs.pattern,
        specs.schedule,
        specs.device,
        calib,
        tokenizer=tok,
        data=specs.data,
        seqlen=specs.model.seqlen,
    )
    start = time.perf_counter()
    specs.pruner.prune(ctx)
    seconds = time.perf_counter() - start
    report = specs.pruner.report()
    for b in report["blocks"]:
        print(
            json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in b.items()}),
            flush=True,
        )
    print(
        json.dumps(
            {
                "overrides": args.overrides,
                "blocks": args.blocks,
                "recon_error_sum_before": round(report["recon_error_sum_before"], 5),
                "recon_error_sum_after": round(report["recon_error_sum_after"], 5),
                "seconds": round(seconds, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
