"""FLAP (method=flap, cut/widths.py): the released statistics by hand, the released structure
rules on known metrics, the cut block against the full block with the removed units' columns
zeroed, the bias compensation exact where the removed channels are constant, grouped
attention cut by whole key/value groups, the export that sparsebench reloads to the run's
perplexity, and the families it refuses before any work. The released code's masks and
biases on a model it runs: scripts/parity_flap.py (docs/results.md)."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.cut.widths import channels_of_groups, parts_of, shrink
from sparsebench.models import ModelSpec, find_blocks, load_model
from sparsebench.pipeline import prune_model
from sparsebench.pruners.flap import Fluctuation, adaptive_keep, uniform_keep

from .conftest import CONF, TINY, run_cli, run_reload

CALIB = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(0))


def tiny(family: str, **arch):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"tiny-{family}.yaml"))["model"]
    cfg["arch"].update(arch)
    return load_model(ModelSpec(**cfg), seed=0)[0]


def test_the_released_fluctuation_by_hand():
    """One sample per window; the first adds no fluctuation; then fluc <- fluc (n-1)/n +
    sum_t (x_t - m_new)^2 / (n+1) with m_new the mean after this window (the released
    old-mean tensor is the new one)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 4, generator=g) for _ in range(3)]
    stat = Fluctuation(4, "cpu")
    for x in xs:
        stat.add(x)
    m1 = xs[0].mean(0)
    m2 = m1 / 2 + xs[1].mean(0) / 2
    m3 = m2 * 2 / 3 + xs[2].mean(0) / 3
    f2 = ((xs[1] - m2) ** 2).sum(0) / 2
    f3 = f2 * 1 / 2 + ((xs[2] - m3) ** 2).sum(0) / 3
    assert torch.allclose(stat.mean, m3, atol=1e-6) and torch.allclose(stat.fluc, f3, atol=1e-5)
    sq = sum(x.norm(dim=0) ** 2 for x in xs) / 3
    assert torch.allclose(stat.sq, sq, atol=1e-5)


def test_the_released_structure_rules_on_known_metrics():
    # AL-AM: 2 blocks x 1 group (weight 3 channels) and 4 channels each: 14 units of weight;
    # removing 0.5 keeps the units whose cumulative weight lands closest to 7
    attn = torch.tensor([[2.0], [-1.0]])
    mlp = torch.tensor([[1.5, 0.5, -0.5, -2.0], [1.0, 0.0, -1.5, 3.0]])
    keep_a, keep_m = adaptive_keep(attn, mlp, 3, 0.5)
    # descending: 3.0(1) 2.0(3) 1.5(1) 1.0(1) 0.5 ... cumsum 1, 4, 5, 6, 7: threshold 0.5
    assert keep_a.tolist() == [[True], [False]]
    assert keep_m.tolist() == [[True, False, False, False], [True, False, False, True]]
    # UL-UM: int(0.5 x 4) = 2 removed, ties kept
    assert uniform_keep(torch.tensor([3.0, 1.0, 2.0, 0.0]), 0.5).tolist() == [
        True,
        False,
        True,
        False,
    ]
    assert uniform_keep(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5).all()


def test_kv_groups_take_their_query_heads():
    q, kv = channels_of_groups(torch.tensor([False, True]), group=2, head_dim=3)
    assert q.tolist() == [6, 7, 8, 9, 10, 11] and kv.tolist() == [3, 4, 5]


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "opt"])
def test_the_cut_block_is_the_full_block_with_the_removed_columns_zeroed(family):
    """Without the bias, removing a key/value group (its query heads) and MLP channels is the
    full block with those columns of o_proj (out_proj) and down_proj (fc2) zeroed."""
    model = tiny(family)
    block = find_blocks(model)[1][0]
    p = parts_of(block, model.config)
    groups = p.kv_heads
    keep_g = torch.ones(groups, dtype=torch.bool)
    keep_g[0] = False
    keep_c = torch.rand(p.channels, generator=torch.Generator().manual_seed(1)) > 0.4
    zeroed = copy.deepcopy(model)
    zp = parts_of(find_blocks(zeroed)[1][0], zeroed.config)
    q_idx, _ = channels_of_groups(~keep_g, p.group, p.head_dim)
    with torch.no_grad():
        getattr(zp.attention, zp.o).weight[:, q_idx] = 0
        getattr(zp.mlp, zp.out).weight[:, ~keep_c] = 0
    shrink(p, keep_g, keep_c)
    assert getattr(p.attention, p.q).out_features == (groups - 1) * p.group * p.head_dim
    assert getattr(p.attention, p.k).out_features == (groups - 1) * p.head_dim
    assert getattr(p.mlp, p.out).in_features == int(keep_c.sum())
    ids = CALIB[:2]
    with torch.no_grad():
        # the same products; only zero terms leave the sums, which a GEMM may regroup: float32
        # rounding of logits of size ~1 over a 128-term sum is ~128 x 6e-8, far under 1e-5
        assert torch.allclose(model(ids).logits, zeroed(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_bias_adds_back_a_constant_channel_exactly():
    """down_proj's input channel c held at its mean on every token: removing it and adding
    mean_c x W[:, c] to the bias leaves the output unchanged."""
    from sparsebench.cut.widths import _columns

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=False)
    x = torch.randn(10, 6, generator=g)
    x[:, 2] = 0.75  # a channel that never fluctuates
    keep = torch.tensor([True, True, False, True, True, True])
    mean = x.mean(0)
    add = (mean * ~keep) @ lin.weight.detach().T
    cut = _columns(lin, torch.nonzero(keep).flatten(), add)
    with torch.no_grad():
        assert torch.allclose(cut(x[:, keep]), lin(x), atol=1e-6)


@pytest.mark.models  # every family's FLAP export: make test-models
def test_flap_from_the_cli_exports_a_model_sparsebench_reloads(tmp_path):
    res = run_cli(TINY + ["method=flap", "sparsity=0.3", "save.enabled=true"], tmp_path / "run")
    cut = res["sparsity"]["structure"]
    assert res["status"] == "complete" and cut["structure"] == "AL-AM"
    assert abs(res["sparsity"]["actual_sparsity"] - 0.3) < 0.05  # the released threshold rule
    assert res["sparsity"]["actual_sparsity"] == cut["removed_share"]
    again = run_reload(tmp_path / "run", tmp_path / "again")
    assert again["metrics"]["wikitext2"] == res["metrics"]["wikitext2"]
    assert again["sparsity"]["structure"]["widths"] == cut["widths"]
    from sparsebench.records.summary import run_summary

    text = run_summary(res, tmp_path)
    assert "MLP channels" in text and "which no transformers config describes" in text


def test_uniform_widths_export_a_config_plain_transformers_loads(tmp_path):
    """UL-UM cuts every block to the same widths: the export's config says them (and switches
    on the biases the compensation needs, the others zero), so from_pretrained alone loads it
    and computes the run's logits."""
    from transformers import AutoModelForCausalLM

    arch = ["model.arch.num_attention_heads=8", "model.arch.num_key_value_heads=4"]
    args = TINY + arch + ["method=flap", "method.structure=UL-UM", "sparsity=0.5"]
    res = run_cli(args + ["save.enabled=true"], tmp_path / "run")
    cut = res["sparsity"]["structure"]
    assert cut["plain_config"] and {(w["kv_heads"], w["channels"]) for w in cut["widths"]} == {
        (2, 64)
    }
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    c = plain.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.head_dim) == (2, 4, 8)
    assert c.intermediate_size == 64 and c.mlp_bias and c.attention_bias
    assert sum(p.numel() for p in plain.parameters()) == res["sparsity"]["nonzero_params"]
    mlp = plain.model.layers[0].mlp
    assert bool((mlp.up_proj.bias == 0).all()) and bool(mlp.down_proj.bias.abs().sum() > 0)
    again = run_reload(tmp_path / "run", tmp_path / "again")  # evaluated as the run was
    assert again["metrics"]["wikitext2"] == res["metrics"]["wikitext2"]
    from sparsebench.records.summary import run_summary

    assert "which no transformers config describes" not in run_summary(res, tmp_path)


def test_grouped_attention_loses_whole_groups_and_the_model_runs():
    model = tiny("mistral", num_key_value_heads=2, num_attention_heads=4)
    out = prune_model(model, method="flap", sparsity=0.6, calib=CALIB, seqlen=64)
    for block in find_blocks(model)[1]:
        p = parts_of(block, model.config)
        q, k = getattr(p.attention, p.q).out_features, getattr(p.attention, p.k).out_features
        assert q == 2 * k  # two query heads per key/value head, still
    assert out.sparsity["actual_sparsity"] > 0.4
    with torch.no_grad():
        model.generate(CALIB[:1, :8], max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize(
    "family, message",
    [("mixtral", "routes tokens to experts"), ("phi3", "needs separate q/k/v/o projections")],
)
def test_flap_refuses_what_it_cannot_cut_before_any_work(family, message, tmp_path, capsys):
    from sparsebench import cli

    folder = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        cli.main(
            [f"model=tiny-{family}", "logger=disabled", "method=flap", f"hydra.run.dir={folder}"]
        )
    assert err.value.code and message in capsys.readouterr().err
    assert not (folder / "results.json").exists()
