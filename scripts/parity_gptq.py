"""GPTQ, round to nearest and SparseGPT's joint quantization beside the released code
(IST-DASLab/gptq, IST-DASLab/sparsegpt) on SmolLM2-135M under the CPU protocol.

The released code is not part of sparsebench: pass the folders of the checkouts. Their
`llama_sequential` loops run as released, imported from their `llama.py` with the module
global `args` they read set here, and with what cannot run on this machine changed:
- `torch.cuda.synchronize()` (called in `fasterquant` / `fasterprune`) is a no-op: no GPU;
- each decoder block is made callable as the loops call it (attention_mask, position_ids),
  the rotary tables transformers 5 blocks require added (as scripts/parity_ria_dsnot.py);
- round to nearest is the released `llama_eval --nearest` step: per linear, the released
  `Quantizer` (per row, asymmetric) and `quantize`, applied to every linear of every block.

For each config both sides start from the same dense weights and the same windows; compared:
every quantized weight bit for bit on each block, prune-and-quantize seconds side by side,
and (without --no-eval) WikiText-2 / C4 perplexity through sparsebench's evaluation.

    python scripts/parity_gptq.py --gptq ../ref/gptq --sparsegpt ../ref/sparsegpt \\
        gptq:4:128 gptq:4:-1 rtn:4 joint:0.5:4

Configs: gptq:BITS:GROUP, rtn:BITS (per row, as released), joint:SPARSITY:BITS (SparseGPT
pruning and quantizing in one sweep, the released `--wbits`). One JSON line each.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_oneshot import add_protocol_args, evaluate, load_protocol  # noqa: E402
from parity_ria_dsnot import compare, print_line, rotary_shim  # noqa: E402

from sparsebench.models import prunable_linears  # noqa: E402
from sparsebench.pruners import PruneContext  # noqa: E402
from sparsebench.quant import QUANTIZERS, QuantContext  # noqa: E402
from sparsebench.registry import METHODS  # noqa: E402
from sparsebench.sparsity import Pattern, Schedule  # noqa: E402


def load_llama(folder: str, alias: str) -> types.ModuleType:
    """The checkout's llama.py as a module (its folder first on sys.path for its imports)."""
    sys.path.insert(0, folder)
    for name in ("gptq", "sparsegpt", "quant", "modelutils", "datautils"):
        sys.modules.pop(name, None)  # the two checkouts share module names
    spec = importlib.util.spec_from_file_location(alias, os.path.join(folder, "llama.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.remove(folder)
    module.print = lambda *a, **k: None
    return module


def released_sequential(module, model, calib, ns) -> float:
    """The released `llama_sequential` on `model` in place (CPU); seconds."""
    module.args = ns
    layers = model.model.layers
    for layer in layers:
        rotary_shim(layer, model.model.rotary_emb)
    model.seqlen = calib.shape[1]
    loader = [(calib[i : i + 1], None) for i in range(calib.shape[0])]
    sync, torch.cuda.synchronize = torch.cuda.synchronize, lambda *a, **k: None
    start = time.perf_counter()
    try:
        module.llama_sequential(model, loader, torch.device("cpu"))
    finally:
        torch.cuda.synchronize = sync
        for layer in layers:
            del layer.forward
    return time.perf_counter() - start


def released_nearest(module, model, bits: int) -> float:
    """The released --nearest step on every linear of every block; seconds."""
    start = time.perf_counter()
    for lin in prunable_linears(model).values():
        q = module.Quantizer()
        q.configure(bits, perchannel=True, sym=False, mse=False)
        W = lin.weight.data
        q.find_params(W, weight=True)
        lin.weight.data = module.quantize(W, q.scale, q.zero, q.maxq).to(W.dtype)
    return time.perf_counter() - start


def ours(model, calib, kind: str, a: float, b: int) -> float:
    start = time.perf_counter()
    cpu = torch.device("cpu")
    if kind == "joint":
        stage = QUANTIZERS.build("gptq", {"bits": b, "joint": True})
        pruner = METHODS.build("sparsegpt", {})
        pruner.joint_quant = stage
        pruner.prune(PruneContext(model, a, Pattern(), Schedule(), cpu, calib))
    else:
        options = {"bits": b, "group_size": int(a)} if kind == "gptq" else {"bits": b}
        QUANTIZERS.build(kind, options).run(QuantContext(model, None, cpu, calib))
    return time.perf_counter() - start


def weights(model) -> dict[str, torch.Tensor]:
    return {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("configs", nargs="+", help="gptq:BITS:GROUP, rtn:BITS, joint:SPARSITY:BITS")
    ap.add_argument("--gptq", required=True, help="a checkout of IST-DASLab/gptq")
    ap.add_argument("--sparsegpt", help="a checkout of IST-DASLab/sparsegpt (joint configs)")
    ap.add_argument("--no-eval", action="store_true", help="weights and times only")
    add_protocol_args(ap)
    args = ap.parse_args()
    model, calib, streams = load_protocol(args)
    model.config.use_cache = False
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    gptq = load_llama(args.gptq, "gptq_llama")
    sparsegpt = load_llama(args.sparsegpt, "sparsegpt_llama") if args.sparsegpt else None
    for config in args.configs:
        kind, *rest = config.split(":")
        if kind == "rtn":
            a, b = -1.0, int(rest[0])
        elif kind == "gptq":
            b, a = int(rest[0]), float(rest[1])
        else:
            a, b = float(rest[0]), int(rest[1])
        model.load_state_dict(dense)
        ours_s = ours(model, calib, kind, a, b)
        mine = weights(model)
        ours_ppl = {} if args.no_eval else evaluate(model, streams, args)
        model.load_state_dict(dense)
        common = dict(nsamples=calib.shape[0], percdamp=0.01, true_sequential=False, wbits=b)
        if kind == "rtn":
            ref_s = released_nearest(gptq, model, b)
        elif kind == "gptq":
            ns = types.SimpleNamespace(
                **common, groupsize=int(a), act_order=False, static_groups=False, sym=False
            )
            ref_s = released_sequential(gptq, model, calib, ns)
        else:
            ns = types.SimpleNamespace(
                **common,
                sparsity=a,
                prunen=0,
                prunem=0,
                blocksize=128,
                minlayer=-1,
                maxlayer=1000,
                prune_only="",
                invert=False,
            )
            ref_s = released_sequential(sparsegpt, model, calib, ns)
        ref = weights(model)
        ref_ppl = {} if args.no_eval else evaluate(model, streams, args)
        found = compare(mine, ref, model, "weights")
        print_line(config, found, ours_ppl, ref_ppl, ours_s, ref_s)


if __name__ == "__main__":
    main()
