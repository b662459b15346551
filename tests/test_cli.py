"""End to end on tiny models: prune, verify, perplexity, results.json; and the bad-input errors."""

import json
import subprocess
import sys

import pytest

from sparsebench.errors import SparsebenchError
from sparsebench.run import run
from sparsebench.specs import build_specs

from .conftest import compose

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
    assert (
        on_disk["versions"]["torch"]
        and on_disk["seed"] == 0
        and on_disk["memory"]["peak_rss_gib"] > 0
    )
    assert on_disk["config"]["model"]["seqlen"] == 64


def test_pruning_hurts_in_order(tmp_path):
    ppl = {}
    for s in (0.0, 0.5, 0.9):
        ppl[s] = run(compose(TINY + ["method=magnitude", f"sparsity={s}"]), tmp_path / str(s))[
            "metrics"
        ]["wikitext2"]
    # a random model is already bad, but removing 90% of it must change its predictions
    assert ppl[0.0] != ppl[0.5] != ppl[0.9]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sparsity=1.0"], r"sparsity must be in \[0, 1\), got 1.0"),
        (["sparsity=-0.2"], r"sparsity must be in \[0, 1\)"),
        (["pattern=3:4"], "ratio 0.5"),
        (["pattern=2:4", "sparsity=0.7"], "fixes sparsity at 0.5"),
        (
            ["method.name=wandaa"],
            "unknown method 'wandaa' \\(did you mean 'wanda'\\?\\); valid: alps, angular, dense, "
            "elsa, elsa_l, expert_frequency, flap, ladmm, magnitude",
        ),
        (
            ["+method.blocksz=64", "method=sparsegpt"],
            "has no option 'blocksz' \\(did you mean 'blocksize'\\?\\)",
        ),
        (["data.root=/nonexistent/data"], "data root not found"),
        (["device=tpu"], "unknown device 'tpu'"),
        (["eval.datasets=[ptb]"], "unknown eval dataset 'ptb'"),
    ],
)
def test_bad_input_fails_before_heavy_work(overrides, message):
    with pytest.raises(SparsebenchError, match=message):
        build_specs(compose(TINY + overrides))


def test_seqlen_beyond_model(tmp_path):
    with pytest.raises(
        SparsebenchError,
        match=r"model.seqlen=1024 exceeds the maximum of tiny-llama \(256 positions\)",
    ):
        run(compose(TINY + ["model.seqlen=1024"]), tmp_path)
    assert not (tmp_path / "results.json").exists()  # refused before any work: nothing written


def test_missing_data_file(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(
        SparsebenchError, match=r"c4/c4_validation_2k.parquet is missing \(data.root="
    ):
        run(compose(TINY + [f"data.root={tmp_path / 'data'}"]), tmp_path / "out")


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sparsebench.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_error_is_one_line(tmp_path):
    proc = _cli(*TINY, "sparsity=1.5", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "sparsebench: error: sparsity must be in [0, 1), got 1.5"
    )
    assert "Traceback" not in proc.stderr
    assert (
        list(tmp_path.iterdir()) == []
    )  # a refused command leaves no folder (outputs/<date>/... removed)


def test_cli_rejects_a_switch_that_is_not_a_bool(tmp_path):
    proc = _cli(*TINY, "method=elsa_l", "method.z_residual=maybe", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "sparsebench: error: method 'elsa_l' option 'z_residual' must be true or false, got 'maybe'"
    )


def test_cli_unknown_model_lists_valid(tmp_path):
    proc = _cli("model=llama9", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("sparsebench: error: unknown model 'llama9'")
    )
    assert "smollm2-135m" in proc.stderr


def test_cli_multirun_sweep(tmp_path):
    proc = _cli(
        "-m",
        *TINY,
        "method=magnitude,wanda",
        "sparsity=0.5,0.7",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 5  # 4 jobs + the dense baseline of the sweep
    seen = {
        (r["config"]["method"]["name"], r["config"]["sparsity"])
        for r in map(lambda p: json.loads(p.read_text()), results)
    }
    assert seen == {
        ("magnitude", 0.5),
        ("magnitude", 0.7),
        ("wanda", 0.5),
        ("wanda", 0.7),
        ("dense", 0.5),
    }
    assert len(list((tmp_path / "sweep").glob("dense_tiny-llama_*/results.json"))) == 1


def test_killed_run_is_recorded_as_failed(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sparsebench.cli",
            *TINY,
            "eval.max_windows=null",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    assert (
        rec["status"] == "failed"
        and rec["error"] == "interrupted (SIGTERM)"
        and rec["reason"] == "interrupted"
    )
    assert proc.returncode == 143
    assert rec["sparsity"]["actual_sparsity"] == 0.5  # what was measured before the kill is kept


@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["--method", "wanda"],
            "unknown option --method: sparsebench takes key=value, e.g. method=wanda",
        ),
        (
            ["--sparsity=0.5"],
            "unknown option --sparsity: sparsebench takes key=value, e.g. sparsity=0.5",
        ),
        (
            ["sparsity", "0.5"],
            "'sparsity' has no value: sparsebench takes key=value, e.g. sparsity=0.5",
        ),
        (
            ["+sparsty=0.5"],
            "unknown key 'sparsty' (did you mean 'sparsity'?): sparsebench reads no such key",
        ),
    ],
)
def test_other_tools_habits_get_one_line_and_leave_nothing(tmp_path, args, line, capsys):
    from sparsebench import cli

    with pytest.raises(SystemExit) as err:  # in this process: the check runs before Hydra
        cli.main([*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert err.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith(f"sparsebench: error: {line}")
    )
    assert list(tmp_path.iterdir()) == []


def test_version_names_sparsebench_and_its_frameworks(capsys):
    from sparsebench import cli

    cli.main(["--version"])
    out = capsys.readouterr().out
    assert out.startswith("sparsebench ") and "torch " in out and "Hydra" not in out


def test_a_run_ends_with_its_summary_and_one_wandb_line(tmp_path):
    """The default logger (wandb offline) says one line; the last lines are the summary:
    perplexities, sparsity, times, memory, the results.json path."""
    proc = _cli("model=tiny-llama", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert sum("wandb" in ln.lower() for ln in out.splitlines()) <= 2
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"results: {tmp_path / 'run' / 'results.json'}"
    assert lines[-2].startswith("wandb: offline run in ") and "wandb sync" in lines[-2]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    table = "\n".join(lines)
    assert f"| wikitext2 | {rec['metrics']['wikitext2']:>10.4f} |" in table
    assert "sparsity: target 0.5, actual 0.500000" in table and "Traceback" not in proc.stderr
    assert f"bitmask + values ({rec['size']['bitmask_over_dense']:.2f}x; save.format" in table


@pytest.mark.e2e  # long end to end: make test-e2e
def test_eval_full_prints_the_zero_shot_table(tmp_path):
    proc = _cli(
        *TINY,
        "eval=full",
        "eval.zeroshot.limit=10",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    for task, v in rec["zeroshot"]["tasks"].items():
        assert f"| {task}" in proc.stdout and f"{v['headline']:.4f}" in proc.stdout
    assert (
        "| mean" in proc.stdout and "lm_eval" not in proc.stdout + proc.stderr
    )  # its warnings: run.log
    assert "lm_eval" in (tmp_path / "run" / "run.log").read_text()


def test_a_sweep_ends_with_its_counts_and_the_report_command(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", *TINY, "method=magnitude", "pattern=2:4,unstructured", f"hydra.sweep.dir={sweep}")
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tail = proc.stdout.strip().splitlines()[-4:]
    assert tail[0] == "sparsebench sweep: 2 done, 0 skipped (already complete), 0 failed"
    assert tail[1].startswith(f"  dense baseline: {sweep}/dense_tiny-llama_") and tail[1].endswith(
        "(ran)"
    )
    assert tail[-1] == f"table and plots: sparsebench-report {sweep}"
    assert all(":" not in p.name for p in sweep.iterdir())  # 2-4, not 2:4
    again = _cli(*args, cwd=tmp_path)
    assert "sparsebench sweep: 0 done, 2 skipped (already complete), 0 failed" in again.stdout
    assert "(reused)" in again.stdout


def test_a_saved_model_reloads_to_its_own_perplexity(tmp_path):
    """Save, then `model=local model.path=<export> method=dense` and nothing else: the export's
    dtype, seqlen and evaluation protocol come from its sparsebench.json."""
    saved = run(compose(TINY + ["method=sparsegpt", "save.enabled=true"]), tmp_path / "run")
    again = run(
        compose(
            [
                "model=local",
                f"model.path={tmp_path / 'run' / 'model'}",
                "method=dense",
                "logger=disabled",
            ]
        ),
        tmp_path / "reload",
    )
    assert again["metrics"] == saved["metrics"]
    assert again["sparsity"]["actual_sparsity"] == saved["sparsity"]["actual_sparsity"]
    assert again["config"]["model"]["dtype"] == "float32" and again["config"]["protocol"] == "tiny"


def test_a_block_weight_of_no_known_kind_is_refused_before_any_work(tmp_path, capsys):
    """A family whose blocks hold weights that are neither linears of the model map nor kept on
    purpose (Mamba's A_log and depthwise convolutions) stops with one line before anything
    loads, instead of pruning the linears and reporting their sparsity as the model's."""
    from sparsebench import cli

    with pytest.raises(SystemExit) as err:
        cli.main(
            [
                "model=tiny-llama",
                "model.arch.model_type=mamba",
                "method=wanda",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
    assert err.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "sparsebench: error: backbone.layers.0.mixer.A_log (128, 16) (MambaMixer) and 3 more"
    )
    assert "neither pruned nor declared kept" in line
    assert list(tmp_path.iterdir()) == []
