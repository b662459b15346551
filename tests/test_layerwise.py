"""The sequential driver: captured inputs and kwargs reproduce the model, block by block."""

import torch

from sparsebench.engine.driver import SharedInputs, block_out, capture
from sparsebench.models import find_blocks, find_linears, prunable_linears
from sparsebench.pruners import PruneContext
from sparsebench.pruners.sparsegpt import SparseGPT
from sparsebench.pruners.wanda import Wanda
from sparsebench.sparsity import Pattern, Schedule, expected_pruned


def test_capture_replays_every_block(tiny_model):
    """For Llama and Gemma-3 (per-layer masks and rotary tables) the captured kwargs
    make the blocks, run one by one, reproduce the model's hidden states."""
    model, _ = tiny_model
    calib = torch.randint(0, 256, (3, 64))
    with torch.no_grad():
        ref = model(calib, output_hidden_states=True, use_cache=False).hidden_states
    inps, block_args = capture(model, calib, torch.device("cpu"))
    torch.testing.assert_close(inps, ref[0])
    _, blocks = find_blocks(model)
    h = inps
    with torch.no_grad():
        for i, block in enumerate(blocks):
            args, kwargs = block_args[i]
            h = torch.cat([block_out(block(h[j : j + 1], *args, **kwargs)) for j in range(3)])
            if i < len(blocks) - 1:  # the last hidden state is after the final norm
                torch.testing.assert_close(h, ref[i + 1])
    # capture leaves the model as it was
    assert not any("forward" in vars(b) for b in blocks)


def test_gemma_blocks_get_their_own_masks():
    from sparsebench.models import load_model

    from .conftest import tiny_spec

    model, _ = load_model(tiny_spec("gemma3"))
    _, block_args = capture(model, torch.randint(0, 256, (1, 64)), torch.device("cpu"))
    (k0, k1) = (block_args[i][1] for i in range(2))
    # layer 0 slides over 16 tokens (an explicit mask), layer 1 is plainly causal
    assert k0["attention_mask"] is not None
    assert k1["attention_mask"] is None or not torch.equal(
        k0["attention_mask"], k1["attention_mask"]
    )
    assert not torch.equal(
        k0["position_embeddings"][0], k1["position_embeddings"][0]
    )  # local vs global RoPE


def test_shared_input_groups(tiny_model):
    model, _ = tiny_model
    _, blocks = find_blocks(model)
    linears = find_linears(blocks[0])
    inps, block_args = capture(model, torch.randint(0, 256, (1, 64)), torch.device("cpu"))
    args, kwargs = block_args[0]
    sharing = SharedInputs()
    hooks = [
        lin.register_forward_hook(lambda m, a, o, n=name: (sharing.observe(n, a[0]), None)[1])
        for name, lin in linears.items()
    ]
    with torch.no_grad():
        for _ in range(2):  # the second call keeps the first call's answer
            blocks[0](inps, *args, **kwargs)
    for h in hooks:
        h.remove()
    groups = sharing.leader
    assert set(groups) == set(linears)
    by_leader = {}
    for name, leader in groups.items():
        by_leader.setdefault(leader, set()).add(name.split(".")[-1])
    assert sorted(map(sorted, by_leader.values())) == sorted(
        [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    )


def test_wanda_block0_uses_dense_inputs(tiny_model):
    """Block 0's statistics come from the dense model's inputs to its linears."""
    model, _ = tiny_model
    calib = torch.randint(0, 256, (4, 64))
    _, blocks = find_blocks(model)
    q = blocks[0].self_attn.q_proj
    seen = []
    h = q.register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        model(calib, use_cache=False)
    h.remove()
    norms = torch.cat(seen).norm(dim=0)
    w0 = q.weight.detach().clone()
    masks = Wanda().prune(
        PruneContext(model, 0.5, Pattern(), Schedule(), torch.device("cpu"), calib)
    )
    score = w0.abs() * norms
    keep = masks[[n for n in masks if n.endswith("0.self_attn.q_proj")][0]]
    assert (
        torch.where(keep, score, torch.inf).amin(1) >= torch.where(~keep, score, -torch.inf).amax(1)
    ).all()


def test_sparsegpt_model_2of4(tiny_model):
    model, _ = tiny_model
    calib = torch.randint(0, 256, (4, 64))
    masks = SparseGPT().prune(
        PruneContext(model, 0.5, Pattern(2, 4), Schedule(), torch.device("cpu"), calib)
    )
    for name, lin in prunable_linears(model).items():
        keep = masks[name]
        assert (keep.view(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert (lin.weight[~keep] == 0).all()
        assert int((~keep).sum()) == expected_pruned(
            tuple(keep.shape), 0.5, Pattern(2, 4), "tensor"
        )


def _reference_loop():
    """scripts/bench_reference.py: the official per-layer loop, re-implemented."""
    import importlib.util
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_reference", scripts / "bench_reference.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(scripts))
    return mod


def test_driver_matches_the_official_loop(tiny_model):
    """Shared statistics (4 per Llama block instead of 7) change nothing: Wanda and
    SparseGPT (official count) give the official loop's masks and weights. SparseGPT with
    count=exact prunes one weight fewer per 128-column block: in block 0 (same inputs)
    its cut is the official one minus that weight."""
    from sparsebench.sparsity import parse_pattern

    ref = _reference_loop()
    model, _ = tiny_model
    calib = torch.randint(0, 256, (4, 64))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [("wanda", Wanda()), ("sparsegpt", SparseGPT()), ("sparsegpt", SparseGPT(count="exact"))]
    for method, pruner in runs:
        for pattern, sparsity in (
            (parse_pattern("unstructured"), 0.5),
            (parse_pattern("2:4"), 0.5),
        ):
            model.load_state_dict(dense)
            ref.reference_prune(model, calib, method, sparsity, pattern, torch.device("cpu"))
            official = {
                n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()
            }
            model.load_state_dict(dense)
            pruner.prune(
                PruneContext(model, sparsity, pattern, Schedule(), torch.device("cpu"), calib)
            )
            exact = getattr(pruner, "count", "") == "exact" and not pattern.is_nm
            for n, lin in prunable_linears(model).items():
                ours, theirs = lin.weight == 0, official[n] == 0
                if not exact:
                    assert torch.equal(ours, theirs), (method, pattern, n)
                    assert torch.equal(lin.weight, official[n]), (
                        method,
                        pattern,
                        n,
                    )  # the same operations
                else:
                    assert (ours == theirs).float().mean() > 0.99, n
                    if ".0." in n:
                        assert not (ours & ~theirs).any(), n
                        assert int((theirs & ~ours).sum()) == -(-lin.weight.shape[1] // 128), n


class _CountingWanda(Wanda):
    """Wanda that reports how many forward calls each shared statistic averaged."""

    def __init__(self):
        super().__init__()
        self.counts: list[int] = []

    def prepare(self, stats):
        self.counts.append(stats.nsamples)
        return super().prepare(stats)


def test_statistics_pass_stops_at_the_last_input(tiny_model):
    """After window 0 each window stops once every linear has its input: the last linear
    (down_proj) runs its product once, yet every statistic still averages all windows."""
    model, _ = tiny_model
    n = 5
    inps, block_args = capture(model, torch.randint(0, 256, (n, 64)), torch.device("cpu"))
    _, blocks = find_blocks(model)
    block = blocks[0]
    args, kwargs = block_args[0]
    runs = {name: 0 for name in find_linears(block)}
    hooks = [
        lin.register_forward_hook(lambda m, a, o, k=name: runs.__setitem__(k, runs[k] + 1))
        for name, lin in find_linears(block).items()
    ]
    pruner = _CountingWanda()
    pruner.prune_block(block, inps, args, kwargs, 0.5, Pattern())
    for h in hooks:
        h.remove()
    assert runs.pop("mlp.down_proj") == 1
    assert set(runs.values()) == {n}
    assert pruner.counts == [n] * 4  # q/k/v, o, gate/up, down


class _Twice(torch.nn.Module):
    """A block that runs one linear twice: its windows may not be cut short."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


def test_statistics_pass_runs_whole_blocks_that_repeat_a_linear():
    torch.manual_seed(0)
    block, inps, n = _Twice(), torch.randn(3, 1, 4, 8), 3
    runs = []
    h = block.b.register_forward_hook(lambda m, a, o: runs.append(1))
    pruner = _CountingWanda()
    pruner.prune_block(block, inps, (), {}, 0.5, Pattern())
    h.remove()
    assert len(runs) == n
    assert pruner.counts == [2 * n, n]  # a's statistic saw both calls of every window


def test_windows_come_one_by_one_in_order_and_host_inputs_keep_the_masks(tmp_path):
    from sparsebench.engine.driver import Windows
    from sparsebench.run import run

    from .conftest import compose

    x = torch.arange(24.0).view(4, 2, 3)
    got = list(Windows(x, torch.device("cpu")))
    assert len(got) == 4 and all(torch.equal(w, x[j : j + 1]) for j, w in enumerate(got))
    base = ["model=tiny-llama", "logger=disabled", "method=sparsegpt", "save.enabled=true"]
    a = run(compose(base + ["calib_inputs=device"]), tmp_path / "a")
    b = run(
        compose(base + ["calib_inputs=host"]), tmp_path / "b"
    )  # on the CPU the host is the device
    assert a["plan"]["calib_inputs"] == "device" and b["plan"]["calib_inputs"] == "host"
    assert a["metrics"] == b["metrics"]


def _prune_copy(model, pruner, calib, batch):
    import copy

    m = copy.deepcopy(model)
    masks = pruner.prune(
        PruneContext(m, 0.6, Pattern(), Schedule(), torch.device("cpu"), calib, calib_batch=batch)
    )
    return masks, m.state_dict()


def test_batched_windows_and_prefetched_blocks_keep_masks_and_weights(tiny_model, monkeypatch):
    """calib_batch=B adds the statistics window by window, so on the CPU (whose products
    are row-independent) masks and pruned weights are bitwise those of one window per
    forward, also when B does not divide the windows; the worker-thread block loader gives
    the same result as the plain one."""
    import functools

    from sparsebench.engine import driver

    model, _ = tiny_model
    calib = torch.randint(0, 256, (7, 64))
    for pruner in (Wanda(), SparseGPT()):
        ref_masks, ref_state = _prune_copy(model, pruner, calib, 1)
        variants = [_prune_copy(model, pruner, calib, b) for b in (3, 7)]
        with monkeypatch.context() as mp:
            mp.setattr(driver, "Blocks", functools.partial(driver.Blocks, prefetch=True))
            variants.append(_prune_copy(model, pruner, calib, 2))
        for masks, state in variants:
            assert masks.keys() == ref_masks.keys()
            assert all(torch.equal(masks[k], ref_masks[k]) for k in masks)
            assert all(torch.equal(state[k], ref_state[k]) for k in state)


def test_blocks_visits_every_block_once_in_order_and_puts_it_back(tiny_model):
    from sparsebench.engine.driver import Blocks

    model, _ = tiny_model
    _, blocks = find_blocks(model)
    for prefetch in (False, True):
        seen = [(i, b) for i, b in Blocks(blocks, torch.device("cpu"), prefetch=prefetch)]
        assert [i for i, _ in seen] == list(range(len(blocks)))
        assert all(b is blocks[i] for i, b in seen)
        assert all(next(b.parameters()).device.type == "cpu" for b in blocks)


class _Flat(torch.nn.Module):
    """A block that flattens the windows into one token list before a linear (as a mixture
    of experts routes tokens): its statistics cannot be split per window."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x.reshape(-1, x.shape[-1])).view_as(x)


def test_batched_windows_refuse_a_block_that_mixes_windows():
    import pytest

    from sparsebench.errors import SparsebenchError

    inps = torch.randn(4, 5, 8)  # four windows of five tokens
    Wanda().prune_block(_Flat(), inps, (), {}, 0.5, Pattern(), batch=1)  # one window: fine
    with pytest.raises(SparsebenchError, match=r"calib_batch=2.*'a'.*\(10, 8\).*use calib_batch=1"):
        Wanda().prune_block(_Flat(), inps, (), {}, 0.5, Pattern(), batch=2)
