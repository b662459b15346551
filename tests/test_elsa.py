"""Elsa and Elsa-L end to end on tiny models, and 2-process DDP (gloo) == 1 process."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsebench.data import DataSpec
from sparsebench.errors import SparsebenchError
from sparsebench.models import load_model
from sparsebench.pruners import PruneContext
from sparsebench.pruners.elsa import Elsa
from sparsebench.run import run
from sparsebench.sparsity import Pattern, Schedule
from sparsebench.specs import build_specs

from .conftest import compose, tiny_spec
from .numerics import U32, assert_identical

FAST = [
    "method.steps=12",
    "method.batch_size=2",
    "method.interval=4",
    "method.lam=0.5",
    "method.lr=3e-3",
]


@pytest.mark.parametrize("method", ["elsa", "elsa_l"])
def test_elsa_cli_end_to_end(method, tmp_path):
    res = run(
        compose(["model=tiny-llama", "logger=disabled", f"method={method}", "sparsity=0.7", *FAST]),
        tmp_path,
    )
    assert res["status"] == "complete"
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(0.7, abs=1e-3)
    rep = json.loads((tmp_path / "results.json").read_text())["method_report"]
    assert [h["step"] for h in rep["history"]] == [0, 4, 8, 11]  # z-updates, log_every=8, last step
    assert rep["history"][-1]["loss"] < rep["history"][0]["loss"]  # it trains
    per = rep["state_bytes_per_param"]
    assert (per["z"], per["u"]) == (
        (4.0, 4.0) if method == "elsa" else (pytest.approx(1.0, abs=1e-3), 2.0)
    )


def test_elsa_warm_start_from_sparsegpt(tmp_path):
    res = run(
        compose(
            [
                "model=tiny-llama",
                "logger=disabled",
                "method=elsa",
                "method.warm_start=sparsegpt",
                "method.warm_start_nsamples=4",
                "method.magnitude_updates=1",
                *FAST,
            ]
        ),
        tmp_path,
    )
    assert res["status"] == "complete" and res["method_report"]["history"][0]["churn"] < 0.5


def test_elsa_bad_options():
    with pytest.raises(SparsebenchError, match="not divisible by grad_accum"):
        build_specs(compose(["method=elsa", "method.batch_size=3", "method.grad_accum=2"]))
    with pytest.raises(SparsebenchError, match="unknown method 'sparsegtp'"):
        build_specs(compose(["method=elsa", "method.warm_start=sparsegtp"]))
    with pytest.raises(SparsebenchError, match="valid: constant, linear"):
        build_specs(compose(["method=elsa", "method.lam_schedule=step"]))


def _train(rank: int, world: int, folder: str) -> None:
    # One process runs the two ranks' micro-batches one after the other (grad_accum=2); DDP
    # averages the ranks' gradients, a / 2 + b / 2 against a / 2 + b / 2 after exact halvings;
    # the clip threshold is above every norm (clip factor exactly 1): the same operations on
    # the same operands, so bit for bit on any CPU (tests/test_fsdp.py has the derivation).
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
        )
    model, tok = load_model(tiny_spec("llama"), seed=0)
    pruner = Elsa(
        steps=6,
        batch_size=4,
        interval=2,
        lam=0.5,
        lr=2e-3,
        log_every=1,
        grad_accum=2 if world == 1 else 1,
        clip=1e9,
    )
    ctx = PruneContext(
        model,
        0.5,
        Pattern(),
        Schedule(),
        torch.device("cpu"),
        tokenizer=tok,
        data=DataSpec(nsamples=4),
        seqlen=64,
    )
    masks = pruner.prune(ctx)
    if rank == 0:
        torch.save(
            {
                "state": model.state_dict(),
                "masks": masks,
                "loss": [h["loss"] for h in pruner.history],
                "dist": [h["dist"] for h in pruner.history],
            },
            f"{folder}/world{world}.pt",
        )
    if world > 1:
        dist.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    _train(0, 1, str(tmp_path))
    mp.spawn(_train, args=(2, str(tmp_path)), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f"world{w}.pt") for w in (1, 2))
    assert one["loss"] == pytest.approx(
        two["loss"], rel=2 * U32
    )  # the ranks' mean: one float32 rounding
    assert (
        one["dist"] == two["dist"]
    )  # ||w - z|| counted once under DDP (every rank holds all of w)
    assert_identical(one["masks"], two["masks"], "masks")
    assert_identical(one["state"], two["state"], "weights")
