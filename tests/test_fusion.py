"""Linears that read one input multiplied as one matrix (evaluation/fusion.py): the groups are
found in every family from the tensors a forward hands them, each member gets exactly its own
product (the compiled kernels' bits), an input changed since the group's product is multiplied
afresh, and the speed measurement fuses both sides and counts every linear's call."""

import pytest
import torch

from sparsebench.evaluation import fusion
from sparsebench.evaluation.kernels import sparse_form
from sparsebench.evaluation.speed import SpeedSpec, measure
from sparsebench.models import load_model, prunable_linears
from sparsebench.pipeline import prune_model

from .conftest import tiny_spec
from .numerics import gamma

FAST = SpeedSpec(enabled=True, batch_sizes=(1, 2), decode_tokens=2, repeats=1, warmup=0)


def groups_of(family: str):
    model, _ = load_model(tiny_spec(family), seed=0)
    names = list(prunable_linears(model))
    ids = torch.randint(model.config.vocab_size, (1, 2), generator=torch.Generator().manual_seed(0))
    return model, names, fusion.shared_inputs(model, names, ids)


@pytest.mark.parametrize(
    "family, kinds",
    [
        ("llama", {"q_proj+k_proj+v_proj", "gate_proj+up_proj"}),
        ("gemma3", {"q_proj+k_proj+v_proj", "gate_proj+up_proj"}),
        ("phi3", {"q+k+v", "gate+up"}),  # its fused projections, split for pruning
        ("opt", {"q_proj+k_proj+v_proj"}),
        ("gpt2", {"q+k+v"}),
        ("gpt-neox", {"q+k+v"}),
        ("falcon", {"q+k+v"}),
    ],
)
def test_the_linears_handed_one_input_form_the_groups(family, kinds):
    model, names, groups = groups_of(family)
    blocks = model.config.num_hidden_layers
    assert fusion.summary(groups) == {k: blocks for k in kinds}
    for g in groups:  # members of one block's one module, and never the output projections
        parents = {n.rpartition(".")[0] for n in g}
        assert len(parents) == 1 and not any(n.endswith(("o_proj", "down_proj")) for n in g)


def test_each_routed_expert_fuses_its_own_gate_and_up():
    _, names, groups = groups_of("mixtral")
    experts = [g for g in groups if "experts" in g[0]]
    assert experts and all(
        [n.rpartition(".")[2] for n in g] == ["gate_proj", "up_proj"]
        and g[0].rpartition(".")[0] == g[1].rpartition(".")[0]
        for g in experts
    )


def _pruned(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < 0.6] = 0
    w[1] = 0  # a row with nothing kept
    return w


@pytest.mark.parametrize("kernel", ["bitmask", "gather"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_a_member_gets_the_bits_of_its_own_product(kernel, tokens):
    """The compiled kernels sum each row alone, so a row's bits do not depend on the matrix it
    is stacked in: each member's columns of the group's product are its own product's bits."""
    shapes = {"a.q": 40, "a.k": 8, "a.v": 24}
    linears = {}
    for i, (name, rows) in enumerate(shapes.items()):
        lin = torch.nn.Linear(72, rows, bias=False)
        lin.weight.data = _pruned(rows, 72, i)
        linears[name] = lin
    groups = [list(shapes)]
    units = fusion.units(linears, groups)
    forms = {u: sparse_form(lin.weight, kernel) for u, lin in units.items()}
    placed = fusion.members(groups, linears, forms)
    x = torch.randn(tokens, 72, generator=torch.Generator().manual_seed(9))
    for name, lin in linears.items():
        got = placed[name](x)
        assert got.is_contiguous() and torch.equal(got, sparse_form(lin.weight, kernel)(x))
    assert [m.calls for m in placed.values()] == [1, 1, 1]


def test_an_input_changed_since_the_groups_product_is_multiplied_afresh():
    linears = {n: torch.nn.Linear(16, r) for n, r in (("b.gate", 12), ("b.up", 20))}
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            calls.append(1)
            return self.lin(x)

    groups = [["b.gate", "b.up"]]
    units = {u: Counting(lin) for u, lin in fusion.units(linears, groups).items()}
    placed = fusion.members(groups, linears, units)
    gate, up = placed["b.gate"], placed["b.up"]
    x = torch.randn(2, 5, 16)
    bound = lambda lin, x: 2 * gamma(17) * (x.abs() @ lin.weight.abs().t() + lin.bias.abs())  # noqa: E731
    gate(x), up(x)
    assert len(calls) == 1  # one product for both members
    x.mul_(3)  # the same tensor, modified in place: the kept product is stale
    for member, lin in ((up, linears["b.up"]), (gate, linears["b.gate"])):
        got = member(x)
        assert got.is_contiguous() and bool(((got - lin(x)).abs() <= bound(lin, x)).all())
    assert len(calls) == 2
    gate(x.clone())  # equal values, another tensor: multiplied again
    assert len(calls) == 3


@pytest.mark.parametrize("fuse", [True, False])
def test_the_measurement_fuses_both_sides_and_counts_every_linear(fuse):
    model, _ = load_model(tiny_spec("llama"), seed=0)
    prune_model(model, method="magnitude", sparsity=0.7, seqlen=64)
    names = list(prunable_linears(model))
    before = dict(model.named_modules())
    out = measure(model, names, 32, torch.device("cpu"), "unstructured",
                  SpeedSpec(**{**FAST.__dict__, "fuse": fuse}))  # fmt: skip
    blocks = model.config.num_hidden_layers
    units = 4 * blocks if fuse else len(names)  # q/k/v, o, gate/up, down
    kinds = {"q_proj+k_proj+v_proj": blocks, "gate_proj+up_proj": blocks} if fuse else {}
    assert out["fused"] == kinds
    timed = [k for k in out["kernels_one_token"] if k.startswith("dense")]
    assert timed == ["dense_ms", "dense_gbs", "dense_over_floor"]
    calls, kernel_calls = out["sparse"]["sparse_calls"], out["sparse"]["kernel_calls"]
    # every pruned linear ran sparse in every forward; a group's kernel once for its members
    assert calls > 0 and calls % len(names) == 0
    assert kernel_calls == calls // len(names) * units
    assert out["sparse"]["logits_max_abs_diff"] <= 1e-5 * max(1.0, out["sparse"]["logits_max_abs"])
    assert dict(model.named_modules()).keys() == before.keys()  # the model's own modules back
    assert all(model.get_submodule(n) is before[n] for n in names)
