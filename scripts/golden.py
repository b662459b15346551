"""Golden results on the tiny models: what a change of structure must leave exactly as it was.

Every case is one run of the real command (in this process) on `model=tiny-llama` with
`save.enabled=true`; its export gives the masks and the weights, its results.json the
perplexities. A case records a digest of the masks, a digest of the weights and the
WikiText-2 and C4 perplexities (float repr, so equal means bit for bit).

    python scripts/golden.py --record     # write tests/golden.json (before a refactor)
    python scripts/golden.py              # compare with it, case by case

tests/test_golden.py runs the same cases under `make test`: exactly where the recorded kernel
environment (torch, ATen capability, BLAS dispatch, threads) is this one, and elsewhere only
what no kernel changes (the promised pruned counts; even the seeded initial weights depend on
torch's vectorized normal_ kernels, so no digest is compared elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden.json"
TINY = ["model=tiny-llama", "logger=disabled"]

# name -> overrides. Every method, each recovery, OWL, N:M; FSDP2 two ranks separately.
CASES: dict[str, list[str]] = {
    "magnitude": ["method=magnitude"],
    "wanda": ["method=wanda"],
    "sparsegpt": ["method=sparsegpt"],
    "alps": ["method=alps"],
    "ladmm": ["method=ladmm"],
    "elsa": ["method=elsa", "method.steps=2"],
    "elsa_l": ["method=elsa_l", "method.steps=2"],
    # four steps with a z/u update after each: the tiny protocol's one step at warm-up lr 0
    # would leave the block as it was
    "safe": [
        "method=safe",
        "method.warmup_epochs=0",
        "method.interval=1",
        "method.epochs=2",
        "method.batch_size=4",
    ],
    "safe_plus": [
        "method=safe_plus",
        "method.warmup_epochs=0",
        "method.interval=1",
        "method.epochs=2",
        "method.batch_size=4",
    ],
    "wanda_2-4": ["method=wanda", "pattern=2:4"],
    "sparsegpt_4-8": ["method=sparsegpt", "pattern=4:8"],
    "owl_wanda": ["method=wanda", "schedule=owl", "sparsity=0.7"],
    "finetune": ["method=wanda", "recover=finetune", "recover.steps=2"],
    "perp": ["method=wanda", "recover=perp", "recover.steps=2"],
    "reconstruct": ["method=wanda", "recover=reconstruct", "recover.epochs=1"],
}
FSDP2_CASE = "elsa_fsdp2_two_ranks"
FSDP2_ARGS = ["method=elsa", "method.steps=2", "method.batch_size=4", "engine=fsdp"]


def digest(tensors: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def read_case(run_dir: Path) -> dict:
    """Digests and perplexities of a finished run with an export in <run_dir>/model."""
    from safetensors.torch import load_file

    from sparsebench.records.export import load_saved

    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete", results.get("error")
    masks, _ = load_saved(run_dir / "model")
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    sp = results["sparsity"]
    return {
        "masks": digest(masks),
        "weights": digest(weights),
        "pruned_params": sp["pruned_params"],
        "prunable_params": sp["prunable_params"],
        "wikitext2": repr(results["metrics"]["wikitext2"]),
        "c4": repr(results["metrics"]["c4"]),
    }


def run_case(name: str, folder: Path) -> dict:
    from sparsebench import cli

    run_dir = folder / name
    argv = TINY + CASES[name] + ["save.enabled=true", f"hydra.run.dir={run_dir}"]
    try:
        cli.main(argv)
    except SystemExit as err:
        if err.code:
            raise AssertionError(
                f"{name}: sparsebench {' '.join(argv)} exited {err.code}"
            ) from None
    return read_case(run_dir)


def _rank(rank: int, world: int, port: int, run_dir: str) -> None:
    """One torchrun-like rank of the real command (RANK / WORLD_SIZE / MASTER_* as torchrun sets
    them)."""
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WANDB_MODE="disabled",
    )
    from sparsebench import cli

    try:
        cli.main(TINY + FSDP2_ARGS + ["save.enabled=true", f"hydra.run.dir={run_dir}"])
    except SystemExit as err:
        if err.code:
            raise


def run_fsdp2(folder: Path) -> dict:
    """Elsa on FSDP2 over two gloo ranks on the CPU, through the real command on each rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = folder / FSDP2_CASE
    mp.start_processes(
        _rank, args=(2, port, str(run_dir)), nprocs=2, join=True, start_method="spawn"
    )
    return read_case(run_dir)


def environment() -> dict:
    """What must match for the golden numbers to be exact (see sparsebench/records/tracking.py)."""
    from importlib import metadata

    import torch

    from sparsebench.records.tracking import kernel_environment

    k = kernel_environment()
    return {
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "cpu": k["cpu"],
        "aten_capability": k["aten_capability"],
        "blas": k["blas"],
        "mkl_cbwr": k["mkl_cbwr"],
        "threads": k["threads"],
    }


def record_all(folder: Path, names=None) -> dict:
    names = list(CASES) + [FSDP2_CASE] if names is None else names
    out = {}
    for name in names:
        out[name] = run_fsdp2(folder) if name == FSDP2_CASE else run_case(name, folder)
        print(f"{name}: {out[name]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="write tests/golden.json")
    ap.add_argument("cases", nargs="*", help="only these cases")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("SPARSEBENCH_TEST_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SPARSEBENCH_CACHE", str(Path(tmp) / "cache"))
        os.environ.setdefault("WANDB_MODE", "disabled")
        got = record_all(Path(tmp), args.cases or None)
    if args.record:
        GOLDEN.write_text(json.dumps({"environment": environment(), "cases": got}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    want = json.loads(GOLDEN.read_text())
    same_env = want["environment"] == environment()
    bad = [n for n in got if got[n] != want["cases"].get(n)]
    print(
        f"environment {'matches' if same_env else 'differs from'} the recorded one; "
        f"{len(got) - len(bad)} of {len(got)} cases identical"
        + (f"; differ: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad and same_env else 0


if __name__ == "__main__":
    sys.exit(main())
