"""Every family of the model map (sparsebench/families.py, docs/models.md) on its tiny random
config: pruned with exact counts per matrix (each expert's too), fused projections pruned as
their parts with the same masks as a split model of the same weights, exports in the
family's own layout, and the rule for an expert that no calibration token reaches.
The full matrix of methods x families runs under `make test-models` (tests/test_models_matrix.py).
"""

import glob
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.families import (
    LinearExperts,
    SplitLinear,
    adapt,
    grouped_qkv,
    neox_qkv,
    original_state_dict,
)
from sparsebench.models import (
    ModelSpec,
    check_block_coverage,
    is_expert,
    load_model,
    prunable_linears,
)
from sparsebench.pipeline import prune_model
from sparsebench.registry import METHODS
from sparsebench.sparsity import Pattern, expected_pruned, pruned_bounds

from .conftest import CONF
from .numerics import gamma

FAMILIES = sorted(
    Path(p).stem.removeprefix("tiny-") for p in glob.glob(str(CONF / "model" / "tiny-*.yaml"))
)
MOE = ["mixtral", "olmoe", "qwen3-moe"]
FUSED = ["falcon", "gpt-neox", "gpt2", "phi3"]


def tiny(family: str):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"tiny-{family}.yaml"))["model"]
    return load_model(ModelSpec(**cfg), seed=0)


def test_the_map_covers_every_family_the_docs_name():
    assert len(FAMILIES) == 14 and set(MOE + FUSED) <= set(FAMILIES)
    docs = (CONF.parent / "docs" / "models.md").read_text()
    assert all(f"`tiny-{f}`" in docs for f in FAMILIES)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_every_matrix_to_its_count(family, method):
    model, tok = tiny(family)
    check_block_coverage(model)  # every block weight pruned or kept on purpose
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    out = prune_model(model, tok, method=method, sparsity=0.5, calib=calib, seqlen=64)
    linears = prunable_linears(model)
    assert set(out.masks) == set(linears)
    group = METHODS.build(method, {}).group
    for name, lin in linears.items():
        keep = out.masks[name]
        assert bool((lin.weight[~keep] == 0).all()), name  # hard zeros
        low, high = pruned_bounds(tuple(lin.weight.shape), 0.5, Pattern(), group)
        if method != "sparsegpt":  # the promised count, exactly
            assert low == high == expected_pruned(tuple(lin.weight.shape), 0.5, Pattern(), group)
        # SparseGPT's official rule: k per column block, plus score ties at its threshold
        assert low <= int((~keep).sum()) <= high, name
    if family in MOE:  # each expert's gate, up and down is a matrix of its own
        experts = {n.rsplit(".", 1)[0] for n in linears if is_expert(n)}
        assert len(experts) == 2 * 4 and all(
            f"{e}.{p}" in linears for e in experts for p in ("gate_proj", "up_proj", "down_proj")
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapted_model_computes_what_the_family_computes(family):
    """The adapters only rearrange weights: the state dict goes back to the family's layout bit
    for bit, and every replaced projection's output equals the original's within the float32
    bound of a dot product of its width (another GEMM may add in another order)."""
    import transformers

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"tiny-{family}.yaml"))["model"][
        "arch"
    ]
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = {k: v.clone() for k, v in original.state_dict().items()}
    projections = {}  # every Linear / Conv1D: its (out, in) weight, bias and output on random input
    for name, module in original.named_modules():
        kind = type(module).__name__
        if kind in ("Linear", "FalconLinear", "Conv1D") and "lm_head" not in name:
            w = module.weight.detach() if kind != "Conv1D" else module.weight.detach().t()
            x = torch.randn(3, 5, w.shape[1])
            projections[name] = (x, w, module.bias, module(x).detach())
    adapted = adapt(original)
    back = original_state_dict(adapted)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    after = dict(adapted.named_modules())
    for name, (x, w, bias, y) in projections.items():
        bound = (
            2
            * gamma(w.shape[1])
            * (x.abs() @ w.abs().t() + (0 if bias is None else bias.detach().abs()))
        )
        assert bool(((after[name](x) - y).abs() <= bound).all()), name
    replaced = [n for n, m in after.items() if isinstance(m, (SplitLinear, LinearExperts))]
    assert bool(replaced) == (family in FUSED + MOE), replaced


def test_the_fused_layouts_pick_each_part_s_rows():
    """NeoX interleaves per head: rows [q0 k0 v0 q1 k1 v1 ...] of head_dim each; Falcon's new
    architecture groups per key-value head: [q q k v] for two query heads per group."""
    parts = neox_qkv(heads=2, head_dim=2)
    assert parts["q"].tolist() == [0, 1, 6, 7] and parts["k"].tolist() == [2, 3, 8, 9]
    assert parts["v"].tolist() == [4, 5, 10, 11]
    g = grouped_qkv(heads=4, kv_heads=2, head_dim=1)
    assert (
        g["q"].tolist() == [0, 1, 4, 5] and g["k"].tolist() == [2, 6] and g["v"].tolist() == [3, 7]
    )
    w = torch.arange(12.0)[:, None].repeat(1, 3)
    split = SplitLinear(w, None, parts)
    assert torch.equal(split.q.weight[:, 0], torch.tensor([0.0, 1, 6, 7]))
    assert torch.equal(split(torch.ones(1, 3)), (w @ torch.ones(3, 1)).t())  # the fused order back
    assert torch.equal(split.fused()[0], w)


def test_a_fused_model_and_a_split_model_of_the_same_weights_get_the_same_masks():
    """Phi-3 fuses q/k/v and gate/up; a Llama of the same shapes holds them apart. With the same
    weights every method gives the same masks: the fused matrices are pruned as their parts
    (a per-tensor threshold never mixes q with v)."""
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    phi = adapt(
        transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model("phi3", **common)
        ).eval()
    )
    llama = adapt(
        transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model("llama", **common)
        ).eval()
    )
    names = {
        "self_attn.qkv_proj.q": "self_attn.q_proj",
        "self_attn.qkv_proj.k": "self_attn.k_proj",
        "self_attn.qkv_proj.v": "self_attn.v_proj",
        "self_attn.o_proj": "self_attn.o_proj",
        "mlp.gate_up_proj.gate": "mlp.gate_proj",
        "mlp.gate_up_proj.up": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj",
    }
    with torch.no_grad():
        target = llama.state_dict()
        for key, value in phi.state_dict().items():
            mapped = key
            for a, b in names.items():
                mapped = mapped.replace(f".{a}.", f".{b}.")
            target[mapped].copy_(value)
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    phi_state, llama_state = (
        {k: v.clone() for k, v in m.state_dict().items()} for m in (phi, llama)
    )
    for method in ("magnitude", "wanda", "sparsegpt"):
        phi.load_state_dict(phi_state)
        llama.load_state_dict(llama_state)
        a = prune_model(phi, method=method, sparsity=0.5, calib=calib, seqlen=64).masks
        b = prune_model(llama, method=method, sparsity=0.5, calib=calib, seqlen=64).masks
        for name, keep in a.items():
            other = name
            for x, y in names.items():
                other = other.replace(x, y)
            assert torch.equal(keep, b[other]), (method, name)


def test_an_expert_that_no_calibration_token_reaches_is_pruned_by_magnitude_and_counted(
    monkeypatch,
):
    """The documented rule: an expert without routed tokens has no statistic; Wanda prunes it
    by |W| in its own comparison group (per row) and results report it."""
    from sparsebench.sparsity import project

    model, tok = tiny("mixtral")
    for layer in model.model.layers:  # route every token to experts 0 and 1 only
        router = layer.mlp.gate

        def route(hidden, router=router):
            logits = torch.nn.functional.linear(hidden, router.weight)
            weights = torch.full((hidden.shape[0], 2), 0.5, dtype=hidden.dtype)
            index = torch.tensor([[0, 1]]).expand(hidden.shape[0], 2)
            return logits, weights, index

        monkeypatch.setattr(router, "forward", route)
    weights = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}
    out = prune_model(
        model, tok, method="wanda", sparsity=0.5, calib=torch.randint(0, 256, (2, 64)), seqlen=64
    )
    moe = out.method_report["moe"]
    idle = [
        f"model.layers.{i}.mlp.experts.{e}.{p}"
        for i in (0, 1)
        for e in (2, 3)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert sorted(moe["magnitude_fallback"]) == sorted(idle)
    assert moe["routed_tokens"]["model.layers.0.mlp.experts.0"] == 2 * 64
    assert moe["routed_tokens"]["model.layers.0.mlp.experts.3"] == 0
    for name in idle:
        assert torch.equal(out.masks[name], project(weights[name].abs(), 0.5, Pattern(), "row"))


def test_moe_routed_token_counts_sum_to_tokens_times_experts_per_token():
    for family in MOE:
        model, tok = tiny(family)
        out = prune_model(
            model,
            tok,
            method="wanda",
            sparsity=0.5,
            calib=torch.randint(0, 256, (3, 64)),
            seqlen=64,
        )
        counts = out.method_report["moe"]["routed_tokens"]
        assert len(counts) == 2 * 4
        for block in (0, 1):
            total = sum(v for k, v in counts.items() if k.split(".")[2] == str(block))
            assert total == 3 * 64 * model.config.num_experts_per_tok, family


def test_linear_experts_keep_transformers_routing():
    """LinearExperts runs each expert on its routed tokens with the router's weights: the same
    sum as the fused loop, up to the rounding of two GEMMs against one."""
    model, _ = tiny("mixtral")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LinearExperts) and experts.num_experts == 4
    h = torch.randn(6, 64)
    index = torch.tensor([[0, 1], [2, 3], [0, 3], [1, 2], [3, 0], [2, 1]])
    w = torch.rand(6, 2)
    gate_up, down = experts.fused()
    want = torch.zeros_like(h)
    for t in range(6):
        for j in range(2):
            e = int(index[t, j])
            g, u = (h[t] @ gate_up[e].t()).chunk(2)
            want[t] += w[t, j] * (torch.nn.functional.silu(g) * u) @ down[e].t()
    assert torch.allclose(experts(h, index, w), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,published",
    [
        ("llama3.1-8b", 8.03),
        ("llama3.1-70b", 70.6),
        ("qwen3-8b", 8.19),
        ("qwen3-30b-a3b", 30.5),
        ("mixtral-8x7b", 46.7),
    ],
)
def test_full_size_configs_have_the_published_parameter_count(name, published):
    """The arch values of each new full-size file give its published total within 0.5% (the
    published totals are rounded), on the meta device: no weights, no download."""
    from sparsebench.models import meta_model

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))["model"]
    meta = meta_model(ModelSpec(**{**cfg, "source": "random"}))
    params = sum(p.numel() for p in meta.parameters()) / 1e9
    assert abs(params - published) / published < 0.005, params
