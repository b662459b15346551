"""What sparsity buys (evaluation/speed.py, formats.py): the sparse kernels compute each pruned
linear within the float32 bound of a dot product and really run (call counts), the bitmask
export reloads to the same weights bit for bit, and the byte counts are the formats'
arithmetic."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from sparsebench.data import DataSpec
from sparsebench.evaluation.kernels import (
    CSR16_MANY_FROM,
    KERNELS,
    SparseLinear,
    kernels_for,
    nm_violations,
    sparse_form,
    unavailable,
)
from sparsebench.evaluation.speed import SpeedSpec, measure
from sparsebench.formats import bitmask_state, load_bitmask, pack, sizes, unpack
from sparsebench.models import ModelSpec, load_model, prunable_linears
from sparsebench.pipeline import prune_model

from .conftest import tiny_spec
from .numerics import gamma

FAST = SpeedSpec(enabled=True, batch_sizes=(1, 2), decode_tokens=2, repeats=1, warmup=0)


CPU_KERNELS = kernels_for(torch.device("cpu"), "unstructured")


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_each_sparse_kernel_computes_the_linear_within_the_dot_product_bound(kernel):
    """y = x W^T over the kept weights, in any summation order:
    |y - y_dense| <= 2 gamma(K) sum |x| |w|."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g)
    w[torch.rand(48, 80, generator=g) < 0.8] = 0  # 80% zeros, rows of different counts
    x = torch.randn(5, 80, generator=g)
    got = sparse_form(w, kernel)(x)
    bound = 2 * gamma(80) * (x.abs() @ w.abs().t())
    assert got.shape == (5, 48) and bool(((got - F.linear(x, w)).abs() <= bound).all())


def test_the_sparse_model_runs_its_kernels_and_agrees_with_the_dense_one():
    model, tok = load_model(tiny_spec("llama"), seed=0)
    prune_model(model, method="magnitude", sparsity=0.9, seqlen=64)
    names = list(prunable_linears(model))
    out = measure(model, names, 32, torch.device("cpu"), "unstructured", FAST)
    one = out["kernels_one_token"]
    assert out["kernel"] in CPU_KERNELS and set(one) == {
        f"{k}_{what}" for k in ("dense", *CPU_KERNELS) for what in ("ms", "gbs", "over_floor")
    }
    # each kernel's time over its own floor is its time over (its form's bytes / the bandwidth
    # sampled beside its timing); the whole model's floor is the median of those bandwidths
    forms = {n: sparse_form(model.get_submodule(n).weight, "csr16") for n in names}
    floor_ms = sum(f.bytes for f in forms.values()) / (one["csr16_gbs"] * 1e9) * 1e3
    assert one["csr16_over_floor"] == pytest.approx(one["csr16_ms"] / floor_ms, rel=0.02)
    beside = sorted(one[f"{k}_gbs"] for k in ("dense", *CPU_KERNELS))
    assert out["bandwidth_gbs_range"] == [beside[0], beside[-1]]
    assert beside[0] <= out["bandwidth_gbs"] <= beside[-1]
    assert out["bitmask_path"] in ("avx512", "avx2", "portable")
    assert out["gather_path"] == out["bitmask_path"]  # one switch forces both
    assert out["prefill_kernel"] in CPU_KERNELS and "not_run" not in out
    # every pruned linear ran sparse in every forward of the sparse measurements (none fell back)
    assert out["sparse"]["sparse_calls"] > 0 and out["sparse"]["sparse_calls"] % len(names) == 0
    # the logits agree to float32 rounding through two blocks (relative to their size)
    assert out["sparse"]["logits_max_abs_diff"] <= 1e-5 * max(1.0, out["sparse"]["logits_max_abs"])
    # the floor is bytes / bandwidth; the sparse form reads fewer bytes at 0.9
    assert out["sparse"]["bytes_per_token"] < out["dense"]["bytes_per_token"]
    assert out["speedup"]["floor"] == pytest.approx(
        out["dense"]["bytes_per_token"] / out["sparse"]["bytes_per_token"], rel=0.01
    )
    assert all(
        not any(type(m).__name__ == "SparseLinear" for m in model.modules()) for _ in [0]
    )  # swapped back


def test_the_candidates_follow_the_device_and_the_pattern():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU
    assert CPU_KERNELS == ("bitmask", "csr16", "gather", "scipy_csr", "torch_csr")
    assert CPU_KERNELS == kernels_for(cpu, "2:4")
    assert kernels_for(cuda, "unstructured") == ("torch_csr",) == kernels_for(cuda, "4:8")
    assert kernels_for(cuda, "2:4") == ("semi_structured", "torch_csr")
    assert set(KERNELS) == set(CPU_KERNELS) | {"semi_structured"}


def test_nm_violations_counts_the_groups_that_keep_too_many():
    w = torch.tensor(
        [
            [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0],  # 2 + 1 nonzeros: valid
            [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 3 in the first group
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],  # 4 and 3
        ]
    )
    assert nm_violations(w, 2, 4) == 3 and nm_violations(w[:1], 2, 4) == 0
    assert nm_violations(w, 4, 8) == 1  # only row 2 keeps more than 4 of its 8
    assert nm_violations(torch.ones(2, 6), 2, 4) == 4  # 6 columns: groups of 4 do not fit


def _two_four(rows, cols, dtype=torch.float32):
    w = torch.randn(rows, cols).to(dtype)
    w.view(rows, cols // 4, 4)[:, :, :2] = 0
    return w


def test_semi_structured_is_refused_with_the_reason_before_anything_is_converted():
    """torch's 2:4 compression keeps two of every four without checking: a weight that is not
    really 2:4 would be pruned further and timed as if it were the model. Each refusal names
    the weight and the reason; the CPU never offers the kernel."""
    cuda = torch.device("cuda")
    good = {"a.q": _two_four(64, 128, torch.bfloat16)}
    assert unavailable("semi_structured", cuda, "2:4", good) is None
    assert "runs 2:4 only, not 4:8" in unavailable("semi_structured", cuda, "4:8", good)
    bad = _two_four(64, 128, torch.bfloat16)
    bad[3, 0] = 1.0  # three nonzeros in one group of row 3
    why = unavailable("semi_structured", cuda, "2:4", {**good, "a.k": bad})
    assert why == "a.k has 1 groups of 4 with more than 2 nonzeros"
    why = unavailable("semi_structured", cuda, "2:4", {"a.v": _two_four(48, 128, torch.float16)})
    assert why == "a.v (48, 128) is not a multiple of (32, 64) for torch.float16"
    why = unavailable("semi_structured", cuda, "2:4", {"a.o": _two_four(64, 64, torch.float64)})
    assert why.startswith("a.o is torch.float64")
    assert "runs on cuda" in unavailable("semi_structured", torch.device("cpu"), "2:4", good)
    assert "runs on cpu" in unavailable("csr16", cuda, "2:4", good)
    wide = {"lm": torch.zeros(2, 65537)}
    assert "65536 columns" in unavailable("csr16", torch.device("cpu"), "unstructured", wide)


def test_csr16s_two_kernels_give_the_same_bits():
    """`few` (one pass per token) and `many` (indices read once for all tokens) sum each
    output's kept products in the same column order: equal bit for bit, row by row."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g)
    w[torch.rand(40, 96, generator=g) < 0.7] = 0
    x = torch.randn(2 * CSR16_MANY_FROM + 1, 96, generator=g)
    form = sparse_form(w, "csr16")
    together = form(x)  # the `many` kernel
    alone = torch.cat([form(x[i : i + 1]) for i in range(x.shape[0])])  # the `few` kernel
    assert torch.equal(together, alone)


class _Spy:
    """Stands for a sparse form and says which kernel ran."""

    def __init__(self, form, used):
        self.form, self.used, self.bytes = form, used, form.bytes

    def __call__(self, x):
        self.used.append(self.form.name)
        return self.form(x)


def test_a_sparse_linear_runs_its_batch_and_prefill_forms_by_rows():
    lin = torch.nn.Linear(32, 16, bias=True)
    with torch.no_grad():
        lin.weight[torch.rand(16, 32) < 0.5] = 0
    sparse = SparseLinear(lin, "csr16", "torch_csr", rows_many=4, batch="bitmask", rows_prefill=9)
    assert sparse.bytes == sparse.decode.bytes  # a decoded token reads the decode form
    used = []
    for tier in ("decode", "batch", "prefill"):
        setattr(sparse, tier, _Spy(getattr(sparse, tier), used))
    for rows in (3, 4, 8, 9):  # (1, rows, 32): rows x 1 tokens
        x = torch.randn(1, rows, 32)
        y = sparse(x)
        assert y.shape == (1, rows, 16) and torch.allclose(y, lin(x), atol=1e-5)
    assert used == ["csr16", "bitmask", "bitmask", "torch_csr"] and sparse.calls == 4


def test_asked_kernels_that_cannot_run_are_named_and_none_is_timed_as_sparse():
    model, _ = load_model(tiny_spec("llama"), seed=0)
    prune_model(model, method="magnitude", sparsity=0.5, pattern="2:4", seqlen=64)
    names = list(prunable_linears(model))
    spec = SpeedSpec(enabled=True, kernels=("semi_structured",), batch_sizes=(1,), repeats=1)
    out = measure(model, names, 32, torch.device("cpu"), "2:4", spec)
    assert (
        set(out) == {"skipped", "not_run"} and "runs on cuda" in out["not_run"]["semi_structured"]
    )
    out = measure(
        model,
        names,
        32,
        torch.device("cpu"),
        "2:4",
        replace(FAST, kernels=spec.kernels + ("scipy_csr",)),
    )
    assert out["kernel"] == out["prefill_kernel"] == "scipy_csr" and out["sparse"]["sparse_calls"]
    assert list(out["not_run"]) == ["semi_structured"]
    assert (
        out["note"]
        == "no 2:4 kernel on cpu: its masks run through the unstructured scipy_csr kernel"
    )


def test_pack_and_unpack_give_the_same_weight_bit_for_bit():
    w = torch.randn(7, 13)
    keep = torch.rand(7, 13) > 0.5
    w = w * keep
    values, bits = pack(w, keep)
    assert values.numel() == int(keep.sum()) and bits.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack(values, bits, (7, 13)), w)


def test_sizes_are_the_formats_arithmetic():
    w = torch.zeros(4, 16)
    w[0, :3] = 1.0  # 3 nonzeros in row 0
    w[2, 5] = 2.0
    s = sizes({"a": w}, 4)
    assert s == {
        "weights": 64,
        "nonzero": 4,
        "dense": 256,
        "bitmask": 4 * 4 + 8,
        "csr_int64": 4 * 12 + 5 * 8,
        "csr_int16": 4 * 6 + 5 * 4,
    }


def test_a_bitmask_export_reloads_to_the_same_weights_and_perplexity(tmp_path):
    from sparsebench import cli

    def run(argv):
        try:
            cli.main(argv)
        except SystemExit as err:
            assert not err.code

    base = ["model=tiny-llama", "logger=disabled"]
    run(
        base
        + [
            "method=wanda",
            "save.enabled=true",
            "save.format=bitmask",
            f"hydra.run.dir={tmp_path / 'a'}",
        ]
    )
    folder = tmp_path / "a" / "model"
    assert (folder / "sparsebench_bitmask.safetensors").is_file() and not (
        folder / "model.safetensors"
    ).exists()
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    run(
        [
            "model=local",
            f"model.path={folder}",
            "method=dense",
            "logger=disabled",
            f"hydra.run.dir={tmp_path / 'b'}",
        ]
    )
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["metrics"]["wikitext2"] == saved["metrics"]["wikitext2"]
    assert again["sparsity"]["pruned_params"] == saved["sparsity"]["pruned_params"]
    # bit for bit: the reloaded weights against the run's pruning done again in this process
    reloaded, _ = load_model(
        ModelSpec(name="x", source="local", path=str(folder), dtype="float32", seqlen=64)
    )
    model, tok = load_model(tiny_spec("llama"), seed=0)
    prune_model(model, tok, method="wanda", sparsity=0.5, seqlen=64, data=DataSpec(nsamples=8))
    ref = dict(model.state_dict())
    assert all(torch.equal(v, ref[k]) for k, v in reloaded.state_dict().items())


def test_a_bitmask_file_is_half_the_dense_one_at_half_sparsity_where_blocks_dominate(tmp_path):
    """At 0.5 in float32 a pruned weight costs 0.5 x 4 + 1/8 bytes: 0.53x. A model whose blocks
    hold nearly all its weights (4 blocks of hidden 256, a tied vocabulary of 256) stores at
    most 0.55x."""
    from safetensors.torch import save_file

    from sparsebench.families import original_masks, original_state_dict

    spec = ModelSpec(
        name="wide",
        source="tiny",
        dtype="float32",
        seqlen=64,
        arch={
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    )
    model, _ = load_model(spec, seed=0)
    masks = prune_model(model, method="magnitude", sparsity=0.5, seqlen=64).masks
    state = original_state_dict(model)
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
        str(tmp_path / "dense.st"),
    )
    save_file(bitmask_state(state, original_masks(model, masks)), str(tmp_path / "bitmask.st"))
    ratio = (tmp_path / "bitmask.st").stat().st_size / (tmp_path / "dense.st").stat().st_size
    assert ratio <= 0.55, ratio
    loaded = load_bitmask(tmp_path / "bitmask.st")
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert np.isclose(ratio, 0.53, atol=0.02)


def test_eval_speed_from_the_cli_reaches_results_and_the_report(tmp_path):
    """eval.speed.enabled=true: results.json `speed` and `size`, the report's speed-up and
    bytes columns and its decode speed-up plot."""
    from sparsebench import cli
    from sparsebench.records import report

    fast = [
        "eval.speed.enabled=true",
        "eval.speed.repeats=1",
        "eval.speed.warmup=0",
        "eval.speed.decode_tokens=2",
        "eval.speed.batch_sizes=[1]",
        "eval.speed.kernels=[scipy_csr]",
    ]
    try:
        cli.main(
            [
                "model=tiny-llama",
                "logger=disabled",
                "method=magnitude",
                "sparsity=0.9",
                *fast,
                f"hydra.run.dir={tmp_path / 'sweep' / 'run'}",
            ]
        )
    except SystemExit as err:
        assert not err.code
    res = json.loads((tmp_path / "sweep" / "run" / "results.json").read_text())
    assert res["speed"]["kernel"] == "scipy_csr" and res["speed"]["sparse"]["sparse_calls"] > 0
    assert res["size"]["pruned_weights"]["bitmask"] < res["size"]["pruned_weights"]["dense"]
    paths = report.write_report(tmp_path / "sweep")
    text = paths["markdown"].read_text()
    assert "decode x" in text and "MB (bitmask)" in text and paths["plot_speed"].is_file()
    # a tiny model's timings are flagged as such, in results.json and in the report
    assert res["speed"]["suspect"][0].startswith("too small to time")
    assert "(suspect)" in text and "Suspect speed measurements" in text


def test_the_plan_states_each_forms_inference_bytes_as_the_run_measures_them():
    """dry_run's inference bytes (plan/build.py) against the pruned model's own byte counts
    (formats.size_of): equal up to one weight per matrix (the plan rounds the kept count once
    for the model, a method once per matrix)."""
    from sparsebench.formats import size_of
    from sparsebench.launch import memory_plan
    from sparsebench.specs import build_specs

    from .conftest import compose

    specs = build_specs(
        compose(["model=tiny-llama", "logger=disabled", "sparsity=0.7", "method=magnitude"])
    )
    plan, _, _ = memory_plan(specs, 1)
    model, _ = load_model(tiny_spec("llama"), seed=0)
    prune_model(model, method="magnitude", sparsity=0.7, seqlen=64)
    size = size_of(model)
    matrices = len(prunable_linears(model))
    assert plan.inference["dense_form"] == size["model_dense"]
    assert abs(plan.inference["bitmask"] - size["model_bitmask"]) <= 4 * matrices
    assert abs(plan.inference["csr_int16"] - size["model_csr_int16"]) <= 6 * matrices


def test_a_7b_bitmask_export_at_half_sparsity_is_at_most_055x_dense():
    """The export's bytes are the plan's (the test above: the plan counts what the run counts;
    the file test: a file is those bytes plus its header). Llama-2-7B in float32 keeps its
    embedding and lm_head (3.9% of its weights) dense: (0.039 + 0.961 x 0.53) = 0.549x."""
    from sparsebench.launch import memory_plan
    from sparsebench.specs import build_specs

    from .conftest import compose

    overrides = ["model=llama2-7b", "model.source=random", "model.dtype=float32", "sparsity=0.5"]
    plan, _, _ = memory_plan(build_specs(compose(overrides + ["logger=disabled"])), 1)
    ratio = plan.inference["bitmask"] / plan.inference["dense_form"]
    assert 0.54 < ratio <= 0.55, ratio


def test_random_weights_skip_quality_but_not_speed(tmp_path):
    """model.source=random (a full-size architecture with no download: the GPU speed part of
    scripts/bench_scale_gpu.py) has no perplexity, but its speed is a measurement."""
    from sparsebench import cli

    argv = ["model=tiny-llama", "model.source=random", "logger=disabled", "method=magnitude"]
    argv += ["sparsity=0.5", "pattern=2:4", "eval.speed.enabled=true", "eval.speed.repeats=1"]
    argv += ["eval.speed.batch_sizes=[1]", "eval.speed.decode_tokens=2", "eval.speed.warmup=0"]
    try:
        cli.main(argv + [f"hydra.run.dir={tmp_path}"])
    except SystemExit as err:
        assert not err.code
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["evaluation"] == "skipped: random weights" and "wikitext2" not in res["metrics"]
    assert res["speed"]["sparse"]["sparse_calls"] > 0 and res["speed"]["pattern"] == "2:4"


def test_the_end_of_run_summary_says_what_the_sparsity_bought(tmp_path):
    from sparsebench.records.summary import run_summary

    speed = {
        "device": "cpu",
        "kernel": "csr16",
        "prefill_kernel": "torch_csr",
        "dense": {"decode_ms_b1": 34.94},
        "sparse": {"decode_ms_b1": 27.21},
        "speedup": {"decode_b1": 1.284, "prefill_b1": 0.848, "floor": 3.028},
    }
    size = {
        "pruned_weights": {"weights": 10, "nonzero": 1},
        "model_dense": 538_000_000,
        "model_bitmask": 169_000_000,
        "bitmask_over_dense": 0.3143,
    }
    text = run_summary({"speed": speed, "size": size}, tmp_path / "results.json")
    assert (
        "speed (cpu, csr16 / torch_csr): decode 34.9 -> 27.2 ms/token (1.28x dense; the "
        "bandwidth floor allows 3.03x), prefill 0.85x dense" in text
    )
    assert "size: 538 MB dense, 169 MB with the pruned weights as bitmask + values (0.31x" in text
    # a figure the run's own timings cannot explain is printed as suspect, with the reasons
    suspect = {**speed, "suspect": ["too small to time: the weights (0.43 MB) fit in a cache"]}
    text = run_summary({"speed": suspect, "size": size}, tmp_path / "results.json")
    assert "3.03x), prefill 0.85x dense; SUSPECT, see below" in text
    assert "\n  suspect: too small to time" in text
    skipped = {"skipped": "no sparse kernel can run this model here", "not_run": {}}
    dense = {**size, "pruned_weights": {"weights": 10, "nonzero": 10}}  # nothing pruned
    text = run_summary({"speed": skipped, "size": dense}, tmp_path / "results.json")
    assert "speed: no sparse kernel can run this model here" in text and "size:" not in text


def test_a_kernel_that_raises_is_recorded_and_left_out(monkeypatch):
    from sparsebench.evaluation import kernels

    def missing_backend(self, weight):
        raise RuntimeError("no backend for this product\nsecond line")

    monkeypatch.setattr(kernels.ScipyCSR, "__init__", missing_backend)
    model, _ = load_model(tiny_spec("llama"), seed=0)
    prune_model(model, method="magnitude", sparsity=0.9, seqlen=64)
    names = list(prunable_linears(model))
    out = measure(model, names, 32, torch.device("cpu"), "unstructured", FAST)
    assert out["not_run"] == {"scipy_csr": "RuntimeError: no backend for this product"}
    assert out["kernel"] in ("torch_csr", "csr16", "bitmask", "gather")
    assert out["sparse"]["sparse_calls"] > 0
    only = replace(FAST, kernels=("scipy_csr",))
    out = measure(model, names, 32, torch.device("cpu"), "unstructured", only)
    assert out == {
        "skipped": "every sparse kernel failed here",
        "not_run": {"scipy_csr": "RuntimeError: no backend for this product"},
    }


def test_a_failed_speed_measurement_never_loses_the_runs_result(tmp_path, monkeypatch):
    from sparsebench import cli
    from sparsebench.evaluation import speed

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(speed, "measure", out_of_memory)
    try:
        cli.main(
            ["model=tiny-llama", "logger=disabled", "eval.speed.enabled=true"]
            + [f"hydra.run.dir={tmp_path}"]
        )
    except SystemExit as err:
        assert not err.code
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "complete" and res["metrics"]["wikitext2"] > 0
    assert res["speed"] == {
        "failed": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    }
