"""Elsa and Elsa-L on FSDP2 (issue #18), two gloo ranks on the CPU: the same masks and
weights as one process, half the ADMM + optimizer state per rank, and the CLI under torchrun."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsebench.data import DataSpec
from sparsebench.engine.training import Trainer
from sparsebench.errors import SparsebenchError
from sparsebench.launch import memory_plan, resolve_engine
from sparsebench.models import load_model
from sparsebench.pruners import PruneContext
from sparsebench.pruners.elsa import Elsa, ElsaL
from sparsebench.sparsity import Pattern, Schedule
from sparsebench.specs import build_specs

from .conftest import REPO, compose, tiny_spec
from .numerics import U32, assert_identical, close_within, norm_rel_bound


class Killed(Exception):
    pass


# Why the comparisons below are exact. One process trains with grad_accum = 2 (two micro-batches
# of two windows), two FSDP2 ranks with one micro-batch of two windows each: the same windows, the
# same shapes, so each micro-batch's gradient is the same computation on both sides. One process
# adds the two halves (each loss divided by 2: exact in binary); FSDP2's reduce-scatter averages
# the two ranks' gradients ((a + b) / 2: the same single rounding of a + b, addition of two terms
# being commutative). The clipping threshold is set above every gradient norm: the clip factor is
# then exactly 1 on both sides, while the norm itself (a sum over shards, another order) is still
# computed and compared with its derived bound (tests/numerics.py). Every later operation (Adam,
# 8-bit Adam's per-row blocks, ADMM's projection on the gathered score, FP8's per-tensor scale by
# an all-reduced max) is elementwise or order-free, so weights, masks and churn agree bit for bit
# on any CPU. What clipping under FSDP2 adds on top is one rounding-level change of the clip factor
# (tests/test_fsdp.py::test_fsdp2_clipping_norm_is_the_one_process_norm).
NO_CLIP = 1e9


def _train(
    rank: int,
    world: int,
    folder: str,
    engine: str,
    method: str,
    tag: str = "",
    every: int = 0,
    kill_at: int = 0,
    rdv: str = "rendezvous",
    offload: bool = False,
    opts: dict | None = None,
    planted: float = 1.0,
) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/{rdv}", rank=rank, world_size=world
        )
    elif (
        engine == "fsdp"
    ):  # FSDP2 in one process (offload on one GPU): a group of one, as run.py makes it
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    real, real_backward = Trainer.step, Trainer._backward
    if kill_at:  # the job dies inside step `kill_at` (after the checkpoints before it)

        def step(self, closures, tokens):
            if self.steps_done == kill_at:
                raise Killed(f"killed at step {kill_at}")
            return real(self, closures, tokens)

        Trainer.step = step
    if planted != 1.0 and rank == 1:  # a planted error: this rank's gradients scaled by `planted`

        def backward(self, closures):
            return real_backward(self, [lambda c=c: c() * planted for c in closures])

        Trainer._backward = backward
    try:
        _train_body(rank, world, folder, engine, method, tag, every, offload, opts or {})
    finally:
        Trainer.step, Trainer._backward = real, real_backward
    if dist.is_initialized():
        dist.destroy_process_group()


def _train_body(rank, world, folder, engine, method, tag, every, offload=False, opts=None):
    model, tok = load_model(tiny_spec("llama"), seed=0)
    cls = {"elsa": Elsa, "elsa_l": ElsaL}[method]
    pruner = cls(
        **{
            "steps": 6,
            "batch_size": 4,
            "interval": 2,
            "lam": 0.5,
            "lr": 2e-3,
            "log_every": 1,
            **(opts or {}),
        }
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
        engine=engine,
        offload=offload,
        fresh_model=lambda: load_model(tiny_spec("llama"), seed=0)[0],
        workdir=f"{folder}/run{tag}",
        fingerprint="fp-test",
        checkpoint_every=every,
    )
    masks = pruner.prune(ctx)
    if rank == 0:
        torch.save(
            {
                "state": ctx.model.state_dict(),
                "masks": masks,
                "loss": [h["loss"] for h in pruner.history],
                "dist": [h["dist"] for h in pruner.history],
                "churn": [h["churn"] for h in pruner.history],
                "grad_norm": [h["grad_norm"] for h in pruner.history],
                "bytes": pruner.report()["state_bytes"],
                "sharded": type(model).__name__,
                "trained": sum(p.numel() for p in model.parameters()),
            },
            f"{folder}/{engine}{world}{tag}.pt",
        )


ONE = {
    "grad_accum": 2,
    "clip": NO_CLIP,
}  # one process: the two ranks' micro-batches, one after the other
RANKS = {"grad_accum": 1, "clip": NO_CLIP}  # two ranks: one micro-batch of two windows each


def assert_same_training(one: dict, other: dict, what: str) -> None:
    """What FSDP2 promises against one process (the derivation above): masks, weights and
    churn bit for bit; the logged loss within one float32 rounding (the ranks' mean is taken
    in float32, one process sums in Python floats); ||w - z|| and the gradient norm are sums
    over shards in another order: within their derived bounds."""
    assert other["sharded"].startswith("FSDP"), what  # fully_shard ran on the model
    assert_identical(one["masks"], other["masks"], what)
    assert_identical(one["state"], other["state"], what)
    assert one["churn"] == other["churn"], what
    assert one["loss"] == pytest.approx(other["loss"], rel=2 * U32), what
    bound = norm_rel_bound(one["trained"])
    assert all(close_within(a, b, bound) for a, b in zip(one["grad_norm"], other["grad_norm"])), (
        what
    )
    assert all(close_within(a, b, bound) for a, b in zip(one["dist"], other["dist"])), what


@pytest.mark.parametrize("method", ["elsa", "elsa_l"])
def test_fsdp2_two_ranks_match_one_process(tmp_path, method):
    _train(0, 1, str(tmp_path), "single", method, opts=ONE)
    mp.spawn(
        _train,
        args=(2, str(tmp_path), "fsdp", method, "", 0, 0, "rendezvous", False, RANKS),
        nprocs=2,
        join=True,
    )
    one, two = (torch.load(tmp_path / f"{e}.pt") for e in ("single1", "fsdp2"))
    assert_same_training(one, two, method)
    per_rank = sum(two["bytes"][k] for k in ("z", "u", "optimizer"))
    whole = sum(one["bytes"][k] for k in ("z", "u", "optimizer"))
    assert per_rank <= 0.55 * whole, (per_rank, whole)


def test_the_fsdp2_comparison_rejects_a_planted_error(tmp_path):
    """The comparison is not so loose that a real divergence passes: one rank's gradients
    scaled by 1 + 1e-3 (a rank that adds its share a thousandth too strongly) fail it."""
    _train(0, 1, str(tmp_path), "single", "elsa_l", opts=ONE)
    mp.spawn(
        _train,
        args=(2, str(tmp_path), "fsdp", "elsa_l", "", 0, 0, "rendezvous", False, RANKS, 1 + 1e-3),
        nprocs=2,
        join=True,
    )
    one, two = (torch.load(tmp_path / f"{e}.pt") for e in ("single1", "fsdp2"))
    with pytest.raises(AssertionError):
        assert_same_training(one, two, "planted")


def test_fsdp2_clipping_norm_is_the_one_process_norm(tmp_path):
    """With clipping active (Elsa's default threshold 1.0, every step clipped here), FSDP2's
    norm is a sum over shards: the first step's norm, taken on bit-identical gradients, is one
    process's within the derived float32 bound, and the masks are one process's. Later steps
    start from weights that differ by the clip factor's last bit and are not compared."""
    _train(0, 1, str(tmp_path), "single", "elsa", opts={"grad_accum": 2, "clip": 1.0})
    mp.spawn(
        _train,
        args=(
            2,
            str(tmp_path),
            "fsdp",
            "elsa",
            "",
            0,
            0,
            "rendezvous",
            False,
            {"grad_accum": 1, "clip": 1.0},
        ),
        nprocs=2,
        join=True,
    )
    one, two = (torch.load(tmp_path / f"{e}.pt") for e in ("single1", "fsdp2"))
    assert one["grad_norm"][0] > 1.0  # the clip was active
    assert close_within(one["grad_norm"][0], two["grad_norm"][0], norm_rel_bound(one["trained"]))
    assert_identical(one["masks"], two["masks"], "clipped")


def test_cpu_offload_one_process_and_two_ranks_match_one_process(tmp_path):
    """offload=true (FSDP2's CPUOffloadPolicy): on the CPU the host is the device, so this checks
    the offloaded code path (a group of one, no model.to, the policy on every group) keeps
    Elsa-L's masks and weights; the GPU's host/device split was not run here."""
    _train(0, 1, str(tmp_path), "single", "elsa_l", opts=ONE)
    _train(0, 1, str(tmp_path), "fsdp", "elsa_l", "off", offload=True, opts=ONE)
    mp.spawn(
        _train,
        args=(2, str(tmp_path), "fsdp", "elsa_l", "off", 0, 0, "rdv-off", True, RANKS),
        nprocs=2,
        join=True,
    )
    one = torch.load(tmp_path / "single1.pt")
    for run in ("fsdp1off", "fsdp2off"):
        assert_same_training(one, torch.load(tmp_path / f"{run}.pt"), run)


def test_offload_from_the_cli_runs_in_one_process(tmp_path):
    from sparsebench.run import run

    res = run(
        compose(
            [
                "model=tiny-llama",
                "logger=disabled",
                "method=elsa_l",
                "offload=true",
                "method.steps=2",
                "method.batch_size=2",
                "method.interval=1",
            ]
        ),
        tmp_path,
    )
    assert res["status"] == "complete" and res["engine"] == "fsdp" and res["offload"] is True
    assert res["plan"]["offload"] is True and res["plan"]["engine"] == "fsdp"
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not dist.is_initialized()  # the group of one ended with its run


def test_engine_choice_and_its_errors(monkeypatch):
    specs = build_specs(compose(["model=tiny-llama", "method=elsa", "engine=fsdp"]))
    with pytest.raises(
        SparsebenchError, match="engine=fsdp needs several processes: launch with torchrun"
    ):
        memory_plan(specs, 1)
    specs = build_specs(compose(["model=tiny-llama", "method=wanda", "engine=fsdp"]))
    with pytest.raises(SparsebenchError, match="method 'wanda' runs in one process"):
        memory_plan(specs, 2)
    specs = build_specs(compose(["model=tiny-llama", "method=elsa"]))
    assert (
        resolve_engine(specs, 1) == "single" and resolve_engine(specs, 2) == "ddp"
    )  # no shapes: DDP
    specs = build_specs(compose(["model=tiny-llama", "method=elsa", "plan.host_limit_gib=0.002"]))
    plan, _, launch = memory_plan(
        specs, 2
    )  # DDP's per-rank plan does not fit 2 MiB: auto picks FSDP2
    assert launch.engine == "fsdp" and plan.knobs.engine == "fsdp"
    specs = build_specs(compose(["model=tiny-llama", "method=elsa_l", "offload=true"]))
    assert (
        resolve_engine(specs, 1) == "fsdp" and resolve_engine(specs, 2) == "fsdp"
    )  # offload is FSDP2's
    specs = build_specs(
        compose(["model=tiny-llama", "method=elsa_l", "offload=true", "engine=ddp"])
    )
    with pytest.raises(
        SparsebenchError, match="offload=true is FSDP2's CPU offload, but engine=ddp"
    ):
        memory_plan(specs, 2)
    specs = build_specs(compose(["model=tiny-llama", "method=sparsegpt", "offload=true"]))
    with pytest.raises(SparsebenchError, match="offload=true is for whole-model training"):
        memory_plan(specs, 1)
    with pytest.raises(SparsebenchError, match="unknown engine|engine.*valid"):
        build_specs(compose(["model=tiny-llama", "method=elsa", "engine=zero3"]))


def test_cli_under_torchrun_fsdp(tmp_path):
    """`torchrun --nproc_per_node=2 -m sparsebench.cli ... engine=fsdp`: rank 0 records the run."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SPARSEBENCH_DATA_ROOT": os.environ.get(
            "SPARSEBENCH_DATA_ROOT", str(REPO.parent / "shared" / "data")
        ),
    }
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "sparsebench.cli",
        "model=tiny-llama",
        "method=elsa",
        "engine=fsdp",
        "logger=disabled",
        "method.steps=4",
        "method.batch_size=4",
        "method.interval=2",
        f"hydra.run.dir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "complete" and res["engine"] == "fsdp" and res["world_size"] == 2
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert res["method_report"]["steps_run"] == 4


@pytest.mark.e2e  # long end to end: make test-e2e
@pytest.mark.parametrize("world", [1, 2])
def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, world):
    engine = "fsdp" if world == 2 else "single"

    def launch(tag, **kw):
        if world == 1:
            _train(0, 1, str(tmp_path), engine, "elsa_l", tag, **kw)
        else:
            mp.spawn(
                _train,
                args=(2, str(tmp_path), engine, "elsa_l", tag, *kw.values()),
                nprocs=2,
                join=True,
            )

    launch("full", every=0, kill_at=0, rdv="a")
    with pytest.raises(Exception, match="killed at step 5"):
        launch(
            "cut", every=2, kill_at=5, rdv="b"
        )  # checkpoints after steps 2 and 4, dies in step 5
    meta = json.loads((tmp_path / "runcut" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world"] == world and meta["fingerprint"] == "fp-test"
    launch("cut", every=2, kill_at=0, rdv="c")  # the same run again: resumes after step 4
    full, cut = (torch.load(tmp_path / f"{engine}{world}{t}.pt") for t in ("full", "cut"))
    assert not (tmp_path / "runcut" / "checkpoint").exists()  # removed once the training ended
    for name in full["masks"]:
        assert torch.equal(full["masks"][name], cut["masks"][name]), name
    for key, w in full["state"].items():
        assert torch.equal(cut["state"][key], w), key
    assert cut["loss"] == full["loss"]  # the history came back with the checkpoint


def _saved_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.rglob("*.safetensors"))))


# recover=finetune with the clip factor exactly 1 (see the derivation at the top): one process and
# FSDP2 (a group of one with offload, or two ranks each with one of the micro-batches) run the same
# operations on the same operands.
FINETUNE = [
    "model=tiny-llama",
    "logger=disabled",
    "method=wanda",
    "recover=finetune",
    "recover.steps=3",
    "recover.batch_size=2",
    "save.enabled=true",
    f"recover.clip={NO_CLIP}",
]


def test_masked_finetuning_with_offload_matches_one_process(tmp_path):
    """recover=finetune offload=true: FSDP2 (CPU offload) in a group of one; on the CPU the same
    masks, weights and loss as the plain run, bit for bit."""
    from sparsebench.run import run

    plain = run(compose(FINETUNE), tmp_path / "plain")
    off = run(compose(FINETUNE + ["offload=true"]), tmp_path / "off")
    assert off["status"] == "complete" and off["engine"] == "fsdp" and off["offload"] is True
    assert plain["engine"] == "single" and off["plan"]["offload"] is True
    assert off["sparsity"]["actual_sparsity"] == plain["sparsity"]["actual_sparsity"]
    assert [h["loss"] for h in off["recover_report"]["history"]] == [
        h["loss"] for h in plain["recover_report"]["history"]
    ]
    assert_identical(
        _saved_weights(tmp_path / "plain"), _saved_weights(tmp_path / "off"), "offload"
    )
    assert not dist.is_initialized()
    with pytest.raises(
        SparsebenchError,
        match="recover=finetune on several ranks or with offload=true runs on FSDP2",
    ):
        memory_plan(build_specs(compose(FINETUNE + ["offload=true", "engine=ddp"])), 1)


def test_masked_finetuning_on_two_fsdp_ranks_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 ... method=wanda recover=finetune`: rank 0 prunes, the other
    rank waits on the store and receives the pruned model, both fine-tune their shards; the
    saved weights are those of one process running the ranks' micro-batches one after the
    other, bit for bit, and the loss is within one float32 rounding (the ranks' mean)."""
    from sparsebench.run import run

    plain = run(compose(FINETUNE + ["recover.grad_accum=2"]), tmp_path / "plain")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SPARSEBENCH_DATA_ROOT": os.environ.get(
            "SPARSEBENCH_DATA_ROOT", str(REPO.parent / "shared" / "data")
        ),
    }
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "sparsebench.cli",
        *FINETUNE,
        f"hydra.run.dir={tmp_path / 'two'}",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["status"] == "complete" and two["engine"] == "fsdp" and two["world_size"] == 2
    assert (
        two["plan"]["engine"] == "fsdp" and two["plan"]["micro_batch"] == 1
    )  # 2 windows over 2 ranks
    assert two["budget"]["recover"]["train_tokens"] == plain["budget"]["recover"]["train_tokens"]
    assert [h["loss"] for h in two["recover_report"]["history"]] == pytest.approx(
        [h["loss"] for h in plain["recover_report"]["history"]], rel=2 * U32
    )
    assert_identical(
        _saved_weights(tmp_path / "plain"), _saved_weights(tmp_path / "two"), "two ranks"
    )


@pytest.mark.slow  # 40 s of subprocesses (the GPU script's plumbing): `make test-slow`
def test_the_prepared_gpu_script_runs_its_plumbing_on_the_cpu(tmp_path):
    """scripts/bench_scale_gpu.py --smoke: the offloaded Elsa-L part, the host-input one-shot
    part and the reference comparison (one window per forward, then four) on a tiny random
    model (no numbers: the GPU measurement itself was not run here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_scale_gpu.py"),
            "--smoke",
            "--steps",
            "2",
            "elsa_l_7b",
            "oneshot_13b",
            "oneshot",
            "oneshot_batch",
            "recipe",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        r["part"]: r
        for r in map(json.loads, (ln for ln in out.stdout.splitlines() if ln.startswith('{"part"')))
    }
    assert rows["elsa_l_7b"]["status"] == "complete" and rows["elsa_l_7b"]["engine"] == "fsdp"
    assert rows["elsa_l_7b"]["offload"] is True and rows["elsa_l_7b"]["steps"] == 2
    assert (
        rows["oneshot_13b"]["status"] == "complete"
        and rows["oneshot_13b"]["calib_inputs"] == "host"
    )
    compares = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith('{"compare"')]
    assert (
        len(compares) == 4
    )  # sparsegpt and wanda, at calib_batch 1 and 4: the reference's masks every time
    assert all(c["mask_agreement"] == 1.0 for c in compares), compares
    recipe = [
        json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith('{"part": "recipe"')
    ]
    assert [r["status"] for r in recipe] == ["complete", "complete"]
    assert (
        recipe[0]["train_tokens"] == recipe[1]["train_tokens"] > 0
    )  # Elsa and its control at equal tokens
    assert all(r["metrics"]["wikitext2"] > 0 for r in recipe)
    batched = [json.loads(ln) for ln in out.stdout.splitlines() if '"impl": "sparsebench"' in ln]
    assert [r["options"].get("calib_batch", 1) for r in batched] == [1, 1, 4, 4]
