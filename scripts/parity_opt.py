"""Wanda and SparseGPT on OPT beside the authors' released per-layer code (locuslab/wanda
`lib/prune_opt.py`: prune_wanda, prune_sparsegpt with IST-DASLab's SparseGPT class).

The authors' code is not part of sparsebench: pass the folder of a locuslab/wanda checkout.
It runs unmodified except where it cannot run here, and each such point is named:
  - `get_loaders` (a Hub download) returns sparsebench's calibration windows instead;
  - `torch.cuda.empty_cache` and `torch.cuda.synchronize` are no-ops (no GPU);
  - `model.seqlen` and `model.hf_device_map` are set as its main.py sets them.
OPT's decoder layers need nothing but the attention mask the released Catcher keeps, so
the released loop runs on transformers 5 as published.

The model is the tiny random OPT (`conf/model/tiny-opt.yaml`) or, with `--model`, any model
config name of conf/model whose family is OPT; `--blocks` keeps its first blocks. Compared:
every linear's mask, bit for bit.

    python scripts/parity_opt.py --wanda ../ref/wanda            # tiny-opt, both methods
    python scripts/parity_opt.py --wanda ../ref/wanda --sparsity 0.7 --nsamples 16
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sparsebench import data as datamod
from sparsebench.models import ModelSpec, load_model, prunable_linears
from sparsebench.pipeline import prune_model

CONF = Path(__file__).resolve().parent.parent / "conf"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--wanda", required=True, help="a locuslab/wanda checkout")
    ap.add_argument(
        "--model", default="tiny-opt", help="an OPT config of conf/model (default tiny-opt)"
    )
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=64)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.wanda).resolve()))
    import lib.prune_opt as ref  # the authors' module

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"))["model"]
    spec = ModelSpec(**{**cfg, "seqlen": args.seqlen})
    model, tok = load_model(spec, seed=0)
    assert model.config.model_type == "opt", model.config.model_type
    calib = datamod.calibration(
        datamod.DataSpec(nsamples=args.nsamples), tok, args.seqlen, model.config.vocab_size
    )
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ref.get_loaders = lambda *a, **k: (
        [(calib[i : i + 1], None) for i in range(calib.shape[0])],
        None,
    )
    torch.cuda.empty_cache = torch.cuda.synchronize = lambda *a: None  # no GPU here
    model.seqlen, model.hf_device_map = args.seqlen, {}
    ns = types.SimpleNamespace(
        nsamples=args.nsamples, seed=0, sparsity_ratio=args.sparsity, use_variant=False
    )
    same = True
    for method, released in (("wanda", ref.prune_wanda), ("sparsegpt", ref.prune_sparsegpt)):
        model.load_state_dict(dense)
        ours = prune_model(
            model, method=method, sparsity=args.sparsity, calib=calib, seqlen=args.seqlen
        ).masks
        model.load_state_dict(dense)
        out = sys.stdout
        sys.stdout = open("/dev/null", "w")  # the released code prints a line per linear
        try:
            released(ns, model, tok, torch.device("cpu"))
        finally:
            sys.stdout.close()
            sys.stdout = out
        theirs = {n: lin.weight != 0 for n, lin in prunable_linears(model).items()}
        agree = sum(int((ours[n] == theirs[n]).sum()) for n in ours) / sum(
            m.numel() for m in ours.values()
        )
        identical = all(torch.equal(ours[n], theirs[n]) for n in ours)
        same &= identical
        print(
            json.dumps(
                {
                    "compare": f"{method}:{args.sparsity}",
                    "model": args.model,
                    "linears": len(ours),
                    "mask_agreement": agree,
                    "masks_identical": identical,
                }
            ),
            flush=True,
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
