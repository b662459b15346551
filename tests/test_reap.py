"""Expert removal (method=reap, method=expert_frequency; cut/experts.py): REAP's saliency by
hand, the expert whose output is zero (or that no token reaches) is the one removed, the cut
MoE layer computes what the full one computes for every token whose top-k avoids the removed
expert (Mixtral renormalises its top-k), the export is a plain transformers model with the
new expert count that sparsebench reloads to the run's perplexity, and the refusals before
any work. llm-compressor's modifier beside it: scripts/parity_reap.py (docs/results.md)."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.cut.experts import keep_experts, moe_layers
from sparsebench.models import ModelSpec, find_blocks, load_model
from sparsebench.pipeline import prune_model

from .conftest import CONF, run_cli, run_reload

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))


def tiny(family: str):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"tiny-{family}.yaml"))["model"]
    return load_model(ModelSpec(**cfg), seed=0)[0]


def hand_saliency(model, layer: int) -> torch.Tensor:
    """mean over routed tokens of router weight x ||expert output||, from the block's own
    routing, computed here without the method's hooks (the dense model)."""
    _, experts, _ = moe_layers(find_blocks(model)[1][layer])[0]
    seen = []
    h = experts.register_forward_pre_hook(lambda m, a: seen.append([t.detach() for t in a]))
    with torch.no_grad():
        for w in CALIB:
            model(w[None])
    h.remove()
    s = torch.zeros(experts.num_experts, dtype=torch.float64)
    n = torch.zeros_like(s)
    for x, index, weight in seen:
        for e in range(experts.num_experts):
            ex = experts.get_submodule(str(e))
            token, slot = torch.where(index == e)
            y = ex.down_proj(experts.act_fn(ex.gate_proj(x[token])) * ex.up_proj(x[token]))
            s[e] += (weight[token, slot].double() * y.norm(dim=-1).double()).sum()
            n[e] += len(token)
    return s / n


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "olmoe"])
def test_reap_saliency_is_the_hand_computation(family):
    model = tiny(family)
    want = hand_saliency(copy.deepcopy(model), 0)
    out = prune_model(model, method="reap", sparsity=0.2, calib=CALIB, seqlen=64)
    got = out.method_report["scores"]["saliency"]["0"]
    assert got == pytest.approx(want.tolist(), abs=1e-6)
    kept = out.method_report["kept_experts"]["0"]
    assert set(range(4)) - set(kept) == {int(want.argmin())}


def test_a_silent_expert_is_removed_and_the_least_routed_one_by_frequency():
    model = tiny("mixtral")
    for block in find_blocks(model)[1]:
        _, experts, router = moe_layers(block)[0]
        with torch.no_grad():
            experts.get_submodule("2").down_proj.weight.zero_()  # output 0: saliency 0
    out = prune_model(copy.deepcopy(model), method="reap", sparsity=0.2, calib=CALIB, seqlen=64)
    assert all(k == [0, 1, 3] for k in out.method_report["kept_experts"].values())
    freq = prune_model(model, method="expert_frequency", sparsity=0.2, calib=CALIB, seqlen=64)
    counts = freq.method_report["scores"]["frequency"]["0"]
    assert sum(counts) == 2 * CALIB.numel()  # every token counted top-k times
    assert sorted(counts)[0] < sorted(counts)[1]  # one least-routed expert
    least = counts.index(min(counts))
    assert freq.method_report["kept_experts"]["0"] == [e for e in range(4) if e != least]


def test_the_cut_layer_computes_the_full_layer_where_routing_avoids_the_removed_expert():
    model = tiny("mixtral")
    moe, experts, router = moe_layers(find_blocks(model)[1][0])[0]
    x = torch.randn(1, 200, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = moe(x)
        top = torch.topk(router(x)[0], 2, dim=-1).indices  # the full router's top-2
    cut = copy.deepcopy(moe)
    _, cut_experts, cut_router = moe_layers(cut)[0]
    keep_experts(cut_experts, cut_router, [0, 1, 3])
    with torch.no_grad():
        after = cut(x)
    avoid = ~(top == 2).any(-1)  # tokens whose top-2 never had expert 2
    assert 0 < int(avoid.sum()) < 200
    # the same experts' products; only the renormalised top-2 weights are recomputed from a
    # softmax over 3 logits instead of 4 (a few float32 ulps of weights ~0.5: < 1e-6)
    assert torch.allclose(after[0, avoid], full[0, avoid], atol=1e-6)
    assert not torch.allclose(after[0, ~avoid], full[0, ~avoid], atol=1e-6)
    assert cut_router.weight.shape[0] == 3 and cut_experts.num_experts == 3


@pytest.mark.models  # every mixture of experts' export: make test-models
def test_reap_exports_a_plain_model_with_fewer_experts(tmp_path):
    from transformers import AutoModelForCausalLM

    args = ["model=tiny-mixtral", "logger=disabled", "method=reap", "sparsity=0.2"]
    res = run_cli(args + ["save.enabled=true"], tmp_path / "run")
    cut = res["sparsity"]["structure"]
    assert cut["experts_before"] == 4 and cut["experts_after"] == 3
    assert res["sparsity"]["actual_sparsity"] == cut["removed_share"] > 0.2
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert plain.config.num_local_experts == 3
    assert sum(p.numel() for p in plain.parameters()) == res["sparsity"]["nonzero_params"]
    again = run_reload(tmp_path / "run", tmp_path / "again")
    assert again["metrics"]["wikitext2"] == res["metrics"]["wikitext2"]
    from sparsebench.records.summary import run_summary

    assert "1 of 4 experts of each of 2 MoE layers" in run_summary(res, tmp_path)


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("tiny-llama", [], "has no mixture-of-experts layer"),
        ("tiny-mixtral", ["sparsity=0.8"], "the router's top-k"),
        ("tiny-mixtral", ["sparsity=0.05"], "removes 0 of the 4 experts"),
        ("tiny-mixtral", ["pattern=2:4"], "whole experts"),
    ],
)
def test_bad_expert_removal_is_refused_before_any_work(model, extra, message, tmp_path, capsys):
    from sparsebench import cli

    folder = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        cli.main(
            [f"model={model}", "logger=disabled", "method=reap", *extra, f"hydra.run.dir={folder}"]
        )
    assert err.value.code and message in capsys.readouterr().err
    assert not (folder / "results.json").exists()
