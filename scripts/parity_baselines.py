"""OWL, ALPS and L-ADMM beside their authors' released code, on the first blocks of SmolLM2-135M.

The authors' code is not part of sparsebench: pass the folders of their checkouts
(luuyin/OWL, mazumder-lab/ALPS, fmfi-compbio/admm-pruning). It runs unmodified except where
it cannot run here, and each such point is named:

- OWL (`lib/prune_all.py: prune_wanda_outlier`, the whole two-pass function): its
  `get_loaders` (a Hub download) is replaced by sparsebench's calibration windows, and each
  decoder block is wrapped so that the (attention_mask, position_ids) call the released
  loop makes also passes the rotary tables transformers 5 blocks require. Compared: the
  outlier ratios (its printed "before adjustment"), the per-block targets and the masks
  against `schedule=owl schedule.owl.balance=false method=wanda` (the released targets).
- ALPS (`alps.py: ALPS_prune`) and L-ADMM (`lib/admm.py: AdmmPruner`): their per-linear
  classes, fed the same block inputs as sparsebench's layer-wise driver. ALPS's module
  hard-codes 'cuda:0'; the text is loaded with those device strings set to 'cpu' (and
  torch.cuda.synchronize made a no-op). Compared per linear: the reconstruction error
  ||X W'^T - X W^T||^2 / ||X W^T||^2 on the calibration inputs, mask agreement, time.

    python scripts/parity_baselines.py --owl ../ref/OWL --alps ../ref/ALPS --ladmm
    ../ref/admm-pruning

Prints one JSON line per compared item, then a summary line per method.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_oneshot import add_protocol_args, load_protocol  # noqa: E402

from sparsebench.allocation import outlier_ratios, owl_targets  # noqa: E402
from sparsebench.engine.driver import block_out, capture, to_device  # noqa: E402
from sparsebench.models import find_blocks, find_linears, prunable_linears  # noqa: E402
from sparsebench.pruners import PruneContext  # noqa: E402
from sparsebench.registry import METHODS  # noqa: E402
from sparsebench.sparsity import Pattern, Schedule  # noqa: E402


def truncate(model, blocks: int):
    path, layers = find_blocks(model)
    model.get_submodule(path.rpartition(".")[0]).layers = nn.ModuleList(list(layers)[:blocks])
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]
    return model


# ------------------------------------------------------------------------------- OWL


class _RotaryShim(nn.Module):
    """A decoder block callable as the released loop calls it (attention_mask, position_ids)."""

    def __init__(self, block, rotary):
        super().__init__()
        self.block, self.rotary = block, rotary

    def forward(self, x, attention_mask=None, position_ids=None, **kwargs):
        if "position_embeddings" not in kwargs:
            kwargs["position_embeddings"] = self.rotary(x, position_ids)
        return self.block(x, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def owl_parity(args, model, calib, dense) -> None:
    sys.path.insert(0, str(Path(args.owl).resolve()))
    import lib.prune_all as owl  # the authors' module

    sparsity = args.sparsity
    # sparsebench: the released targets (balance=false), Wanda
    model.load_state_dict(dense)
    start = time.perf_counter()
    ratios = outlier_ratios(model, calib, torch.device("cpu"), 5.0)
    targets = owl_targets(ratios, sparsity, 0.08)
    model.load_state_dict(dense)
    METHODS.build("wanda", {}).prune(
        PruneContext(
            model,
            sparsity,
            Pattern(),
            Schedule(),
            torch.device("cpu"),
            calib,
            block_targets=targets,
        )
    )
    ours_s = time.perf_counter() - start
    ours = {n: (lin.weight == 0) for n, lin in prunable_linears(model).items()}

    # the authors' prune_wanda_outlier on the same windows
    model.load_state_dict(dense)
    owl.get_loaders = lambda *a, **k: (
        [(calib[i : i + 1], None) for i in range(calib.shape[0])],
        None,
    )
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = _RotaryShim(layers[i], model.model.rotary_emb)
    model.hf_device_map, model.seqlen = {}, calib.shape[1]
    printed = []
    real_print = print

    def capture_print(*a, **k):
        printed.append(a)

    owl.print = capture_print
    ns = types.SimpleNamespace(
        nsamples=calib.shape[0],
        seed=0,
        sparsity_ratio=sparsity,
        Lamda=0.08,
        Hyper_m=5.0,
        model="smollm2-135m",
        use_variant=False,
    )
    start = time.perf_counter()
    owl.prune_wanda_outlier(ns, model, None, torch.device("cpu"))
    ref_s = time.perf_counter() - start
    owl.print = real_print
    for i in range(len(layers)):
        layers[i] = layers[i].block
    ref_ratios = next(a[1] for a in printed if a and a[0] == "before adjustment")
    ref = {n: (lin.weight == 0) for n, lin in prunable_linears(model).items()}
    agree = sum(int((ours[n] == ref[n]).sum()) for n in ours) / sum(
        m.numel() for m in ours.values()
    )
    print(
        json.dumps(
            {
                "compare": "owl+wanda",
                "blocks": len(layers),
                "sparsity": sparsity,
                "outlier_ratio_max_abs_diff": max(abs(a - b) for a, b in zip(ratios, ref_ratios)),
                "sparsebench_targets": [round(t, 6) for t in targets],
                "mask_agreement": round(agree, 8),
                "masks_identical": agree == 1.0,
                "seconds_sparsebench_two_passes": round(ours_s, 2),
                "seconds_reference_two_passes": round(ref_s, 2),
            }
        ),
        flush=True,
    )


# ------------------------------------------------------------------------------- ALPS, L-ADMM


def load_alps(folder: str):
    """The authors' alps.py with its hard-coded 'cuda:0' pointed at the CPU."""
    src = (Path(folder) / "alps.py").read_text().replace("'cuda:0'", "'cpu'")
    mod = types.ModuleType("alps_ref")
    exec(compile(src, str(Path(folder) / "alps.py"), "exec"), mod.__dict__)
    return mod


def load_ladmm(folder: str):
    spec = importlib.util.spec_from_file_location("admm_ref", Path(folder) / "lib" / "admm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def block_inputs(model, calib, blocks):
    """Per block: (inputs of every linear, concatenated over windows) with the dense
    blocks' outputs feeding the next (each method then prunes the same inputs)."""
    inps, block_args = capture(model, calib, torch.device("cpu"))
    _, layers = find_blocks(model)
    out = []
    for i in range(blocks):
        args, kwargs = to_device(block_args[i], torch.device("cpu"))
        linears = find_linears(layers[i])
        xs = {n: [] for n in linears}
        hooks = [
            lin.register_forward_pre_hook(
                lambda m, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))
            )
            for n, lin in linears.items()
        ]
        nxt = torch.empty_like(inps)
        with torch.no_grad():
            for j in range(inps.shape[0]):
                nxt[j] = block_out(layers[i](inps[j : j + 1], *args, **kwargs))[0]
        for h in hooks:
            h.remove()
        out.append({n: torch.cat(v) for n, v in xs.items()})
        inps = nxt
    return out


def rel_error(x, w, w0) -> float:
    y0 = x @ w0.T
    return float(((x @ w.T - y0) ** 2).sum() / (y0**2).sum())


def layer_parity(method, ref_mod, args, model, calib, dense) -> None:
    model.load_state_dict(dense)
    inputs = block_inputs(model, calib, args.blocks)
    _, layers = find_blocks(model)
    ours_cls = METHODS.build(method, {})
    errs, secs, agree_all = (
        {"sparsebench": [], "reference": []},
        {"sparsebench": 0.0, "reference": 0.0},
        [],
    )
    for i in range(args.blocks):
        prepared: dict[
            str, object
        ] = {}  # as the driver: one statistic and one prepare per distinct input
        for name, lin in find_linears(layers[i]).items():
            x, w0 = inputs[i][name], lin.weight.detach().clone()
            # sparsebench: its Gram statistic over the same windows, prepare (shared by the
            # linears reading the same input: q/k/v, gate/up) + prune_linear
            start = time.perf_counter()
            shared = next((k for k in prepared if torch.equal(inputs[i][k], x)), None)
            if shared is None:
                stats = ours_cls.new_stats(x.shape[1], x.device)
                for chunk in x.split(calib.shape[1]):
                    ours_cls.add_batch(stats, chunk.unsqueeze(0))
                prepared[name] = ours_cls.prepare(stats)
                shared = name
            keep = ours_cls.prune_linear(lin, prepared[shared], args.sparsity, Pattern())
            secs["sparsebench"] += time.perf_counter() - start
            w_ours = lin.weight.detach().clone()
            with torch.no_grad():
                lin.weight.copy_(w0)
            # the authors' class
            start = time.perf_counter()
            if method == "alps":
                ref = ref_mod.ALPS_prune(lin, nsamples=calib.shape[0], seqlen=calib.shape[1])
                for chunk in x.split(calib.shape[1]):
                    ref.add_batch(
                        chunk.unsqueeze(0), torch.zeros(1, chunk.shape[0], lin.out_features)
                    )
                ref.ALPS_admm(sp=args.sparsity, nm_n=0, nm_m=0, rho=0.1)
            else:
                ref = ref_mod.AdmmPruner(lin)
                for chunk in x.split(calib.shape[1]):
                    ref.add_batch(chunk.unsqueeze(0), None)
                ref.fasterprune(args.sparsity, percdamp=0.1)
            secs["reference"] += time.perf_counter() - start
            w_ref = lin.weight.detach().clone()
            with torch.no_grad():
                lin.weight.copy_(w0)
            e_ours, e_ref = rel_error(x, w_ours, w0), rel_error(x, w_ref, w0)
            agree = float(((w_ref == 0) == ~keep).float().mean())
            errs["sparsebench"].append(e_ours)
            errs["reference"].append(e_ref)
            agree_all.append(agree)
            print(
                json.dumps(
                    {
                        "compare": method,
                        "block": i,
                        "linear": name,
                        "rel_error_sparsebench": e_ours,
                        "rel_error_reference": e_ref,
                        "error_ratio": round(e_ours / e_ref, 5),
                        "mask_agreement": round(agree, 6),
                    }
                ),
                flush=True,
            )
    ratios = [a / b for a, b in zip(errs["sparsebench"], errs["reference"])]
    print(
        json.dumps(
            {
                "summary": method,
                "linears": len(ratios),
                "sparsity": args.sparsity,
                "error_ratio_min": round(min(ratios), 5),
                "error_ratio_max": round(max(ratios), 5),
                "within_1pct": all(r <= 1.01 for r in ratios),
                "mask_agreement_mean": round(sum(agree_all) / len(agree_all), 6),
                "seconds_sparsebench": round(secs["sparsebench"], 2),
                "seconds_reference": round(secs["reference"], 2),
                "time_ratio_sparsebench_over_reference": round(
                    secs["sparsebench"] / secs["reference"], 3
                ),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--owl", help="checkout of luuyin/OWL")
    ap.add_argument("--alps", help="checkout of mazumder-lab/ALPS")
    ap.add_argument("--ladmm", help="checkout of fmfi-compbio/admm-pruning")
    ap.add_argument(
        "--blocks", type=int, default=2, help="first blocks compared (OWL: the model is cut to 6)"
    )
    ap.add_argument("--owl-blocks", type=int, default=6)
    ap.add_argument("--sparsity", type=float, default=0.7)
    add_protocol_args(ap)
    args = ap.parse_args()
    torch.cuda.synchronize = lambda *a, **k: None  # ALPS calls it unconditionally
    model, calib, _ = load_protocol(args)
    if args.alps or args.ladmm:
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        if args.ladmm:
            layer_parity("ladmm", load_ladmm(args.ladmm), args, model, calib, dense)
        if args.alps:
            layer_parity("alps", load_alps(args.alps), args, model, calib, dense)
    if args.owl:
        model = truncate(model, args.owl_blocks)
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        owl_parity(args, model, calib, dense)


if __name__ == "__main__":
    sys.exit(main())
