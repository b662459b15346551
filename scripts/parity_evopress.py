"""EvoPress's search beside its authors' released code (IST-DASLab/EvoPress), on SmolLM2-135M
under the CPU protocol.

The authors' code is not part of sparsebench: pass the folder of a checkout. sparsebench builds
its level database (the run's method at the released level grid) and runs its search; the
database is then written in the released layout (<folder>/<linear>/<level>.pth, dense weights)
and the released `evo_prune_search.py` main() runs on it, unmodified except where it cannot
run here:
- `device = f"cuda"` becomes "cpu" (in the text of the module, loaded from the checkout);
- `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` return the dense
  model already loaded, and `get_data` the same calibration windows (one (1, seqlen) tensor
  each; no evaluation datasets);
- the arguments come from this script (the same search options).
Both seed Python's `random` with the same seed; compared: each generation's best fitness (bit
for bit) and the final levels of every linear.

    python scripts/parity_evopress.py --evopress ../ref/EvoPress --method wanda \\
        --sparsity 0.7 --generations 5 --offspring 8 --survivors 2 1 --tokens 512 1024 \\
        --num-levels 2 --kl-windows 4

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_oneshot import add_protocol_args, load_protocol  # noqa: E402

from sparsebench.allocation import allocate  # noqa: E402
from sparsebench.registry import METHODS  # noqa: E402
from sparsebench.sparsity import EvoPressSearch, Schedule, parse_pattern  # noqa: E402


def released_search(folder: str, model, windows, db, spec, seed: int, workdir: Path):
    """The released main() on sparsebench's database written in its layout; (history, levels)."""
    for name in db.names:  # <linear>/<level>.pth, dense weights
        (workdir / name).mkdir(parents=True)
        for level in db.levels[name]:
            torch.save(db.weight(name, level), workdir / name / f"{level}.pth")
    sys.path.insert(0, folder)
    text = (Path(folder) / "evo_prune_search.py").read_text()
    text, n = re.subn(r'device = f"cuda"', 'device = "cpu"', text)
    assert n == 1, "the released main() changed: its device line is not where it was"
    module = types.ModuleType("evo_prune_search")
    module.__file__ = str(Path(folder) / "evo_prune_search.py")
    exec(compile(text, module.__file__, "exec"), module.__dict__)
    calls = []  # every selection stage's survivors' fitnesses, in order
    released_selection = module.selection

    def selection(*a, **k):
        out = released_selection(*a, **k)
        calls.append(out[1])
        return out

    module.selection, module.print = selection, lambda *a, **k: None
    module.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=lambda *a, **k: model)
    module.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: None)
    module.get_data = lambda *a, **k: [w for w in windows] if k.get("train") else []
    module.parse_args = lambda: argparse.Namespace(
        model_name_or_path="smollm2", tokenizer_name=None, calibration_data="sparsebench",
        calibration_tokens=0, calibration_sequence_length=windows[0].shape[1], eval_datasets=[],
        eval_every=10**9, eval_tokens=0, eval_sequence_length=windows[0].shape[1],
        fitness_fn="kl", max_level=spec.max_level, max_total_deviation=spec.max_total_deviation,
        log_wandb=False, generations=spec.generations, offspring=spec.offspring,
        sparse_weights_path=str(workdir), survivors_per_selection=list(spec.survivors),
        tokens_per_selection=list(spec.tokens), dtype="auto", seed=seed,
        attn_implementation=None, memory_efficient=True, use_fast_tokenizer=False,
        configuration_name="final_configuration.txt",
    )  # fmt: skip
    start = time.perf_counter()
    module.main()
    seconds = time.perf_counter() - start
    lines = (workdir / "final_configuration.txt").read_text().splitlines()
    levels = {line.rsplit(": ", 1)[0]: int(line.rsplit(": ", 1)[1]) for line in lines}
    stages = len(spec.survivors)
    history = [float(c[0]) for c in calls[stages - 1 :: stages]]  # each generation's winner
    return history, levels, seconds


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--evopress", required=True, help="a checkout of IST-DASLab/EvoPress")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--num-levels", type=int, default=2)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--survivors", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--kl-windows", type=int, default=4)
    add_protocol_args(ap)
    args = ap.parse_args()
    model, calib, _ = load_protocol(args)
    dense = copy.deepcopy(model)
    spec = EvoPressSearch(
        num_levels=args.num_levels, generations=args.generations, offspring=args.offspring,
        survivors=tuple(args.survivors), tokens=tuple(args.tokens), kl_windows=args.kl_windows,
    )  # fmt: skip
    pruner = METHODS.build(args.method, {})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        alloc = allocate(
            Schedule(allocation="evopress", evopress=spec), model, calib, args.sparsity,
            parse_pattern("unstructured"), pruner.group, torch.device("cpu"), pruner,
            args.seed, Path(tmp),
        )  # fmt: skip
    ours_s = time.perf_counter() - start
    report = alloc.report
    windows = [calib[i : i + 1] for i in range(report["kl_pool"]["windows"])]
    with tempfile.TemporaryDirectory() as tmp:
        history, levels, ref_s = released_search(
            args.evopress, dense, windows, alloc.database, spec, args.seed, Path(tmp)
        )
    ours = report["search"]["fitness_history"]
    out = {
        "config": f"{args.method}:{args.sparsity} evopress seed {args.seed}",
        "options": {**report["options"], "num_levels": args.num_levels,
                    "kl_windows": args.kl_windows},
        "linears": len(levels),
        "fitness_identical": ours == history,
        "fitness_sparsebench": ours,
        "fitness_released": history,
        "levels_identical": levels == report["levels"],
        "levels_differing": sum(levels[n] != report["levels"][n] for n in levels),
        "levels_moved": sum(v != 0 for v in levels.values()),
        "database": {k: report["database"][k]
                     for k in ("bytes", "seconds", "method", "weights_diff")},
        "seconds": {"sparsebench_total": round(ours_s, 1),
                    "sparsebench_search": report["search"]["search_s"],
                    "released_search": round(ref_s, 1)},
    }  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
