"""Structured compression, block removal (cut/, method=shortgpt|angular): the scores against a
hand computation and on blocks whose outputs are known (an identity block has Block
Influence 0 and angular distance 0, so it is the one removed), the cut model computes what
the full model computes with the removed blocks made identities (logits and greedy decoding,
every dense family and a mixture of experts with dense-MLP layers), the export loads with
plain transformers at the new depth and gives the run's perplexity, the counts and the
refusals before any work."""

import pytest
import torch
from omegaconf import OmegaConf

from sparsebench.cut import blocks_for_share, cosine, remove_blocks
from sparsebench.engine.driver import block_out
from sparsebench.errors import SparsebenchError
from sparsebench.models import ModelSpec, find_blocks, load_model
from sparsebench.pipeline import prune_model

from .conftest import CONF, TINY, run_cli, run_reload

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))


def tiny(family: str, layers: int = 4, **arch):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"tiny-{family}.yaml"))["model"]
    cfg["arch"].update(num_hidden_layers=layers, **arch)
    return load_model(ModelSpec(**cfg), seed=0)[0]


def make_identity(model, indices):
    """Blocks `indices` return their input unchanged (a forward hook): what the model computes
    with those blocks removed."""
    _, blocks = find_blocks(model)

    def identity(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    return [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in indices]


def test_block_counts_round_to_the_nearest_and_refuse_none_or_all():
    assert [blocks_for_share(s, 30) for s in (0.1, 0.2, 0.25, 0.3)] == [3, 6, 8, 9]
    assert blocks_for_share(0.5, 2) == 1 and blocks_for_share(0.0167, 30) == 1
    with pytest.raises(SparsebenchError, match="removes no decoder block of 30"):
        blocks_for_share(0.01, 30)
    with pytest.raises(SparsebenchError, match="removes all 2 decoder blocks"):
        blocks_for_share(0.9, 2)


def test_block_influence_is_the_hand_computed_cosine():
    """BI_i = 1 - mean over every token of cos(h_i, h_{i+1}), from output_hidden_states (the
    last block by a hook: transformers normalises the final hidden state)."""
    from sparsebench.pruners import PruneContext
    from sparsebench.pruners.shortgpt import block_influence
    from sparsebench.sparsity import Pattern, Schedule

    model = tiny("llama")
    _, blocks = find_blocks(model)
    last = []
    hook = blocks[-1].register_forward_hook(lambda m, a, o: last.append(block_out(o)))
    cos = [[] for _ in blocks]
    with torch.no_grad():
        for w in CALIB:
            hs = model(w[None], output_hidden_states=True).hidden_states
            states = [*hs[: len(blocks)], last[-1]]
            for i in range(len(blocks)):
                cos[i].append(torch.nn.functional.cosine_similarity(states[i], states[i + 1], -1))
    hook.remove()
    want = [1 - torch.cat(c, 1).double().mean().item() for c in cos]
    ctx = PruneContext(model, 0.25, Pattern(), Schedule(), torch.device("cpu"), CALIB)
    got = block_influence(ctx)
    assert got == pytest.approx(want, abs=1e-6) and min(got) > 1e-3


@pytest.mark.parametrize("method", ["shortgpt", "angular"])
def test_identity_blocks_score_zero_and_are_the_ones_removed(method):
    model = tiny("llama")
    hooks = make_identity(model, [1, 2])  # blocks 1 and 2 do nothing
    out = prune_model(model, method=method, sparsity=0.5, calib=CALIB, seqlen=64)
    for h in hooks:
        h.remove()
    report = out.method_report
    assert report["removed_blocks"] == [1, 2] and model.config.num_hidden_layers == 2
    if method == "shortgpt":
        bi = report["scores"]["block_influence"]
        assert bi[1] == bi[2] == 0 and min(bi[0], bi[3]) > 1e-3
    else:  # d(1, 2): the state entering block 1 against the one leaving block 2: the same
        d = report["scores"]["angular_distance"]
        assert report["scores"]["start"] == 1 and d[1] == 0 and min(d[0], d[2]) > 1e-4
    assert out.sparsity["actual_sparsity"] == 0.5 and out.sparsity["structure"]["blocks_after"] == 2


def test_angular_distance_of_known_states():
    from sparsebench.pruners.angular import angular_distances

    e = torch.eye(3, dtype=torch.float64)
    turn = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # 45 degrees from e0
    states = [e[:1], turn, -e[:1], -e[:1]]
    assert angular_distances(states, 1) == pytest.approx([0.25, 0.75, 0.0])
    assert angular_distances(states, 2) == pytest.approx([1.0, 0.75])
    assert float(cosine(e[:1], 2 * e[:1])) == 1


@pytest.mark.parametrize(
    "family, arch",
    [
        ("llama", {}),
        (
            "gemma3",
            {"layer_types": ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]},
        ),
        ("qwen3-moe", {"decoder_sparse_step": 2, "mlp_only_layers": [0]}),
        ("gpt2", {}),
        ("opt", {}),
    ],
)
def test_the_cut_model_computes_the_full_model_with_identity_blocks(family, arch):
    model = tiny(family, layers=5, **arch)
    types = list(getattr(model.config, "layer_types", None) or [])
    ids = CALIB[:2]
    removed = [1, 3]
    hooks = make_identity(model, removed)
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    for h in hooks:
        h.remove()
    remove_blocks(model, removed)
    assert model.config.num_hidden_layers == 3 and len(find_blocks(model)[1]) == 3
    if types:
        assert model.config.layer_types == [types[i] for i in (0, 2, 4)]
    if family == "qwen3-moe":  # layers 1 and 3 routed (step 2) and 0 dense: kept 0, 2, 4
        assert model.config.mlp_only_layers == [0, 1, 2] and model.config.decoder_sparse_step == 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model.generate(ids[:, :8], max_new_tokens=6, do_sample=False), want_gen)


@pytest.mark.models  # the CLI export of every family: make test-models
def test_the_export_is_a_smaller_model_plain_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    args = TINY + ["method=shortgpt", "sparsity=0.25", "model.arch.num_hidden_layers=4"]
    res = run_cli(args + ["save.enabled=true"], tmp_path / "run")
    cut = res["sparsity"]["structure"]
    assert res["status"] == "complete" and len(cut["removed_blocks"]) == 1
    assert res["sparsity"]["actual_sparsity"] == cut["removed_share"] == 0.25
    assert res["model"]["params"] - cut["block_params_removed"] == res["sparsity"]["nonzero_params"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert plain.config.num_hidden_layers == 3 and len(plain.model.layers) == 3
    assert sum(p.numel() for p in plain.parameters()) == res["sparsity"]["nonzero_params"]
    again = run_reload(tmp_path / "run", tmp_path / "reload")
    assert again["metrics"]["wikitext2"] == res["metrics"]["wikitext2"]
    assert again["sparsity"]["structure"]["removed_blocks"] == cut["removed_blocks"]
    from sparsebench.records.summary import run_summary

    text = run_summary(res, tmp_path)
    assert "1 of 4 decoder blocks" in text and "the kept model is dense" in text


@pytest.mark.parametrize(
    "method, recover", [("angular", "finetune_cpu"), ("flap", "perp_cpu")]
)  # fine-tuning every weight; PERP's MaskLoRA on every linear of the smaller model
def test_healing_after_the_cut_trains_the_smaller_model(method, recover, tmp_path):
    args = TINY + [f"method={method}", "sparsity=0.5", "model.arch.num_hidden_layers=4"]
    cut = run_cli(args, tmp_path / "cut")
    healed = run_cli(
        args + [f"recover={recover}", "recover.steps=4", "recover.seqlen=64"], tmp_path / "h"
    )
    assert healed["status"] == "complete" and "recover" in healed["timings_s"]
    assert healed["sparsity"]["structure"] == cut["sparsity"]["structure"]
    assert healed["metrics"]["wikitext2"] != cut["metrics"]["wikitext2"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["sparsity=0.1"], "removes no decoder block of 2"),
        (["sparsity=0.8"], "removes all 2 decoder blocks"),
        (["pattern=2:4"], "removes whole decoder blocks"),
        (["schedule=owl"], "removes whole decoder blocks"),
        (["recover=reconstruct"], "matches each pruned block to its dense twin"),
        (["refine=dsnot"], "no block-by-block masks"),
    ],
)
def test_bad_block_removal_is_refused_before_any_work(extra, message, tmp_path, capsys):
    from sparsebench import cli

    with pytest.raises(SystemExit) as err:
        cli.main(TINY + ["method=shortgpt", *extra, f"hydra.run.dir={tmp_path / 'run'}"])
    assert err.value.code and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


def test_the_dry_run_says_what_the_cut_removes(capsys):
    from sparsebench import cli

    cli.main(["model=llama2-7b", "method=shortgpt", "sparsity=0.25", "dry_run=true"])
    out = capsys.readouterr().out
    assert "shortgpt removes 8 of 32 decoder blocks" in out
    blocks = 202_383_360 * 8  # Llama-2-7B's block: 4 x 4096^2 + 3 x 4096 x 11008 + 2 norms
    assert f"about {blocks:,} weights" in out
    assert "structured cuts: blocks (shortgpt, angular), widths (flap)" in out  # the model map


def test_speed_and_size_compare_the_smaller_model_with_the_one_before_the_cut(tmp_path):
    """eval.speed times the model before the cut (loaded again) and the smaller one, both
    dense, side by side; size says both; the report draws perplexity against the speed-up."""
    args = TINY + ["method=shortgpt", "sparsity=0.5", "eval.speed.enabled=true"]
    res = run_cli(args + ["eval.speed.batch_sizes=[1]"], tmp_path / "cut")
    speed, size = res["speed"], res["size"]
    assert set(speed) >= {"dense", "cut", "speedup"} and "sparse" not in speed
    assert speed["dense"]["bytes_per_token"] > speed["cut"]["bytes_per_token"]
    removed = res["sparsity"]["structure"]["block_params_removed"]
    assert size["model_before_cut"] - size["model_dense"] == removed * 4  # float32
    assert speed["speedup"]["floor"] == round(size["model_before_cut"] / size["model_dense"], 3)
    from sparsebench.records.report import write_report

    paths = write_report(tmp_path)
    assert paths["plot_tradeoff"].is_file()
