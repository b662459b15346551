"""Quantization after pruning (quant=rtn|gptq, SparseGPT's joint mode): 0 on every grid, pruned
weights exactly zero through every quantizer (unstructured and N:M), GPTQ's known answers
(no input correlation: it is round to nearest; correlated inputs: a lower output error than
round to nearest), the bits a stored model needs counted by hand, and the command-line paths
(labels, a dense model, a mixture of experts, refusals before any work)."""

import pytest
import torch

from sparsebench.errors import SparsebenchError
from sparsebench.quant import bits_of, codes, grid_params, quantize
from sparsebench.quant.gptq import gptq_sweep
from sparsebench.quant.rtn import rtn
from sparsebench.sparsity import Pattern, project

from .conftest import TINY, run_cli, run_reload


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_zero_is_on_every_grid(bits, sym):
    torch.manual_seed(0)
    x = torch.randn(16, 32) * torch.rand(16, 1) * 10 + torch.randn(16, 1)  # rows off centre
    x[3] = x[3].abs() + 1  # a row with no negative value
    x[4] = -x[4].abs() - 1  # and none positive
    x[5] = 0  # all zero
    scale, zero = grid_params(x, bits, sym)
    assert torch.equal(quantize(torch.zeros_like(x), scale, zero, bits), torch.zeros_like(x))
    q = codes(x, scale, zero, bits)
    assert q.min() >= 0 and q.max() <= 2**bits - 1 and torch.equal(q, q.round())
    # a value on the grid rounds to itself
    on = quantize(x, scale, zero, bits)
    assert torch.equal(quantize(on, scale, zero, bits), on)


def _masked(rows=24, cols=64, pattern="unstructured", seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    p = Pattern(2, 4) if pattern == "2:4" else Pattern()
    keep = project(W.abs(), 0.5, p, "row")
    return W * keep, keep, p


def _correlated_hessian(cols, seed=1, tokens=512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    return 2 * X.t() @ X / tokens, X


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("group", [-1, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_every_pruned_weight_at_zero(pattern, group, act_order):
    W, keep, p = _masked(pattern=pattern)
    H, _ = _correlated_hessian(W.shape[1])
    Q, _ = gptq_sweep(W, H, 3, False, group, keep, act_order=act_order, blocksize=16)
    assert not Q[~keep].any()  # exactly zero, not small
    if p.is_nm:  # every group of 4 still keeps at most 2 nonzeros
        assert ((Q != 0).reshape(Q.shape[0], -1, 4).sum(-1) <= 2).all()
    for bits in (2, 4, 8):
        assert not rtn(W, bits, group, True)[~keep].any()


def test_without_the_mask_gptq_moves_pruned_weights_off_zero():
    # why the mask is passed: the compensation writes into every later column, pruned or not
    W, keep, _ = _masked()
    H, _ = _correlated_hessian(W.shape[1])
    Q, _ = gptq_sweep(W, H, 4, False, -1, None, blocksize=16)
    assert (Q[~keep] != 0).any()  # a few percent here: the rest round back to 0


@pytest.mark.parametrize("group", [-1, 16])
def test_gptq_without_input_correlation_is_round_to_nearest(group):
    # H diagonal: its inverse factor is diagonal, no error reaches another column, and every
    # grid is taken from the untouched weight; the column order (act_order) cannot matter
    W, keep, _ = _masked()
    H = torch.diag(torch.linspace(0.5, 2.0, W.shape[1]))
    for act_order in (False, True):
        Q, _ = gptq_sweep(W, H.clone(), 4, False, group, keep, act_order=act_order, blocksize=16)
        assert torch.allclose(Q, rtn(W, 4, group, False), rtol=0, atol=1e-6)


@pytest.mark.parametrize("masked", [True, False])
def test_gptq_lowers_the_output_error_of_round_to_nearest(masked):
    # GPTQ's promise: on correlated inputs, compensating each column's rounding error lowers
    # the layer's output error ||(Q - W) X^T|| below rounding every weight alone
    W, keep, _ = _masked(cols=64)
    if not masked:
        W, keep = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)), None
    H, X = _correlated_hessian(64)
    Q, _ = gptq_sweep(W, H, 3, False, -1, keep, blocksize=16)
    R = rtn(W, 3, -1, False)
    err = lambda A: float(((A - W) @ X.t()).pow(2).sum())  # noqa: E731
    assert err(Q) < err(R), (err(Q), err(R))


def test_the_bits_of_a_stored_model_by_hand():
    from torch import nn

    lin = nn.Linear(64, 8, bias=False)
    keep = torch.zeros(8, 64, dtype=torch.bool)
    keep[:, :16] = True  # 128 of 512 kept
    lin.weight.data *= keep

    class Q:
        bits, group_size, sym = 4, 32, False

    got = bits_of({"l": lin}, {"l": keep}, Q, rest_params=100, rest_bits=3200)
    # values 128 x 4, mask 512, grids 8 rows x 2 groups x (16 + 4)
    assert (got["values_bits"], got["mask_bits"], got["grid_bits"]) == (512, 512, 320)
    assert got["bits_per_pruned_weight"] == round(1344 / 512, 4)
    assert got["bits_per_model_param"] == round((1344 + 3200) / 612, 4)
    dense = bits_of({"l": lin}, None, None, rest_params=0, rest_bits=0)
    assert dense["bits_per_pruned_weight"] == 32 and dense["mask_bits"] == 0


def test_gptq_after_wanda_from_the_cli(tmp_path):
    plain = run_cli(TINY + ["method=wanda"], tmp_path / "plain")
    res = run_cli(TINY + ["method=wanda", "quant=gptq", "quant.group_size=32"], tmp_path / "q")
    assert res["status"] == "complete"  # the verifier found every pruned weight at zero
    assert res["sparsity"]["actual_sparsity"] == plain["sparsity"]["actual_sparsity"]
    assert res["quant"]["name"] == "gptq" and res["quant"]["linears"] == 14
    assert res["size"]["bits"]["bits_per_pruned_weight"] < 6 < 33
    assert "quantize" in res["timings_s"]
    assert res["metrics"]["wikitext2"] != plain["metrics"]["wikitext2"]
    from sparsebench.records.report import write_report
    from sparsebench.records.summary import run_summary

    text = run_summary(res, tmp_path)
    assert text.startswith("sparsebench: wanda + gptq w4 g32 at 0.5")
    assert "bits per parameter: " in text and "scales and zero points" in text
    # unquantized: float32 kept values and the mask, 0.5 x 32 + 1 bits a weight
    assert "bits per parameter: 17.000 per weight" in run_summary(plain, tmp_path)
    write_report(tmp_path)
    assert "| wanda + gptq w4 g32 |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "extra",
    [
        ["method=sparsegpt", "pattern=2:4", "quant=rtn", "quant.bits=3"],
        ["method=dense", "quant=gptq", "quant.bits=8"],  # no masks: every weight rounded
        ["method=wanda", "model=tiny-mixtral", "quant=gptq"],
        ["method=sparsegpt", "quant=gptq", "quant.act_order=true", "quant.sym=true"],
    ],
)
def test_every_quantizer_runs_verified(extra, tmp_path):
    res = run_cli(["model=tiny-llama", "logger=disabled", *extra], tmp_path)
    assert res["status"] == "complete" and res["quant"]["linears"] > 0


def test_sparsegpt_joint_rounds_inside_its_sweep(tmp_path):
    from safetensors.torch import load_file

    res = run_cli(
        TINY + ["method=sparsegpt", "quant=gptq", "quant.joint=true", "save.enabled=true"],
        tmp_path,
    )
    assert res["quant"]["rounded_in_pruning"] and res["quant"]["joint"]
    state = load_file(tmp_path / "model" / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        # every row holds at most 2^4 distinct values, 0 among them (the pruned ones)
        for row in state[name].float():
            assert len(torch.unique(row)) <= 16 and (row == 0).any()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["quant=gptq", "quant.bits=5"], r"'bits' is 5; valid: 2, 3, 4, 8"),
        (
            ["quant=rtn", "quant.group_size=48"],
            r"group_size=48 does not divide .*\(64, 128 columns\)",
        ),
        (["quant=gptq", "quant.joint=true"], r"quant.joint=true rounds inside SparseGPT's"),
        (
            ["method=sparsegpt", "quant=gptq", "quant.joint=true", "quant.group_size=32"],
            r"one grid per row",
        ),
        (["quant=rtn", "quant.group_size=0"], r"group_size=0: -1"),
    ],
)
def test_bad_quantization_is_refused_before_any_work(extra, message, tmp_path):
    from sparsebench import cli

    folder = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        cli.main(TINY + ["method=wanda", *extra, f"hydra.run.dir={folder}"])
    assert err.value.code
    assert not (folder / "results.json").exists()
    from sparsebench.launch import memory_plan
    from sparsebench.specs import build_specs

    from .conftest import compose

    with pytest.raises(SparsebenchError, match=message):
        memory_plan(build_specs(compose(TINY + ["method=wanda", *extra])), 1)


def test_no_quantization_keeps_the_identity_and_the_protocol():
    from sparsebench.records.ledger import identity, protocol_id

    config = {"method": {"name": "wanda"}, "sparsity": 0.5, "seed": 0}
    assert identity({**config, "quant": {"name": "none"}}) == identity(config)
    assert identity({**config, "quant": {"name": "gptq", "bits": 4}}) != identity(config)
    assert protocol_id({**config, "quant": {"name": "gptq"}}, {}) == protocol_id(config, {})


def test_the_report_draws_perplexity_against_bits(tmp_path):
    from sparsebench.records.plots import bits_series
    from sparsebench.records.report import write_report
    from sparsebench.records.rows import load_row

    for name, extra in [
        ("float", []),
        ("w8", ["quant=rtn", "quant.bits=8"]),
        ("w3", ["quant=rtn", "quant.bits=3"]),
        ("g3", ["quant=gptq", "quant.bits=3"]),
    ]:
        run_cli(TINY + ["method=wanda", *extra], tmp_path / name)
    rows = [load_row(tmp_path / n / "results.json") for n in ("float", "w8", "w3", "g3")]
    lines = bits_series(rows, "wikitext2")
    # rtn: 3, 8 bits and the float run; gptq: 3 bits and the float run
    assert sorted(len(p) for p in lines.values()) == [2, 3]
    bits = sorted(p[0] for p in lines[("tiny-llama", "wanda", "rtn", 0.5, "unstructured")])
    assert bits[0] < bits[1] < bits[2] == 0.5 * 32 + 1  # float32 kept values + the mask
    write_report(tmp_path)
    assert (tmp_path / "report_bits.png").exists()
    assert "bits / weight" in (tmp_path / "report.md").read_text()


def test_a_quantized_sweep_keeps_its_dense_reference_unquantized(tmp_path):
    from sparsebench import cli
    from sparsebench.records.report import load_results
    from sparsebench.records.rows import table

    sweep = tmp_path / "s"
    cli.main(
        ["-m", *TINY, "method=dense,wanda", "quant=rtn", "quant.bits=4", f"hydra.sweep.dir={sweep}"]
    )
    rows = table(load_results(sweep))
    dense = [r for r in rows if r["method"] == "dense" and not r["quant"]]
    assert len(dense) == 1 and dense[0]["wikitext2_dense_retained_pct"] == 100.0
    for r in rows:
        if r["quant"]:  # the quantized dense model and wanda + rtn, each against the float one
            assert r["wikitext2_dense_retained_pct"] == pytest.approx(
                100.0 * dense[0]["wikitext2"] / r["wikitext2"], abs=0.01
            )
    assert sorted(r["label"] for r in rows) == ["dense", "dense + rtn w4", "wanda + rtn w4"]


def test_a_refined_sweep_gets_its_dense_baseline(tmp_path):
    from sparsebench import cli
    from sparsebench.records.report import load_results
    from sparsebench.records.rows import table

    sweep = tmp_path / "s"
    cli.main(["-m", *TINY, "method=wanda", "refine=dsnot", f"hydra.sweep.dir={sweep}"])
    rows = table(load_results(sweep))
    assert [r["label"] for r in rows] == ["dense", "wanda + dsnot"]
    assert rows[1]["wikitext2_dense_retained_pct"] is not None


@pytest.mark.parametrize("sym", [True, False])
def test_a_quantized_export_is_the_runs_model_for_plain_transformers(sym, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    run = TINY + ["method=sparsegpt", "quant=gptq", "quant.group_size=32", f"quant.sym={sym}"]
    run += ["save.enabled=true"]
    run_cli(run + ["save.format=dense"], tmp_path / "dense")
    saved = run_cli(run + ["save.format=quantized"], tmp_path / "packed")
    state = load_file(tmp_path / "dense" / "model" / "model.safetensors")
    packed = load_file(tmp_path / "packed" / "model" / "model.safetensors")
    assert any(k.endswith("weight_packed") for k in packed)  # the library's packed integers
    # the asymmetric grid's packed zero points load only dequantized in transformers 5 (a
    # shape check of its compressed modules refuses them); a symmetric one also runs packed
    extra = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "packed" / "model", **extra)
    run_model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense" / "model")
    probe = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(probe).logits, run_model(probe).logits)
    deq = AutoModelForCausalLM.from_pretrained(
        tmp_path / "packed" / "model",
        quantization_config=CompressedTensorsConfig(dequantize=True),
    ).state_dict()
    for name, w in state.items():  # every weight, bit for bit
        assert torch.equal(deq[name], w), name
    again = run_reload(tmp_path / "packed", tmp_path / "again")  # verified masks, same numbers
    assert again["metrics"]["wikitext2"] == saved["metrics"]["wikitext2"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["save.format=quantized"], r"save.format=quantized stores the codes of a quantized run"),
        (
            ["save.format=quantized", "quant=gptq", "quant.act_order=true"],
            r"add quant.static_groups=true",
        ),
        (
            ["save.format=quantized", "quant=rtn", "model=tiny-phi3"],
            r"stores .* fused or transposed",
        ),
    ],
)
def test_a_quantized_export_that_cannot_be_written_is_refused(extra, message):
    from sparsebench.launch import memory_plan
    from sparsebench.specs import build_specs

    from .conftest import compose

    with pytest.raises(SparsebenchError, match=message):
        argv = ["model=tiny-llama", "logger=disabled", "save.enabled=true", *extra]
        memory_plan(build_specs(compose(argv)), 1)


def test_prune_model_quantizes_after_pruning_as_the_stage_does():
    """The library entry point's quant= is the command's stage: Wanda's masks, then GPTQ at 3
    bits, gives the weights of the stage run by hand; pruned weights exactly zero; a quantizer
    that reads text without calibration windows or a tokenizer is refused before any work."""
    from sparsebench.models import load_model, prunable_linears
    from sparsebench.pipeline import prune_model, quantize
    from sparsebench.quant import QuantContext
    from sparsebench.specs import build_quant

    from .conftest import tiny_spec

    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(tiny_spec("llama"), seed=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsebenchError, match="the quantizer calibrates on text"):
        prune_model(model, method="magnitude", seqlen=64, quant="gptq")
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())

    out = prune_model(
        model, method="wanda", seqlen=64, calib=calib, quant="gptq", quant_options={"bits": 3}
    )
    assert out.quant_report["linears"] == len(out.masks) and "quantize" in out.timings_s
    got = {n: lin.weight.clone() for n, lin in prunable_linears(model).items()}
    assert all(not w[~out.masks[n]].any() for n, w in got.items())
    assert all(len(w.unique(dim=None)) <= 8 * w.shape[0] + 1 for w in got.values())

    model.load_state_dict(dense)  # by hand: the same masks, then the stage
    by_hand = prune_model(model, method="wanda", seqlen=64, calib=calib)
    stage = build_quant({"name": "gptq", "bits": 3}, None)
    quantize(stage, QuantContext(model, by_hand.masks, torch.device("cpu"), calib))
    assert all(torch.equal(lin.weight, got[n]) for n, lin in prunable_linears(model).items())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_pack_into_bits_and_back(bits):
    from sparsebench.formats import pack_codes, unpack_codes

    q = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(q, bits)
    assert packed.numel() == -(-1001 * bits // 8)  # bits per code, rounded up to a byte
    assert torch.equal(unpack_codes(packed, bits, 1001).long(), q)


@pytest.mark.parametrize(
    "method, quant",
    [
        ("wanda", {"name": "gptq", "bits": 3, "group_size": 32}),
        ("magnitude", {"name": "rtn", "bits": 4}),
        ("sparsegpt", {"name": "gptq", "bits": 4, "joint": True}),
    ],
)
def test_the_bitmask_folder_stores_codes_and_reloads_the_runs_weights(method, quant, tmp_path):
    """save.format=bitmask of a quantized run: the kept values as b-bit codes with their grid;
    the file dequantizes to the run's weights bit for bit and is smaller than float values."""
    from safetensors.torch import load_file

    from sparsebench.families import original_state_dict
    from sparsebench.formats import BITMASK_FILE, load_bitmask
    from sparsebench.models import load_model
    from sparsebench.pipeline import prune_model
    from sparsebench.records.export import save_pruned
    from sparsebench.registry import METHODS
    from sparsebench.specs import build_quant

    from .conftest import tiny_spec

    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    model, tok = load_model(tiny_spec("llama"), seed=0)
    pruner = METHODS.build(method, {})
    stage = build_quant(dict(quant), pruner)
    out = prune_model(model, method=pruner, sparsity=0.5, calib=calib, seqlen=64, quant=stage)
    meta = {"sparsity": 0.5, "pattern": "unstructured", "group": "tensor"}
    codes = save_pruned(model, tok, out.masks, tmp_path / "q", meta, "bitmask", quant=stage)
    floats = save_pruned(model, tok, out.masks, tmp_path / "f", meta, "bitmask")
    state = original_state_dict(model)
    again = load_bitmask(codes / BITMASK_FILE)
    assert all(torch.equal(again[k], v) for k, v in state.items() if k in again)
    raw = load_file(str(codes / BITMASK_FILE))
    assert sum(k.endswith(".__codes") for k in raw) == len(out.masks)
    q_bytes = sum(v.numel() for k, v in raw.items() if k.endswith(".__codes"))
    kept = sum(int(m.sum()) for m in out.masks.values())
    assert q_bytes == sum(-(-int(m.sum()) * quant["bits"] // 8) for m in out.masks.values())
    assert q_bytes < kept  # under a byte per kept value at <= 4 bits
    assert (codes / BITMASK_FILE).stat().st_size < (floats / BITMASK_FILE).stat().st_size


def test_the_frontier_keeps_joint_and_sequential_gptq_apart():
    """One line per method, sparsity and quantizer across bit widths: SparseGPT's joint sweep
    and GPTQ after SparseGPT are two lines, each ending at the unquantized run."""
    from sparsebench.records.plots import bits_series

    def row(i, label, quant, bits, ppl):
        return {"status": "complete", "model": "m", "path": str(i), "label": label,
                "quant": quant, "sparsity": 0.5, "pattern": "unstructured",
                "bits_per_weight": bits, "wikitext2": ppl, "method": "sparsegpt"}  # fmt: skip

    rows = [
        row(0, "sparsegpt + gptq w4", "gptq w4", 3.0, 10.0),
        row(1, "sparsegpt + gptq w3", "gptq w3", 2.5, 12.0),
        row(2, "sparsegpt + gptq w4 joint", "gptq w4 joint", 3.0, 9.0),
        row(3, "sparsegpt", None, 17.0, 8.0),
    ]
    series = bits_series(rows, "wikitext2")
    assert sorted(k[2] for k in series) == ["gptq", "gptq joint"]
    lines = {k[2]: sorted(v) for k, v in series.items()}
    assert [p[0] for p in lines["gptq"]] == [2.5, 3.0, 17.0]
    assert [p[0] for p in lines["gptq joint"]] == [3.0, 17.0]
