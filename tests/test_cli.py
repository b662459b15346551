"""End to end on tiny models: prune, verify, perplexity, results.json; and the bad-input errors."""
import json
import subprocess
import sys

import pytest

from sparsebench.errors import SparsebenchError
from sparsebench.run import build_specs, run

from .conftest import REPO, compose

TINY = ["model=tiny-llama", "logger=disabled"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=dense"],
        ["method=magnitude", "sparsity=0.7"],
        ["method=wanda", "pattern=4:8"],
        ["method=sparsegpt", "sparsity=0.6"],
        ["method=sparsegpt", "pattern=2:4", "model=tiny-gemma3"],
    ],
)
def test_pipeline_end_to_end(overrides, tmp_path):
    cfg = compose(TINY + overrides)
    res = run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "complete" and on_disk == json.loads(json.dumps(res, default=str))
    target = 0.0 if cfg.method.name == "dense" else cfg.sparsity
    assert on_disk["sparsity"]["actual_sparsity"] == pytest.approx(target, abs=1e-3)
    assert len(on_disk["per_layer_sparsity"]) == 14  # 2 blocks x 7 linears
    for name in ("wikitext2", "c4"):
        assert 1 < on_disk["metrics"][name] < 1e6 and on_disk["metrics"][f"{name}_windows"] == 4
    assert {"load", "prune", "eval_wikitext2", "eval_c4"} <= set(on_disk["timings_s"])
    assert on_disk["versions"]["torch"] and on_disk["seed"] == 0 and on_disk["memory"]["peak_rss_gib"] > 0
    assert on_disk["config"]["model"]["seqlen"] == 64


def test_pruning_hurts_in_order(tmp_path):
    ppl = {}
    for s in (0.0, 0.5, 0.9):
        ppl[s] = run(compose(TINY + ["method=magnitude", f"sparsity={s}"]), tmp_path / str(s))["metrics"]["wikitext2"]
    # a random model is already bad, but removing 90% of it must change its predictions
    assert ppl[0.0] != ppl[0.5] != ppl[0.9]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sparsity=1.0"], r"sparsity must be in \[0, 1\), got 1.0"),
        (["sparsity=-0.2"], r"sparsity must be in \[0, 1\)"),
        (["pattern=3:4"], "ratio 0.5"),
        (["pattern=2:4", "sparsity=0.7"], "fixes sparsity at 0.5"),
        (["method.name=wandaa"], "unknown method 'wandaa' \\(did you mean 'wanda'\\?\\); valid: alps, dense, elsa, elsa_l, ladmm, magnitude"),
        (["+method.blocksz=64", "method=sparsegpt"], "has no option 'blocksz' \\(did you mean 'blocksize'\\?\\)"),
        (["data.root=/nonexistent/data"], "data root not found"),
        (["device=tpu"], "unknown device 'tpu'"),
        (["eval.datasets=[ptb]"], "unknown eval dataset 'ptb'"),
    ],
)
def test_bad_input_fails_before_heavy_work(overrides, message):
    with pytest.raises(SparsebenchError, match=message):
        build_specs(compose(TINY + overrides))


def test_seqlen_beyond_model(tmp_path):
    with pytest.raises(SparsebenchError, match=r"model.seqlen=1024 exceeds the maximum of tiny-llama \(256 positions\)"):
        run(compose(TINY + ["model.seqlen=1024"]), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_missing_data_file(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SparsebenchError, match=r"c4/c4_validation_2k.parquet is missing \(data.root="):
        run(compose(TINY + [f"data.root={tmp_path / 'data'}"]), tmp_path / "out")


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sparsebench.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_error_is_one_line(tmp_path):
    proc = _cli(*TINY, "sparsity=1.5", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "sparsebench: error: sparsity must be in [0, 1), got 1.5"
    assert "Traceback" not in proc.stderr


def test_cli_rejects_a_switch_that_is_not_a_bool(tmp_path):
    proc = _cli(*TINY, "method=elsa_l", "method.z_residual=maybe", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "sparsebench: error: method 'elsa_l' option 'z_residual' must be true or false, got 'maybe'")


def test_cli_unknown_model_lists_valid(tmp_path):
    proc = _cli("model=llama9", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sparsebench: error: unknown model 'llama9'")
    assert "smollm2-135m" in proc.stderr


def test_cli_multirun_sweep(tmp_path):
    proc = _cli("-m", *TINY, "method=magnitude,wanda", "sparsity=0.5,0.7", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 5  # 4 jobs + the dense baseline of the sweep
    seen = {(r["config"]["method"]["name"], r["config"]["sparsity"]) for r in map(lambda p: json.loads(p.read_text()), results)}
    assert seen == {("magnitude", 0.5), ("magnitude", 0.7), ("wanda", 0.5), ("wanda", 0.7), ("dense", 0.5)}
    assert len(list((tmp_path / "sweep").glob("dense_tiny-llama_*/results.json"))) == 1


def test_killed_run_is_recorded_as_failed(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sparsebench.cli", *TINY, "eval.max_windows=null",
                             f"hydra.run.dir={out}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            rec = json.loads((out / "results.json").read_text())
            if "sparsity" in rec:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == "interrupted (SIGTERM)" and rec["reason"] == "interrupted"
    assert proc.returncode == 143
    assert rec["sparsity"]["actual_sparsity"] == 0.5  # what was measured before the kill is kept
