"""RIA and DSnoT beside their authors' released code, on SmolLM2-135M under the CPU protocol.

The authors' code is not part of sparsebench: pass the folders of their checkouts
(biomedical-cybernetics/Relative-importance-and-activation-pruning, zyxxmu/DSnoT). Their
`lib` packages are imported under other names, unmodified except where they cannot run here,
each point named:
- `get_loaders` (a Hub download) returns sparsebench's calibration windows instead;
- each decoder block is wrapped so that the (attention_mask, position_ids) call the released
  loops make also passes the rotary tables transformers 5 blocks require;
- RIA's `torch.sort(W_metric.flatten().cuda())` runs on the CPU (`.cuda()` removed from the
  text; the sort is the same), and so does its linear sum assignment (`permutation_device`);
- `model.hf_device_map` is empty and `model.seqlen` the protocol's.

For each config both prune the same dense model from the same windows; compared: the masks
on every block (differing entries per block), every pruned weight (bit for bit: identical
weights give identical perplexity under any evaluation), prune seconds side by side in this
process, and (without --no-eval) WikiText-2 / C4 perplexity of both pruned models through
sparsebench's evaluation.

    python scripts/parity_ria_dsnot.py --ria ../ref/RIA --dsnot ../ref/DSnoT \\
        ria:0.5 ria:0.7 ria:2:4 ria@reallocation:2:4 ria@reallocation,lsa:2:4 \\
        wanda+dsnot:0.6 wanda+dsnot:0.7 sparsegpt+dsnot:0.6 magnitude+dsnot:0.6

Prints one JSON line per config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_oneshot import add_protocol_args, evaluate, load_protocol  # noqa: E402

from sparsebench.models import find_blocks, prunable_linears  # noqa: E402
from sparsebench.pruners import PruneContext  # noqa: E402
from sparsebench.refine import REFINEMENTS  # noqa: E402
from sparsebench.registry import METHODS  # noqa: E402
from sparsebench.sparsity import Schedule, parse_pattern  # noqa: E402


def load_released(folder: str, alias: str) -> types.ModuleType:
    """The checkout's lib/prune.py as `<alias>.prune`, its package copied to a temporary
    folder with the CPU edits above applied to the text."""
    tmp = Path(tempfile.mkdtemp()) / alias
    shutil.copytree(Path(folder) / "lib", tmp)
    prune = tmp / "prune.py"
    text = prune.read_text().replace(".flatten().cuda()", ".flatten()")
    prune.write_text(text.replace('permutation_device = "cuda:7"', 'permutation_device = "cpu"'))
    spec = importlib.util.spec_from_file_location(
        alias, tmp / "__init__.py", submodule_search_locations=[str(tmp)]
    )
    (tmp / "__init__.py").write_text("")
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{alias}.prune")


def rotary_shim(block, rotary):
    """Make a decoder block callable as the released loops call it (attention_mask,
    position_ids), the rotary tables added. An instance forward, not a wrapper module: the
    released loops name the linears from the block (DSnoT skips the ones whose first name
    part is "mlp"), so the names must stay the block's own."""
    original = block.forward

    def forward(x, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(x.shape[1]).unsqueeze(0)
        if "position_embeddings" not in kwargs:
            kwargs["position_embeddings"] = rotary(x, position_ids)
        out = original(x, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    block.forward = forward


def released_run(module, fn: str, model, calib, ns) -> float:
    """Run the released `fn` on `model` in place; seconds."""
    module.get_loaders = lambda *a, **k: (
        [(calib[i : i + 1], None) for i in range(calib.shape[0])],
        None,
    )
    layers = model.model.layers
    for layer in layers:
        rotary_shim(layer, model.model.rotary_emb)
    model.hf_device_map, model.seqlen = {}, calib.shape[1]
    module.print = lambda *a, **k: None
    pattern = parse_pattern(ns.sparsity_type)
    start = time.perf_counter()
    getattr(module, fn)(ns, model, None, torch.device("cpu"), pattern.n, pattern.m)
    seconds = time.perf_counter() - start
    for layer in layers:
        del layer.forward  # the class's forward again
    return seconds


def ours_run(
    model, calib, method: str, refine: str | None, sparsity, pattern, dsnot, options=None
) -> float:
    ctx = PruneContext(
        model,
        sparsity,
        pattern,
        Schedule(),
        torch.device("cpu"),
        calib,
        refine=REFINEMENTS.build(refine, dict(dsnot)) if refine else None,
    )
    start = time.perf_counter()
    pruner = METHODS.build(method, dict(options or {}))
    (pruner.refinable() if refine else pruner).prune(ctx)
    return time.perf_counter() - start


def zeros(model) -> dict[str, torch.Tensor]:
    return {n: (lin.weight == 0).clone() for n, lin in prunable_linears(model).items()}


def compare(ours, ref, model, what: str = "masks") -> dict:
    """Entries of `ours` and `ref` ({linear: tensor}) that differ, block by block."""
    path, blocks = find_blocks(model)
    per_block = []
    for i in range(len(blocks)):
        names = [n for n in ours if n.startswith(f"{path}.{i}.")]
        per_block.append(sum(int((ours[n] != ref[n]).sum()) for n in names))
    return {
        "blocks": len(blocks),
        "blocks_identical": sum(d == 0 for d in per_block),
        "differing_entries_per_block": per_block,
        f"{what}_identical": all(d == 0 for d in per_block),
    }


def print_line(config, found: dict, ours_ppl, ref_ppl, ours_s: float, ref_s: float) -> None:
    """One JSON line: the config, what was compared, perplexities and seconds of both sides."""
    line = {
        "config": config,
        **found,
        "sparsebench_ppl": ours_ppl,
        "released_ppl": ref_ppl,
        "seconds_sparsebench": round(ours_s, 2),
        "seconds_released": round(ref_s, 2),
        "time_ratio": round(ours_s / ref_s, 3),
    }
    print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "configs",
        nargs="+",
        help="ria:S, ria:N:M, ria@reallocation[,lsa]:N:M, wanda|sparsegpt|magnitude+dsnot:S",
    )
    ap.add_argument("--ria", help="a checkout of the released RIA code")
    ap.add_argument("--dsnot", help="a checkout of the released DSnoT code")
    ap.add_argument("--no-eval", action="store_true", help="masks and times only")
    add_protocol_args(ap)
    args = ap.parse_args()
    model, calib, streams = load_protocol(args)
    model.config.use_cache = False
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ria = load_released(args.ria, "ria_released") if args.ria else None
    dsnot = load_released(args.dsnot, "dsnot_released") if args.dsnot else None
    # the released DSnoT defaults (main.py)
    dsnot_args = dict(
        max_cycle_time=50,
        update_threshold=0.1,
        pow_of_var_regrowing=1.0,
        skip="mlp",
        without_same_sign=True,
    )
    for config in args.configs:
        method, _, rest = config.partition(":")
        method, _, flags = method.partition("@")  # ria@reallocation,lsa:2:4
        method, _, refine = method.partition("+")
        options = {f: True for f in flags.split(",") if f}
        pattern = parse_pattern(rest if ":" in rest else "unstructured")
        sparsity = 0.5 if pattern.is_nm else float(rest)
        model.load_state_dict(dense)
        ours_s = ours_run(
            model, calib, method, refine or None, sparsity, pattern, dsnot_args, options
        )
        ours = zeros(model)
        ours_weights = {
            n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()
        }
        ours_ppl = {} if args.no_eval else evaluate(model, streams, args)
        model.load_state_dict(dense)
        common = dict(
            nsamples=calib.shape[0],
            seed=0,
            seqlen=calib.shape[1],
            sparsity_ratio=sparsity,
            sparsity_type=str(pattern),
            model="smollm2-135m-llama",  # the released loops branch on "llama" in the name
        )
        if refine == "dsnot":
            ns = types.SimpleNamespace(
                **common,
                initial_method=method,
                max_cycle_time=50,
                update_threshold=0.1,
                pow_of_var_regrowing=1.0,
                pow_of_var_pruning=1.0,
                skip_layer="mlp",
                skip_sub_layer="no_skip",
                without_DSnoT=False,
                without_same_sign=True,
                get_time_overhead=False,
            )
            ref_s = released_run(dsnot, "prune_DSnoT", model, calib, ns)
        else:
            ns = types.SimpleNamespace(
                **common,
                calib_dataset="c4",
                prune_method=method,
                a=0.5,
                gptq=False,
                reconstruction=False,
                reallocation=options.get("reallocation", False),
                lsa=options.get("lsa", False),
                importance_score="sum",
                per_outneuron=False,
                semi_sparse_acc=False,
                fast=False,
            )
            ref_s = released_run(ria, "prune_ria", model, calib, ns)
        ref = zeros(model)
        weights_identical = all(
            torch.equal(ours_weights[n], lin.weight) for n, lin in prunable_linears(model).items()
        )
        ref_ppl = {} if args.no_eval else evaluate(model, streams, args)
        found = {**compare(ours, ref, model), "weights_identical": weights_identical}
        print_line(config, found, ours_ppl, ref_ppl, ours_s, ref_s)


if __name__ == "__main__":
    main()
