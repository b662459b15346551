"""Every figure the report and the summary print is the one that ran: folding of repeats and
seeds (speed and size included), suspect speed-ups, the bitmask folder's bytes on disk, reloads
as the pruned model they are, every row in the plots or named, count rules, refused sweep
jobs, dry runs and hub loads without a network, the Python entry point without a tokenizer,
and the docs' own blocks and lists."""

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from sparsebench import cli
from sparsebench.errors import SparsebenchError
from sparsebench.records.report import markdown
from sparsebench.records.rows import load_results, table
from sparsebench.records.summary import human_bytes, run_summary

from .conftest import REPO, compose, tiny_spec

TINY = ["model=tiny-llama", "logger=disabled"]


def cli_ok(argv):
    try:
        cli.main(list(argv))
    except SystemExit as err:
        assert not err.code, argv


def fake_result(folder: Path, seed=0, speedup=None, method="wanda", model="tiny-llama", **extra):
    """A results.json as sparsebench writes it, with only the fields the report reads."""
    cfg = {
        "model": {"name": model, "seqlen": 64},
        "method": {"name": method},
        "sparsity": 0.5,
        "pattern": "unstructured",
        "seed": seed,
        "protocol": "tiny",
    }
    rec = {
        "status": "complete",
        "config": cfg,
        "protocol_id": "p1",
        "metrics": {"wikitext2": 100.0, "c4": 120.0, "wikitext2_windows": 4},
        "sparsity": {"actual_sparsity": 0.5, "pattern": "unstructured", "nonzero_params": 1000},
        "size": {"model_bitmask": 2_000_000},
        **extra,
    }
    if speedup is not None:
        rec["speed"] = {"speedup": {"decode_b1": speedup, "prefill_b1": speedup / 2}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(rec))


# ----------------------------------------------------------------------------- 1. folding


def test_repeats_of_one_seed_are_repeats_and_speed_folds_as_mean_and_std(tmp_path):
    for i, x in enumerate((5.15, 1.00, 0.50)):  # the three runs of seed 0
        fake_result(tmp_path / f"r{i}", seed=0, speedup=x)
    (row,) = table(load_results(tmp_path))
    assert row["n"] == 3 and row["fold"] == "repeats" and row["repeats"] == {"0": 3}
    assert row["decode_speedup"] == pytest.approx((5.15 + 1.0 + 0.5) / 3)
    std = torch.tensor([5.15, 1.0, 0.5]).std().item()
    assert row["decode_speedup_std"] == pytest.approx(std, rel=1e-6)
    text = markdown([row])
    assert "n=3 repeats of seed 0" in text and "over seeds" not in text
    assert f"{row['decode_speedup']:.2f} ± {std:.2f}" in text
    from sparsebench.records.plots import speed_series

    ((_, points),) = speed_series([row]).items()
    assert points == [(0.5, row["decode_speedup"], row["decode_speedup_std"], False)]


def test_seeds_fold_as_seeds_and_a_repeated_seed_says_so(tmp_path):
    for seed in (0, 1, 2):
        fake_result(tmp_path / f"s{seed}", seed=seed, speedup=1.0)
    (row,) = table(load_results(tmp_path))
    assert row["fold"] == "seeds" and "n=3 seeds" in markdown([row])
    fake_result(tmp_path / "again", seed=0, speedup=1.0)
    (row,) = table(load_results(tmp_path))
    assert row["fold"] == "runs" and "n=4: seeds 0, 1, 2; seed 0 x2" in markdown([row])


# ----------------------------------------------------------------------------- 2. suspect speed


def _measured(dense_ms, sparse_ms, kernel_alone, floor, dense_bytes):
    """measure()'s record, reduced to what plausibility reads (decode at batch 1)."""
    return {
        "kernel": "csr16",
        "prefill_kernel": "csr16",
        "rows_many": 2,
        "kernels_one_token": {"dense_ms": 1.0, "csr16_ms": 1.0 / kernel_alone},
        "kernels_64_tokens": {"dense_ms": 1.0, "csr16_ms": 1.0 / kernel_alone},
        "dense": {"bytes_per_token": dense_bytes, "decode_ms_b1": dense_ms},
        "sparse": {"decode_ms_b1": sparse_ms},
        "speedup": {"decode_b1": dense_ms / sparse_ms, "floor": floor},
    }


def test_an_impossible_speed_up_is_suspect_and_a_possible_one_is_not():
    from sparsebench.evaluation.speed import plausibility

    big = 538_000_000  # SmolLM2-135M in float32
    # the run: 5.15x whole model, kernel alone 0.146 / 0.39 = 0.37x, floor 0.99x
    bad = plausibility(_measured(17.1, 3.32, 0.146 / 0.39, 0.99, big), seqlen=64)
    assert any("its kernel alone" in r and "0.37x" in r for r in bad)
    assert any("bandwidth floor" in r for r in bad)
    # env C at 0.9 (docs/results.md): 1.28x whole, 1.53x the linears alone, floor 3.03x
    assert plausibility(_measured(34.9, 27.2, 1.53, 3.03, big), seqlen=64) == []
    # a whole model slower than its kernel alone is slower than physics allows too
    slow = plausibility(_measured(10.0, 50.0, 0.9, 1.9, big), seqlen=64)
    assert slow and "loses less than its linears" in slow[0]
    # a tiny model: one reason, the timings say nothing
    (tiny,) = plausibility(_measured(17.1, 3.32, 0.37, 0.99, 400_000), seqlen=64)
    assert tiny.startswith("too small to time")
    # decode at batch 8 is judged by the kernel picked (and timed) at 8 rows, not at 64: env
    # C's bitmask run at 0.5 (1.23x whole; its kernel 2.7x at 8 rows, 0.85x at 64)
    b8 = _measured(47.4, 43.3, 1.37, 1.58, big)
    b8.update(
        batch_kernel="bitmask",
        rows_prefill=16,
        kernels_8_tokens={"dense_ms": 2.7, "bitmask_ms": 1.0},
        kernels_64_tokens={"dense_ms": 0.85, "bitmask_ms": 1.0},
    )
    b8["speedup"]["decode_b8"] = 1.23
    assert plausibility(b8, seqlen=64) == []
    b8["kernels_8_tokens"] = b8["kernels_64_tokens"]  # had it been timed at 64 only: suspect
    assert "gains less than its linears" in plausibility(b8, seqlen=64)[0]
    # at batch 8 dense's small GEMMs run at 3.07x their floor (Llama-2-7B's shapes, env C):
    # 2.73x over dense is within the floors' ratio (1.85x) times that, not beyond it
    b8["kernels_8_tokens"] = {"dense_ms": 3.0, "bitmask_ms": 1.0}
    b8["speedup"].update(decode_b8=2.73, floor=1.85)
    b8["dense"]["decode_over_floor_b8"] = 3.07
    assert plausibility(b8, seqlen=64) == []
    b8["dense"]["decode_over_floor_b8"] = 1.0  # had dense run at its floor: impossible
    assert "bandwidth floor allows" in plausibility(b8, seqlen=64)[0]
    # a kernel timed faster than the copy sampled beside it: that copy was slowed, not a floor
    # (env B, 2:4: bitmask at 0.54 of a floor from copies at 12.4 GB/s, the others' 25-34)
    b8["kernels_one_token"].update(bitmask_gbs=12.41, bitmask_over_floor=0.54)
    b8["kernels_one_token"].update(dense_gbs=31.84, dense_over_floor=1.0)
    (below,) = [r for r in plausibility(b8, seqlen=64) if "of its floor" in r]
    assert (
        below.startswith("bitmask at one token ran at 0.54 of its floor") and "12.4 GB/s" in below
    )
    del b8["kernels_one_token"]["bitmask_over_floor"]
    # prefill (seqlen x batch rows, never timed at that size) is not judged
    b8["speedup"]["prefill_b1"] = 0.4
    assert len(plausibility(b8, seqlen=64)) == 1  # the floor's reason above, no other


# ----------------------------------------------------------------------------- 3. bitmask size


def test_the_bitmask_folder_holds_the_masks_once_and_the_size_line_is_its_bytes(tmp_path):
    cli_ok(
        TINY
        + ["method=magnitude", "save.enabled=true", "save.format=bitmask"]
        + [f"hydra.run.dir={tmp_path / 'a'}"]
    )
    folder = tmp_path / "a" / "model"
    assert not (folder / "sparsebench_masks.safetensors").exists()
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    packed = folder / "sparsebench_bitmask.safetensors"
    raw = packed.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    shapes = sum(8 * v["shape"][0] for k, v in header.items() if k.endswith(".__shape"))
    # the file is its header, the shape records and exactly what the size line counts
    assert len(raw) == 8 + header_len + shapes + res["size"]["model_bitmask"]
    assert res["saved_model_bytes"]["weights"] == len(raw)
    text = run_summary(res, tmp_path / "a" / "results.json")
    assert f"{human_bytes(res['size']['model_bitmask'])} with the pruned weights as bitmask" in text
    assert f"saved: {folder} (save.format=bitmask: {human_bytes(len(raw))} of weights" in text
    # and the masks read back from the bits are the run's
    cli_ok(["model=local", f"model.path={folder}", "method=dense", "logger=disabled",
            f"hydra.run.dir={tmp_path / 'b'}"])  # fmt: skip
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["per_layer_sparsity"] == res["per_layer_sparsity"]


@pytest.mark.parametrize("family", ["gpt2", "phi3", "mixtral", "falcon"])
def test_masks_come_back_from_the_familys_own_layout(family):
    """Fused projections, Conv1D and stacked experts: original_masks then masks_from_original
    is the identity on random masks."""
    from sparsebench.families import masks_from_original, original_masks
    from sparsebench.models import load_model, prunable_linears

    model, _ = load_model(tiny_spec(family), seed=0)
    g = torch.Generator().manual_seed(0)
    masks = {
        n: torch.rand(lin.weight.shape, generator=g) > 0.5
        for n, lin in prunable_linears(model).items()
    }
    back = masks_from_original(model, original_masks(model, masks))
    assert back.keys() == masks.keys()
    assert all(torch.equal(back[n], masks[n]) for n in masks)


def test_sizes_never_print_as_zero():
    assert human_bytes(427_264) == "427 kB" and human_bytes(538_000_000) == "538 MB"
    assert human_bytes(1_020_000) == "1.02 MB" and human_bytes(12) == "12 B"


# ----------------------------------------------------------------------------- 4. reloads


def test_a_reloaded_export_is_the_pruned_model_beside_its_source_run(tmp_path):
    sweep = tmp_path / "sweep"
    cli_ok(TINY + ["method=wanda", "save.enabled=true", f"hydra.run.dir={sweep / 'wanda'}"])
    cli_ok(TINY + ["method=dense", f"hydra.run.dir={sweep / 'dense'}"])
    cli_ok(TINY + ["method=magnitude", f"hydra.run.dir={sweep / 'magnitude'}"])
    local = ["model=local", f"model.path={sweep / 'wanda' / 'model'}", "model.seqlen=64"]
    cli_ok(local + ["protocol=tiny", "method=dense", "logger=disabled",
                    f"hydra.run.dir={sweep / 'reload'}"])  # fmt: skip
    res = json.loads((sweep / "reload" / "results.json").read_text())
    assert res["sparsity"]["target"] == 0.5
    head = run_summary(res, sweep / "reload" / "results.json").splitlines()[0]
    assert head.startswith("sparsebench: wanda at 0.5 (unstructured) on tiny-llama, reloaded")
    rows = table(load_results(sweep))
    labels = [r["label"] for r in rows]
    assert labels == ["dense", "magnitude", "wanda", "wanda (reloaded)"]
    dense = [r for r in rows if r["method"] == "dense"]
    reload = rows[-1]
    assert len(dense) == 1 and reload["sparsity"] == 0.5 and reload["method"] == "wanda"
    assert reload["wikitext2"] == rows[2]["wikitext2"]
    assert reload["wikitext2_dense_retained_pct"] == rows[2]["wikitext2_dense_retained_pct"]


# ----------------------------------------------------------------------------- 5. plots


def test_every_row_is_plotted_or_named_and_colours_follow_model_and_method(tmp_path):
    from sparsebench.records.plots import _colours, _series, not_plotted

    fake_result(tmp_path / "a", method="wanda", model="m1")
    fake_result(tmp_path / "b", method="wanda", model="m2")
    fake_result(tmp_path / "c", method="sparsegpt", model="m1")
    rec = json.loads((tmp_path / "c" / "results.json").read_text())
    rec["config"]["pattern"] = rec["sparsity"]["pattern"] = "2:4"
    (tmp_path / "c" / "results.json").write_text(json.dumps(rec))
    fake_result(tmp_path / "d", method="magnitude", model="m1", status="failed", error="boom")
    rows = table(load_results(tmp_path))
    series = _series(rows, "sparsity", "wikitext2")
    assert ("m1", "sparsegpt", False, "2:4") in series  # N:M is in the plot
    colours = _colours(rows)
    assert colours[("m1", "wanda")] != colours[("m2", "wanda")]
    missing = not_plotted(rows)
    assert [(r["label"], why) for r, why in missing] == [
        ("magnitude", "failed: it has no result to plot")
    ]
    assert "Rows not in the perplexity plots:" in markdown(rows)


# ----------------------------------------------------------------------------- 6. count rules


@pytest.mark.parametrize(
    "model,method,word",
    [
        ("tiny-llama", "sparsegpt", "official count"),
        ("tiny-llama", "wanda", "per row"),
        ("tiny-llama", "magnitude", "per linear"),
    ],
)
def test_actual_sparsity_lies_where_the_count_rule_says(tmp_path, model, method, word):
    from sparsebench.run import run

    res = run(compose([f"model={model}", "logger=disabled", f"method={method}"]), tmp_path)
    sp = res["sparsity"]
    low, high = sp["allowed"]
    assert low <= sp["actual_sparsity"] <= high and word in sp["count_rule"]
    if method == "sparsegpt":  # the official rule prunes more than the target, never fewer
        assert sp["actual_sparsity"] > 0.5 and "actual vs target" in run_summary(res, tmp_path)
    else:
        assert high == low <= 0.5


def test_no_doc_says_the_difference_is_rounding_only():
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    texts += [REPO / "sparsebench" / "records" / "report.py"]
    assert not [p.name for p in texts if "rounding only" in p.read_text()]


# ----------------------------------------------------------------------------- 7. refused jobs


def test_a_refused_sweep_job_is_recorded_and_reported(tmp_path):
    sweep = tmp_path / "s"
    argv = ["-m", *TINY, "method=wanda", "sparsity=0.5,0.7", "pattern=2:4"]
    with pytest.raises(SystemExit) as err:
        cli.main(argv + [f"hydra.sweep.dir={sweep}", "dense_baseline=false"])
    assert err.value.code == 1
    refused = [
        json.loads(p.read_text())
        for p in sweep.rglob("results.json")
        if json.loads(p.read_text())["status"] == "refused"
    ]
    assert len(refused) == 1 and "fixes sparsity at 0.5" in refused[0]["error"]
    rows = table(load_results(sweep))
    assert [r["status"] for r in rows] == ["complete", "refused"]
    assert "refused: pattern 2:4 fixes sparsity at 0.5" in markdown(rows)


# ----------------------------------------------------------------------------- 8. no network


def test_a_hub_models_dry_run_never_touches_the_network(monkeypatch, capsys):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run opened a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(SystemExit) as err:  # 7B on 2 cores does not fit: exit 3
        cli.main(["dry_run=true", "model=llama2-7b", "method=elsa", "sparsity=0.9"])
    assert err.value.code == cli.DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "planned from the architecture in llama2-7b's config" in out and "verdict:" in out


def test_a_hub_load_that_cannot_connect_is_one_line(monkeypatch):
    from sparsebench import models

    monkeypatch.setattr(models, "hub_unreachable", lambda: "huggingface.co: no route")
    spec = models.ModelSpec(name="x", source="hub", path="sparsebench-test/none", seqlen=64)
    with pytest.raises(SparsebenchError, match=r"cannot reach the Hugging Face hub .* model=local"):
        models.load_model(spec)


# ----------------------------------------------------------------------------- 9. prune_model


def test_prune_model_without_a_tokenizer_refuses_before_any_work():
    from sparsebench.models import load_model, prunable_linears
    from sparsebench.pipeline import prune_model

    model, _ = load_model(tiny_spec("llama"), seed=0)
    before = {n: lin.weight.clone() for n, lin in prunable_linears(model).items()}
    with pytest.raises(SparsebenchError, match="wanda calibrates on text and no tokenizer"):
        prune_model(model, method="wanda", seqlen=64)
    with pytest.raises(SparsebenchError, match=r"evaluate=\('wikitext2',\) reads text"):
        prune_model(model, method="magnitude", seqlen=64, evaluate=("wikitext2",))
    assert all(torch.equal(lin.weight, before[n]) for n, lin in prunable_linears(model).items())
    ids = torch.randint(model.config.vocab_size, (4, 64))  # explicit token ids are allowed
    out = prune_model(model, method="wanda", seqlen=64, calib=ids)
    assert out.sparsity["actual_sparsity"] == 0.5


def test_the_readmes_offline_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(# offline.*?)```", text, re.S)
    assert block, "README has no offline Python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102 - the docs' own code
    assert scope["out"].sparsity["actual_sparsity"] == 0.5 and scope["out"].metrics["wikitext2"] > 1


# ----------------------------------------------------------------------------- 10. the rest


def test_help_lists_the_speed_and_save_format_keys():
    text = cli.help_text()
    assert "eval.speed.enabled=true" in text and "save.format=" in text


def test_every_indented_code_block_in_the_docs_starts_indented():
    """A block whose first line is not indented renders as one run-on paragraph."""
    bad = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        lines, fenced = path.read_text().splitlines(), False
        for i, line in enumerate(lines[1:], 1):
            fenced ^= line.startswith("```")
            prev = lines[i - 1]
            if not fenced and line.startswith("    sparsebench") and prev.startswith("sparsebench"):
                bad.append(f"{path.name}:{i}")
    assert not bad, bad


def _model_names(row: str) -> set[str]:
    """Model options named in a table row: `a`, `llama2-7b/13b` (shared prefix), and
    `tiny-<family>` with its families listed."""
    names = set()
    for token in re.findall(r"`([^`]+)`", row):
        first, *rest = token.split("/")
        names.add(first)
        names.update(first.rsplit("-", 1)[0] + "-" + r for r in rest)
    families = re.search(r"tiny-<family>` for \d+ families \(random: ([^)]*)\)", row)
    names.update(f"tiny-{f.strip()}" for f in families.group(1).split(",")) if families else None
    return names


@pytest.mark.parametrize("doc", ["README.md", "docs/methods.md"])
def test_the_model_lists_name_every_model_config(doc):
    row = next(
        line for line in (REPO / doc).read_text().splitlines() if line.startswith("| `model=`")
    )
    options = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    assert options - _model_names(row) == set()


def test_a_reloaded_exports_wandb_run_is_named_by_its_source():
    from types import SimpleNamespace

    from sparsebench.run import run_name

    specs = SimpleNamespace(
        pruner=SimpleNamespace(name="dense"), sparsity=0.0, pattern="unstructured",
        model=SimpleNamespace(name="local"),
    )  # fmt: skip
    meta = {"method": "wanda", "label": "owl-wanda", "sparsity": 0.7, "pattern": "unstructured"}
    assert run_name(specs, ({}, meta)) == "owl-wanda-0.7-unstructured-local-reloaded"
    assert run_name(specs, None) == "dense-0.0-unstructured-local"


def test_a_speed_measurement_shares_the_dense_run_of_its_protocol():
    """eval.speed moves no perplexity: a run measuring speed finds the dense row of a sweep
    that did not (its "% of dense" is never blank for that reason)."""
    from sparsebench.records.ledger import protocol_id

    config = {"model": {"name": "m", "seqlen": 64}, "eval": {"max_windows": 4, "speed": {}}}
    timed = {**config, "eval": {"max_windows": 4, "speed": {"enabled": True, "repeats": 1}}}
    assert protocol_id(config, {}) == protocol_id(timed, {})
    other = {**config, "eval": {"max_windows": 8, "speed": {}}}
    assert protocol_id(config, {}) != protocol_id(other, {})
