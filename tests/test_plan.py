"""The memory plan (issue #17): its arithmetic against tensors actually allocated, dry runs
of every model config offline, the refusal before loading, random full-size architectures."""

import json
import time

import pytest

from sparsebench import cli
from sparsebench.errors import SparsebenchError
from sparsebench.launch import memory_plan
from sparsebench.models import load_model, meta_model, prunable_linears
from sparsebench.plan import alternatives, shapes_of
from sparsebench.run import run
from sparsebench.specs import build_specs

from .conftest import compose, tiny_spec

TINY = ["model=tiny-llama", "logger=disabled"]
HUB = [
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "mistral-7b",
    "qwen2.5-7b",
    "gemma2-2b",
    "gemma2-27b",
    "opt-1.3b",
]
# the full-size files of docs/models.md: planned with a one-shot, a second-order and a training
# method each (every method on every file would add a minute to make test)
NEW = ["llama3.1-8b", "llama3.1-70b", "qwen3-8b", "qwen3-30b-a3b", "mixtral-8x7b"]
METHODS = [
    ["method=magnitude"],
    ["method=wanda"],
    ["method=sparsegpt"],
    ["method=elsa"],
    ["method=elsa_l"],
    ["method=safe_plus"],
    ["method=sparsegpt", "recover=finetune"],
    ["method=wanda", "recover=perp"],
]


def _terms(plan) -> dict[str, float]:
    return {name: gib * 2**30 for name, _, gib, _ in plan.terms}


def test_shapes_match_the_allocated_model():
    model, _ = load_model(tiny_spec("llama"), seed=0)
    meta = meta_model(tiny_spec("llama"))
    s = shapes_of(meta)
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.prunable == sum(lin.weight.numel() for lin in prunable_linears(model).values())
    assert (s.blocks, s.hidden, s.vocab, s.dtype_bytes) == (2, 64, 256, 4)
    # q/k/v share the block input, gate/up the MLP input: 4 distinct Hessians (q/k/v, o, gate/up: 64
    # columns; down: 128)
    assert s.hessian_elems == 3 * 64 * 64 + 128 * 128


@pytest.mark.parametrize("method,z,u", [("elsa", 4, 4), ("elsa_l", 1, 2)])
def test_admm_and_adam_terms_equal_the_measured_state(tmp_path, method, z, u):
    res = run(
        compose(TINY + [f"method={method}", "method.steps=2", "method.batch_size=2"]), tmp_path
    )
    plan_terms = {t["component"]: t["bytes"] for t in res["plan"]["terms"]}
    state = res["method_report"]["state_bytes"]
    n_tensors = len(res["per_layer_sparsity"])
    scales = 4 * n_tensors if z == 1 else 0  # FP8 z: one float32 scale per tensor
    assert plan_terms["ADMM z"] == pytest.approx(state["z"] - scales, rel=1e-4)
    assert plan_terms["ADMM u"] == pytest.approx(state["u"], rel=1e-4)
    assert state["params"] * z == pytest.approx(plan_terms["ADMM z"], rel=1e-4)
    # Adam's moments of the ADMM tensors (measured) are the plan's per-parameter bytes
    adam_key = "Adam moments (8-bit)" if method == "elsa_l" else "Adam moments"
    per_param = plan_terms[adam_key] / res["model"]["params"]
    assert state["optimizer"] / state["params"] == pytest.approx(per_param, rel=0.02)


def test_plan_runs_offline_for_every_model_and_method():
    runs = [(n, o) for n in HUB for o in METHODS] + [
        (n, o) for n in NEW for o in METHODS[:4:2] + [METHODS[3]]
    ]
    for name, overrides in runs:
        if True:
            start = time.perf_counter()
            specs = build_specs(
                compose([f"model={name}", "model.source=random", "logger=disabled", *overrides])
            )
            plan, shapes, _ = memory_plan(specs, 4)
            assert (
                plan.total("host") > 0 and shapes.params > 1e9 or name in ("opt-1.3b", "gemma2-2b")
            )
            assert time.perf_counter() - start < 30, (name, overrides)  # the bar: seconds, offline


def test_llama2_7b_shapes_are_the_published_ones():
    specs = build_specs(compose(["model=llama2-7b", "model.source=random", "method=elsa"]))
    plan, s, _ = memory_plan(specs, 1)
    assert s.params == 6_738_415_616  # Llama-2-7B's parameter count
    assert plan.knobs.engine == "single"
    # auto on 4 ranks: DDP holds ~160 GB per rank for 7B, which fits no memory here: FSDP2
    assert memory_plan(specs, 4)[0].knobs.engine == "fsdp"
    ddp = build_specs(
        compose(["model=llama2-7b", "model.source=random", "method=elsa", "engine=ddp"])
    )
    assert memory_plan(ddp, 4)[0].knobs.engine == "ddp"
    t = _terms(plan)
    assert t["weights (float32 master)"] == s.params * 4 and t["ADMM z"] == s.prunable * 4


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    try:
        cli.main(
            [
                "model=llama2-70b",
                "model.source=random",
                "method=elsa_l",
                "dry_run=true",
                "world_size=4",
                "device=cuda",
                f"hydra.run.dir={out}",
            ]
        )
    except (
        SystemExit
    ) as err:  # this machine's host memory is too small for it: the verdict's exit code
        assert err.code == cli.DOES_NOT_FIT
    printed = capsys.readouterr().out
    assert (
        "memory plan: llama2-70b, elsa_l, engine fsdp, 4 rank(s)" in printed
    )  # auto: DDP does not fit
    for term in ("weights (float32 master)", "Adam moments (8-bit)", "ADMM z", "total device"):
        assert term in printed
    assert "verdict: " in printed
    assert not out.exists()  # a dry run leaves no folder


def test_a_dry_run_that_does_not_fit_says_so_names_options_and_exits_3(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        cli.main(
            [
                "model=llama2-7b",
                "model.source=random",
                "method=elsa",
                "dry_run=true",
                "device=cuda",
                "plan.device_limit_gib=80",
                "plan.host_limit_gib=1024",
                f"hydra.run.dir={out}",
            ]
        )
    assert err.value.code == cli.DOES_NOT_FIT
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith(
        "verdict: does not fit: the memory plan needs 189.7 GiB of device memory (80.0 on"
    )
    assert "options that fit: offload=true" in verdict
    assert not out.exists()


def test_offload_moves_the_training_state_to_the_host_and_is_advised():
    import torch

    from sparsebench.plan import PlanSpec, check_fits

    base = [
        "model=llama2-7b",
        "model.source=random",
        "method=elsa_l",
        "device=cuda",
        "dry_run=true",
        "model.seqlen=2048",
        "method.batch_size=1",
        "method.grad_checkpointing=true",
    ]
    one, shapes, _ = memory_plan(build_specs(compose(base)), 1)
    off, *_ = memory_plan(build_specs(compose(base + ["offload=true"])), 1)
    assert (off.knobs.engine, off.knobs.offload, one.knobs.offload) == ("fsdp", True, False)
    state = {"weights (float32 master)", "gradients", "Adam moments (8-bit)", "ADMM z", "ADMM u"}
    where = {name: w for name, w, _, _ in off.terms}
    assert (
        all(where[name] == "host" for name in state)
        and where["activations (one block recomputed)"] == "device"
    )
    on_host = sum(g for name, _, g, _ in off.terms if name in state)
    assert on_host == pytest.approx(
        sum(g for name, _, g, _ in one.terms if name in state)
    )  # moved, not changed
    assert (
        off.total("device") < 8 < 74.5 < one.total("device")
    )  # 7B Elsa-L: ~83 GiB on one GPU, ~6 offloaded
    # one 80 GB GPU (74.5 GiB) and a 120 GiB host: the refusal names offload
    with pytest.raises(
        SparsebenchError, match=r"options that fit: .*offload=true \(FSDP2 CPU offload\)"
    ):
        check_fits(
            one, shapes, PlanSpec(device_limit_gib=74.5, host_limit_gib=120), torch.device("cuda")
        )


def test_one_shot_plans_one_process(capsys):
    specs = build_specs(
        compose(
            [
                "model=llama2-13b",
                "model.source=random",
                "method=sparsegpt",
                "world_size=8",
                "dry_run=true",
            ]
        )
    )
    from sparsebench.launch import dry_run

    res = dry_run(specs)
    assert res["plan"]["engine"] == "single" and res["plan"]["world_size"] == 1
    assert "runs in one process" in capsys.readouterr().out


def test_a_run_that_does_not_fit_stops_before_loading(tmp_path, monkeypatch):
    import sparsebench.record as runmod

    monkeypatch.setattr(
        runmod, "load_model", lambda *a, **k: pytest.fail("loaded a model that does not fit")
    )
    with pytest.raises(
        SparsebenchError,
        match=r"the memory plan needs .* GiB of host memory \(0.0 available\); "
        r"no single option or pair of options fits",
    ):
        run(compose(TINY + ["method=wanda", "plan.host_limit_gib=0.00001"]), tmp_path / "a")
    # a limit between Elsa-L's plan and Elsa's: the advice names elsa_l
    specs = build_specs(compose(TINY + ["method=elsa"]))
    elsa = memory_plan(specs, 1)[0].total("host")
    elsa_l = memory_plan(build_specs(compose(TINY + ["method=elsa_l"])), 1)[0].total("host")
    limit = (elsa + elsa_l) / 2 / 0.95
    with pytest.raises(SparsebenchError, match=r"options that fit: method=elsa_l"):
        run(compose(TINY + ["method=elsa", f"plan.host_limit_gib={limit}"]), tmp_path / "b")
    rec = (
        json.loads((tmp_path / "b" / "results.json").read_text())
        if (tmp_path / "b" / "results.json").exists()
        else None
    )
    assert rec is None or rec["status"] == "failed"


def test_enforce_false_runs_anyway(tmp_path):
    res = run(
        compose(TINY + ["method=magnitude", "plan.host_limit_gib=0.00001", "plan.enforce=false"]),
        tmp_path,
    )
    assert res["status"] == "complete" and res["plan"]["per_rank_gib"]["host"] > 0


def test_random_full_size_architecture_runs_without_tokenizer(tmp_path):
    small = [
        "model=llama2-7b",
        "model.source=random",
        "model.name=llama-random-small",
        "model.dtype=float32",
        "model.seqlen=32",
        "model.arch.hidden_size=64",
        "model.arch.intermediate_size=128",
        "model.arch.num_hidden_layers=2",
        "model.arch.num_attention_heads=4",
        "model.arch.num_key_value_heads=4",
        "protocol=tiny",
        "logger=disabled",
    ]
    res = run(compose(small + ["method=sparsegpt"]), tmp_path / "a")
    assert res["status"] == "complete" and res["model"]["random_weights"] is True
    assert res["metrics"] == {} and res["evaluation"] == "skipped: random weights"
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert res["fingerprint"]["data"] == {}  # no data file was read
    elsa = run(
        compose(small + ["method=elsa", "method.steps=2", "method.batch_size=2"]), tmp_path / "b"
    )
    assert elsa["status"] == "complete" and elsa["method_report"]["steps_run"] == 2
    from sparsebench.records import report

    rows = report.table(report.load_results(tmp_path))
    assert all(r["label"].endswith("[random weights]") for r in rows)


def test_random_needs_an_architecture():
    with pytest.raises(SparsebenchError, match="has no architecture"):
        build_specs(compose(["model=smollm2-135m", "model.source=random"]))


def test_calibration_inputs_go_to_the_host_when_they_do_not_fit_the_gpu():
    base = [
        "model=llama2-70b",
        "model.source=random",
        "method=sparsegpt",
        "device=cuda",
        "dry_run=true",
        "plan.host_limit_gib=1000",
    ]
    specs = build_specs(compose(base))
    plan, _, launch = memory_plan(
        specs, 1
    )  # 128 x 2048 windows of 8192 in float16: 4 GiB in, 4 out, beside the block
    assert launch.inputs == "device" and plan.knobs.inputs == "device"
    inputs = {name: gib for name, _, gib, _ in plan.terms}["calibration inputs of a block"]
    assert inputs == pytest.approx(128 * 2048 * 8192 * 2 / 2**30)
    tight = build_specs(
        compose(base + [f"plan.device_limit_gib={(plan.total('device') - inputs) / 0.95:.2f}"])
    )
    host_plan, _, tight_launch = memory_plan(
        tight, 1
    )  # auto: the inputs and outputs move to pinned host memory
    where = {name: w for name, w, _, _ in host_plan.terms}
    assert tight_launch.inputs == "host" and where["calibration inputs of a block"] == "host"
    windows = 3 * 2048 * 8192 * 2 / 2**30  # in use, prefetched, one output
    assert host_plan.total("device") == pytest.approx(plan.total("device") - 2 * inputs + windows)
    assert host_plan.as_dict()["calib_inputs"] == "host"
    forced = build_specs(compose(base + ["calib_inputs=device", "plan.device_limit_gib=10"]))
    assert (
        memory_plan(forced, 1)[0].knobs.inputs == "device"
    )  # asked for: kept (the check then refuses)
    with pytest.raises(SparsebenchError, match="unknown calib_inputs|calib_inputs.*valid"):
        build_specs(compose(base + ["calib_inputs=disk"]))


def test_batched_windows_and_the_prefetched_block_in_the_plan():
    base = [
        "model=llama2-7b",
        "model.source=random",
        "method=wanda",
        "device=cuda",
        "dry_run=true",
        "calib_inputs=host",
    ]
    one, *_ = memory_plan(build_specs(compose(base)), 1)
    four, *_ = memory_plan(build_specs(compose(base + ["calib_batch=4"])), 1)
    a = {name: gib for name, _, gib, _ in one.terms}
    b = {name: gib for name, _, gib, _ in four.terms}
    s = shapes_of(meta_model(build_specs(compose(base)).model))
    assert a["two blocks on the device (in use, the next prefetched)"] == pytest.approx(
        2 * s.block_params * 2 / 2**30
    )
    assert b["one forward through a block (4 window(s))"] == pytest.approx(
        4 * a["one forward through a block (1 window(s))"]
    )
    windows = "windows on the device (in use, prefetched, output)"
    assert b[windows] == pytest.approx(4 * a[windows]) and a[windows] == pytest.approx(
        3 * 2048 * 4096 * 2 / 2**30
    )
    assert four.as_dict()["calib_batch"] == 4
    assert "calib_batch=1" in [name for name, _ in alternatives("llama2-7b", s, four.knobs)]


def test_evaluation_placement_one_gpu_several_or_offloaded():
    from sparsebench.evaluation.perplexity import eval_max_memory
    from sparsebench.plan import eval_placement

    s = shapes_of(meta_model(tiny_spec("llama")))
    weights = s.params * 4 / 2**30
    window = 64 * (s.act_per_token * 4 + 2 * s.vocab * 4) / 2**30
    one = eval_placement(s, 1, 64, [1.0], 0.05)
    assert one["placement"] == "one GPU" and one["weights_gib"] == pytest.approx(weights, abs=1e-3)
    assert one["window_gib"] == pytest.approx(window, abs=1e-3)
    half = (
        (weights + 2 * window) / 0.95 / 2 * 1.01
    )  # two GPUs hold it (a window kept free on each), one does not
    assert half < (weights + window) / 0.95
    assert eval_placement(s, 1, 64, [half, half], 0.05)["placement"] == "GPUs (device map)"
    assert (
        eval_placement(s, 1, 64, [half / 2, half / 2], 0.05)["placement"]
        == "GPUs + host (device map, offloaded)"
    )
    assert eval_placement(s, 1, 64, [], 0.05)["placement"] == "host"
    # what the device map may fill: each GPU less the margin and one batch's forward; the host
    # only when offloading (accelerate's map itself needs visible GPUs: not run here)
    placement = eval_placement(s, 1, 64, [half, half], 0.05)
    room = eval_max_memory(placement, [2**30, 2**30], 0.05, None)
    assert room == {i: int(0.95 * 2**30 - placement["window_gib"] * 2**30) for i in (0, 1)}
    assert eval_max_memory(placement, [2**30], 0.05, 4 * 2**30)["cpu"] == int(0.95 * 4 * 2**30)


def test_a_cpu_run_records_where_it_evaluated(tmp_path):
    res = run(compose(TINY + ["method=magnitude", "eval.max_windows=2"]), tmp_path)
    assert res["plan"]["eval"]["placement"] == "host" and res["eval_placement"] == "host"
