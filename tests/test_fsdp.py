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
from sparsebench.errors import SparsebenchError
from sparsebench.models import load_model
from sparsebench.pruners import PruneContext
from sparsebench.pruners.elsa import Elsa, ElsaL
from sparsebench.run import build_specs, memory_plan, resolve_engine
from sparsebench.sparsity import Pattern, Schedule
from sparsebench.training import Trainer

from .conftest import REPO, compose, tiny_spec


class Killed(Exception):
    pass


def _train(rank: int, world: int, folder: str, engine: str, method: str, tag: str = "", every: int = 0,
           kill_at: int = 0, rdv: str = "rendezvous", offload: bool = False) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/{rdv}", rank=rank, world_size=world)
    elif engine == "fsdp":  # FSDP2 in one process (offload on one GPU): a group of one, as run.py makes it
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    real = Trainer.step
    if kill_at:  # the job dies inside step `kill_at` (after the checkpoints before it)
        def step(self, closures, tokens):
            if self.steps_done == kill_at:
                raise Killed(f"killed at step {kill_at}")
            return real(self, closures, tokens)

        Trainer.step = step
    try:
        _train_body(rank, world, folder, engine, method, tag, every, offload)
    finally:
        Trainer.step = real
    if dist.is_initialized():
        dist.destroy_process_group()


def _train_body(rank, world, folder, engine, method, tag, every, offload=False):
    model, tok = load_model(tiny_spec("llama"), seed=0)
    cls = {"elsa": Elsa, "elsa_l": ElsaL}[method]
    pruner = cls(steps=6, batch_size=4, interval=2, lam=0.5, lr=2e-3, log_every=1)
    ctx = PruneContext(model, 0.5, Pattern(), Schedule(), torch.device("cpu"), tokenizer=tok,
                       data=DataSpec(nsamples=4), seqlen=64, engine=engine, offload=offload,
                       fresh_model=lambda: load_model(tiny_spec("llama"), seed=0)[0],
                       workdir=f"{folder}/run{tag}", fingerprint="fp-test", checkpoint_every=every)
    masks = pruner.prune(ctx)
    if rank == 0:
        torch.save({"state": ctx.model.state_dict(), "masks": masks, "loss": [h["loss"] for h in pruner.history],
                    "dist": [h["dist"] for h in pruner.history], "churn": [h["churn"] for h in pruner.history],
                    "bytes": pruner.report()["state_bytes"], "sharded": type(model).__name__},
                   f"{folder}/{engine}{world}{tag}.pt")


@pytest.mark.parametrize("method", ["elsa", "elsa_l"])
def test_fsdp2_two_ranks_match_one_process(tmp_path, method):
    _train(0, 1, str(tmp_path), "single", method)
    mp.spawn(_train, args=(2, str(tmp_path), "fsdp", method), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f"{e}.pt") for e in ("single1", "fsdp2"))
    assert two["sharded"].startswith("FSDP")  # fully_shard ran on the model
    for name in one["masks"]:
        assert torch.equal(one["masks"][name], two["masks"][name]), name
    for key, w in one["state"].items():
        rel = float((two["state"][key].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        assert rel <= 1e-5, (key, rel)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["dist"] == pytest.approx(two["dist"], rel=1e-4) and one["churn"] == two["churn"]  # summed over shards
    per_rank = sum(two["bytes"][k] for k in ("z", "u", "optimizer"))
    whole = sum(one["bytes"][k] for k in ("z", "u", "optimizer"))
    assert per_rank <= 0.55 * whole, (per_rank, whole)


def test_cpu_offload_one_process_and_two_ranks_match_one_process(tmp_path):
    """offload=true (FSDP2's CPUOffloadPolicy): on the CPU the host is the device, so this checks
    the offloaded code path (a group of one, no model.to, the policy on every group) keeps
    Elsa-L's masks and weights; the GPU's host/device split was not run here."""
    _train(0, 1, str(tmp_path), "single", "elsa_l")
    _train(0, 1, str(tmp_path), "fsdp", "elsa_l", "off", offload=True)
    mp.spawn(_train, args=(2, str(tmp_path), "fsdp", "elsa_l", "off", 0, 0, "rdv-off", True), nprocs=2, join=True)
    one = torch.load(tmp_path / "single1.pt")
    for run in ("fsdp1off", "fsdp2off"):
        other = torch.load(tmp_path / f"{run}.pt")
        assert other["sharded"].startswith("FSDP"), run
        for name in one["masks"]:
            assert torch.equal(one["masks"][name], other["masks"][name]), (run, name)
        for key, w in one["state"].items():
            rel = float((other["state"][key].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
            assert rel <= 1e-5, (run, key, rel)


def test_offload_from_the_cli_runs_in_one_process(tmp_path):
    from sparsebench.run import run

    res = run(compose(["model=tiny-llama", "logger=disabled", "method=elsa_l", "offload=true", "method.steps=2",
                       "method.batch_size=2", "method.interval=1"]), tmp_path)
    assert res["status"] == "complete" and res["engine"] == "fsdp" and res["offload"] is True
    assert res["plan"]["offload"] is True and res["plan"]["engine"] == "fsdp"
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not dist.is_initialized()  # the group of one ended with its run


def test_engine_choice_and_its_errors(monkeypatch):
    specs = build_specs(compose(["model=tiny-llama", "method=elsa", "engine=fsdp"]))
    with pytest.raises(SparsebenchError, match="engine=fsdp needs several processes: launch with torchrun"):
        memory_plan(specs, 1)
    specs = build_specs(compose(["model=tiny-llama", "method=wanda", "engine=fsdp"]))
    with pytest.raises(SparsebenchError, match="method 'wanda' runs in one process"):
        memory_plan(specs, 2)
    specs = build_specs(compose(["model=tiny-llama", "method=elsa"]))
    assert resolve_engine(specs, 1) == "single" and resolve_engine(specs, 2) == "ddp"  # no shapes: DDP
    specs = build_specs(compose(["model=tiny-llama", "method=elsa", "plan.host_limit_gib=0.002"]))
    plan, _ = memory_plan(specs, 2)  # DDP's per-rank plan does not fit 2 MiB: auto picks FSDP2
    assert specs.run_engine == "fsdp" and plan.knobs.engine == "fsdp"
    specs = build_specs(compose(["model=tiny-llama", "method=elsa_l", "offload=true"]))
    assert resolve_engine(specs, 1) == "fsdp" and resolve_engine(specs, 2) == "fsdp"  # offload is FSDP2's
    specs = build_specs(compose(["model=tiny-llama", "method=elsa_l", "offload=true", "engine=ddp"]))
    with pytest.raises(SparsebenchError, match="offload=true is FSDP2's CPU offload, but engine=ddp"):
        memory_plan(specs, 2)
    specs = build_specs(compose(["model=tiny-llama", "method=sparsegpt", "offload=true"]))
    with pytest.raises(SparsebenchError, match="offload=true is for whole-model training"):
        memory_plan(specs, 1)
    with pytest.raises(SparsebenchError, match="unknown engine|engine.*valid"):
        build_specs(compose(["model=tiny-llama", "method=elsa", "engine=zero3"]))


def test_cli_under_torchrun_fsdp(tmp_path):
    """`torchrun --nproc_per_node=2 -m sparsebench.cli ... engine=fsdp`: rank 0 records the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEBENCH_DATA_ROOT": os.environ.get(
        "SPARSEBENCH_DATA_ROOT", str(REPO.parent / "shared" / "data"))}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "sparsebench.cli", "model=tiny-llama", "method=elsa", "engine=fsdp", "logger=disabled",
           "method.steps=4", "method.batch_size=4", "method.interval=2", f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "complete" and res["engine"] == "fsdp" and res["world_size"] == 2
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert res["method_report"]["steps_run"] == 4


@pytest.mark.parametrize("world", [1, 2])
def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, world):
    engine = "fsdp" if world == 2 else "single"

    def launch(tag, **kw):
        if world == 1:
            _train(0, 1, str(tmp_path), engine, "elsa_l", tag, **kw)
        else:
            mp.spawn(_train, args=(2, str(tmp_path), engine, "elsa_l", tag, *kw.values()), nprocs=2, join=True)

    launch("full", every=0, kill_at=0, rdv="a")
    with pytest.raises(Exception, match="killed at step 5"):
        launch("cut", every=2, kill_at=5, rdv="b")  # checkpoints after steps 2 and 4, dies in step 5
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


def test_masked_finetuning_with_offload_matches_one_process(tmp_path):
    """recover=finetune offload=true: FSDP2 (CPU offload) in a group of one; on the CPU the same
    masks and, up to summation order, the same weights and loss as the plain run."""
    from sparsebench.run import run

    base = ["model=tiny-llama", "logger=disabled", "method=wanda", "recover=finetune", "recover.steps=3",
            "recover.batch_size=2", "save.enabled=true"]
    plain = run(compose(base), tmp_path / "plain")
    off = run(compose(base + ["offload=true"]), tmp_path / "off")
    assert off["status"] == "complete" and off["engine"] == "fsdp" and off["offload"] is True
    assert plain["engine"] == "single" and off["plan"]["offload"] is True
    assert off["sparsity"]["actual_sparsity"] == plain["sparsity"]["actual_sparsity"]
    assert [h["loss"] for h in off["recover_report"]["history"]] == pytest.approx(
        [h["loss"] for h in plain["recover_report"]["history"]], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(str(next((tmp_path / d).rglob("*.safetensors")))) for d in ("plain", "off"))
    for key, w in a.items():
        rel = float((b[key].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        assert rel <= 1e-5, (key, rel)  # every trained tensor: linears, norms, embeddings
        if key.endswith("proj.weight"):
            assert torch.equal(b[key] == 0, w == 0), key  # the mask held under sharding
    assert not dist.is_initialized()
    with pytest.raises(SparsebenchError, match="recover=finetune on several ranks or with offload=true runs on FSDP2"):
        memory_plan(build_specs(compose(base + ["offload=true", "engine=ddp"])), 1)


def test_masked_finetuning_on_two_fsdp_ranks_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 ... method=wanda recover=finetune`: rank 0 prunes, the other
    rank waits on the store and receives the pruned model, both fine-tune their shards; the
    loss and the saved weights are one process's."""
    from safetensors.torch import load_file

    from sparsebench.run import run

    base = ["model=tiny-llama", "logger=disabled", "method=wanda", "recover=finetune", "recover.steps=3",
            "recover.batch_size=2", "save.enabled=true"]
    plain = run(compose(base), tmp_path / "plain")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSEBENCH_DATA_ROOT": os.environ.get(
        "SPARSEBENCH_DATA_ROOT", str(REPO.parent / "shared" / "data"))}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "sparsebench.cli", *base, f"hydra.run.dir={tmp_path / 'two'}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["status"] == "complete" and two["engine"] == "fsdp" and two["world_size"] == 2
    assert two["plan"]["engine"] == "fsdp" and two["plan"]["micro_batch"] == 1  # 2 windows over 2 ranks
    assert two["budget"]["recover"]["train_tokens"] == plain["budget"]["recover"]["train_tokens"]
    assert [h["loss"] for h in two["recover_report"]["history"]] == pytest.approx(
        [h["loss"] for h in plain["recover_report"]["history"]], rel=1e-5)
    a, b = (load_file(str(next((tmp_path / d).rglob("*.safetensors")))) for d in ("plain", "two"))
    for key, w in a.items():
        rel = float((b[key].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        assert rel <= 1e-5, (key, rel)
        if key.endswith("proj.weight"):
            assert torch.equal(b[key] == 0, w == 0), key


def test_the_prepared_gpu_script_runs_its_plumbing_on_the_cpu(tmp_path):
    """scripts/bench_scale_gpu.py --smoke: the offloaded Elsa-L part, the host-input one-shot
    part and the reference comparison (one window per forward, then four) on a tiny random
    model (no numbers: the GPU measurement itself was not run here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_scale_gpu.py"), "--smoke", "--steps", "2",
                          "elsa_l_7b", "oneshot_13b", "oneshot", "oneshot_batch", "recipe"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["part"]: r for r in map(json.loads, (ln for ln in out.stdout.splitlines() if ln.startswith('{"part"')))}
    assert rows["elsa_l_7b"]["status"] == "complete" and rows["elsa_l_7b"]["engine"] == "fsdp"
    assert rows["elsa_l_7b"]["offload"] is True and rows["elsa_l_7b"]["steps"] == 2
    assert rows["oneshot_13b"]["status"] == "complete" and rows["oneshot_13b"]["calib_inputs"] == "host"
    compares = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith('{"compare"')]
    assert len(compares) == 4  # sparsegpt and wanda, at calib_batch 1 and 4: the reference's masks every time
    assert all(c["mask_agreement"] == 1.0 for c in compares), compares
    recipe = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith('{"part": "recipe"')]
    assert [r["status"] for r in recipe] == ["complete", "complete"]
    assert recipe[0]["train_tokens"] == recipe[1]["train_tokens"] > 0  # Elsa and its control at equal tokens
    assert all(r["metrics"]["wikitext2"] > 0 for r in recipe)
    batched = [json.loads(ln) for ln in out.stdout.splitlines() if '"impl": "sparsebench"' in ln]
    assert [r["options"].get("calib_batch", 1) for r in batched] == [1, 1, 4, 4]
