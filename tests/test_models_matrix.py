"""The whole family x method matrix from the command line (`make test-models`, minutes): every
tiny-<family> config with every one-shot method (Wanda and magnitude refined by DSnoT, Wanda++
with one short round of regional optimization, GPTQ and round to nearest after pruning), Elsa (two
steps), SAFE (one epoch), masked fine-tuning and OWL, each run verified (exact counts per
matrix, hard zeros), and a saved export of each family reloaded to the same perplexity with
its masks verified again; block removal (ShortGPT, angular) exported as a one-layer model
that plain transformers loads; Elsa on a mixture of experts also on FSDP2 (offload=true: a
process group of one)."""

import json

import pytest

from sparsebench import cli

from .test_models import FAMILIES, MOE

pytestmark = pytest.mark.models

RUNS = {
    "magnitude": ["method=magnitude"],
    "wanda": ["method=wanda"],
    "sparsegpt": ["method=sparsegpt"],
    "alps": ["method=alps"],
    "ladmm": ["method=ladmm"],
    "ria": ["method=ria"],
    "wanda+dsnot": ["method=wanda", "refine=dsnot", "refine.skip=none"],
    "magnitude+dsnot": ["method=magnitude", "refine=dsnot", "refine.skip=none"],
    "wanda_pp": ["method=wanda_pp", "method.ro_iters=1", "method.ro_samples=2"],
    "sparsegpt+gptq": ["method=sparsegpt", "quant=gptq", "quant.bits=3"],
    "wanda+rtn": ["method=wanda", "quant=rtn"],
    "elsa": ["method=elsa", "method.steps=2"],
    "safe": ["method=safe", "method.epochs=1"],
    "finetune": ["method=wanda", "recover=finetune", "recover.steps=2"],
    "owl": ["method=wanda", "schedule=owl", "sparsity=0.7"],
}


def _run(argv) -> dict:
    try:
        cli.main(argv)
    except SystemExit as err:
        assert not err.code, argv
    folder = next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir="))
    res = json.loads((__import__("pathlib").Path(folder) / "results.json").read_text())
    assert res["status"] == "complete", res.get("error")
    return res


def _reload(tmp_path) -> dict:
    """The export in <tmp_path>/run/model evaluated again by the command (method=dense)."""
    model = f"model.path={tmp_path / 'run' / 'model'}"
    return _run(
        [
            "model=local",
            model,
            "method=dense",
            "logger=disabled",
            f"hydra.run.dir={tmp_path / 'again'}",
        ]
    )


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_every_method_from_the_cli(family, run, tmp_path):
    res = _run([f"model=tiny-{family}", "logger=disabled", *RUNS[run], f"hydra.run.dir={tmp_path}"])
    sp = res["sparsity"]
    if run not in ("owl", "sparsegpt", "ria", "sparsegpt+gptq"):  # official counts: a weight more
        assert sp["actual_sparsity"] == 0.5  # every matrix at its count (the verifier checked each)
    assert sp["prunable_params"] == res["plan"]["model_map"]["prunable_params"]
    walks = ("wanda", "sparsegpt", "alps", "ladmm", "ria", "wanda+dsnot", "wanda_pp")
    if family in MOE and run in walks:
        routed = res["method_report"]["moe"]["routed_tokens"]
        assert (
            sum(routed.values())
            == 2 * 8 * 64 * res["config"]["model"]["arch"]["num_experts_per_tok"]
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_saves_and_reloads(family, tmp_path):
    saved = _run(
        [
            f"model=tiny-{family}",
            "logger=disabled",
            "method=sparsegpt",
            "save.enabled=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    again = _reload(tmp_path)
    assert again["metrics"]["wikitext2"] == saved["metrics"]["wikitext2"]
    assert again["sparsity"]["pruned_params"] == saved["sparsity"]["pruned_params"]


@pytest.mark.parametrize("family", MOE)
def test_elsa_trains_experts_on_fsdp2(family, tmp_path):
    res = _run(
        [
            f"model=tiny-{family}",
            "logger=disabled",
            "method=elsa",
            "method.steps=2",
            "offload=true",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert res["engine"] == "fsdp" and res["sparsity"]["actual_sparsity"] == 0.5


@pytest.mark.parametrize("method", ["shortgpt", "angular"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_removes_blocks_into_a_smaller_export(family, method, tmp_path):
    """Block removal on every family: one of the two blocks goes, the export's config says one
    layer, plain transformers loads it, and sparsebench reloads it to the same perplexity."""
    from transformers import AutoModelForCausalLM

    cut = _run(
        [
            f"model=tiny-{family}",
            "logger=disabled",
            f"method={method}",
            "save.enabled=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert cut["sparsity"]["actual_sparsity"] == 0.5
    assert cut["sparsity"]["structure"]["blocks_after"] == 1
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert plain.config.num_hidden_layers == 1
    assert sum(p.numel() for p in plain.parameters()) == cut["sparsity"]["nonzero_params"]
    again = _reload(tmp_path)
    assert again["metrics"]["wikitext2"] == cut["metrics"]["wikitext2"]


NARROWS = ["gemma2", "gemma3", "llama", "mistral", "opt", "qwen2", "qwen3"]  # separate q/k/v/o


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_narrowed_by_flap_or_refused(family, tmp_path, capsys):
    """FLAP on every family with separate projections and a dense MLP, reloaded to the same
    perplexity; the fused and mixture-of-experts families refused before any work."""
    argv = [f"model=tiny-{family}", "logger=disabled", "method=flap", "sparsity=0.3"]
    if family not in NARROWS:
        with pytest.raises(SystemExit) as err:
            cli.main([*argv, f"hydra.run.dir={tmp_path / 'run'}"])
        assert err.value.code and "width cut" in capsys.readouterr().err
        return
    cut = _run([*argv, "save.enabled=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert 0.2 < cut["sparsity"]["actual_sparsity"] < 0.4
    again = _reload(tmp_path)
    assert again["metrics"]["wikitext2"] == cut["metrics"]["wikitext2"]


@pytest.mark.parametrize("method", ["reap", "expert_frequency"])
@pytest.mark.parametrize("family", MOE)
def test_every_mixture_of_experts_loses_experts_into_a_plain_export(family, method, tmp_path):
    from transformers import AutoModelForCausalLM

    argv = [f"model=tiny-{family}", "logger=disabled", f"method={method}", "sparsity=0.2"]
    cut = _run([*argv, "save.enabled=true", f"hydra.run.dir={tmp_path / 'run'}"])
    after = cut["sparsity"]["structure"]["experts_after"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert after < 4 and getattr(plain.config, "num_experts", None) in (after, None)
    assert sum(p.numel() for p in plain.parameters()) == cut["sparsity"]["nonzero_params"]
    assert _reload(tmp_path)["metrics"]["wikitext2"] == cut["metrics"]["wikitext2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_held_as_sparse_plus_lowrank(family, tmp_path):
    """OATS on every family (two alternations): every pruned linear that saw tokens holds its
    factors, the export stores them beside the bitmask weights, and the reload gives the same
    perplexity with S's masks verified again."""
    argv = [f"model=tiny-{family}", "logger=disabled", "method=oats", "method.num_iters=2"]
    run = _run(
        [*argv, "save.enabled=true", "save.format=bitmask", f"hydra.run.dir={tmp_path / 'run'}"]
    )
    split = run["sparsity"]["split"]
    fallback = len((run.get("method_report", {}).get("moe") or {}).get("magnitude_fallback", []))
    linears = len(run["per_layer_sparsity"])
    assert split["linears_with_factors"] == linears - fallback > 0
    assert 0.5 <= run["sparsity"]["actual_sparsity"] < 0.55  # ranks are floored: a little above
    again = _reload(tmp_path)
    assert again["metrics"]["wikitext2"] == run["metrics"]["wikitext2"]
    assert again["sparsity"]["split"] == split


SPARSELLM = ["gemma2", "gemma3", "llama", "mistral", "opt", "phi3", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_sparsellm_or_is_refused(family, tmp_path, capsys):
    """SparseLLM couples a dense gated MLP (up/gate/down) or OPT's ReLU fc1/fc2: those families
    run (one epoch less than the default, to stay quick); any other is refused before work."""
    argv = [f"model=tiny-{family}", "logger=disabled", "method=sparsellm", "method.epochs=2"]
    if family not in SPARSELLM:
        with pytest.raises(SystemExit) as err:
            cli.main([*argv, f"hydra.run.dir={tmp_path / 'run'}"])
        assert err.value.code and "sparsellm couples" in capsys.readouterr().err
        return
    res = _run([*argv, f"hydra.run.dir={tmp_path / 'run'}"])
    assert res["method_report"]["sparsellm"]["epochs_per_block"][0] == 2
    assert 0.5 <= res["sparsity"]["actual_sparsity"] < 0.501


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_an_evopress_allocation(family, tmp_path, monkeypatch):
    """EvoPress's database and a short search on every family (experts no token reached are in
    the database by magnitude, as the walk prunes them); every mask verified at its level."""
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    res = _run([
        f"model=tiny-{family}", "logger=disabled", "method=wanda", "schedule=evopress_cpu",
        "schedule.evopress.generations=2", "schedule.evopress.tokens=[128,256]", "sparsity=0.7",
        f"hydra.run.dir={tmp_path / 'run'}",
    ])  # fmt: skip
    alloc = res["allocation"]
    assert set(alloc["linear_targets"]) == set(res["per_layer_sparsity"])
    assert abs(alloc["expected_sparsity"] - 0.7) < 1e-9
