"""sparsebench-report on hand-made results, and resume of completed runs."""

import json

import pytest

from sparsebench.records import report
from sparsebench.run import run

from .conftest import compose


def _result(folder, method, sparsity, wiki, c4, pattern="unstructured", status="complete"):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(
        json.dumps(
            {
                "status": status,
                "config": {
                    "model": {"name": "m"},
                    "method": {"name": method},
                    "sparsity": sparsity,
                    "pattern": pattern,
                },
                "metrics": {"wikitext2": wiki, "c4": c4} if status == "complete" else {},
                "sparsity": {"pattern": pattern, "actual_sparsity": sparsity},
                "timings_s": {"prune": 1.5},
                "memory": {"peak_rss_gib": 2.0},
            }
        )
    )


def test_report_table_and_plot(tmp_path, capsys):
    _result(tmp_path / "0", "dense", 0.5, 10.0, 20.0)  # dense ignores the sweep's sparsity
    _result(tmp_path / "1", "wanda", 0.5, 20.0, 40.0)
    _result(tmp_path / "2", "wanda", 0.7, 50.0, 80.0)
    _result(tmp_path / "3", "sparsegpt", 0.5, 16.0, 25.0, pattern="2:4")
    _result(tmp_path / "4", "sparsegpt", 0.7, 0, 0, status="failed")
    report.main([str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 5
    assert lines[0] == (
        "| model | method | sparsity | actual | pattern | WikiText-2 | C4 | % dense (Wiki) | % "
        "dense (C4) "
        "| prune s | peak GiB | status |"
    )  # one-shot rows only: no training columns
    assert lines[2].startswith(
        "| m | dense | 0.00 | 0.5000 | unstructured | 10.00 | 20.00 | 100.0 | 100.0 |"
    )
    assert (
        "| m | wanda | 0.70 | 0.7000 | unstructured | 50.00 | 80.00 | 20.0 | 25.0 | 1.5 | 2.00 | "
        "complete |" in md
    )
    assert (
        "| sparsegpt | 0.70 | 0.7000 | unstructured | — | — | — | — | 1.5 | 2.00 | failed |" in md
    )
    assert md.startswith(f"# sparsebench report: {tmp_path}")
    assert (
        "- % dense (Wiki): dense perplexity / row perplexity x 100" in md
        and "higher is better" in md
    )
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("path,status,error,model,method")
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_empty_folder(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])


def test_resume_skips_complete_runs(tmp_path, monkeypatch):
    cfg = compose(["model=tiny-llama", "logger=disabled", "method=magnitude"])
    first = run(cfg, tmp_path)
    import sparsebench.record as runmod

    monkeypatch.setattr(runmod, "load_model", lambda *a, **k: pytest.fail("re-ran a complete job"))
    assert run(cfg, tmp_path) == first
    # a failed record is run again
    data = json.loads((tmp_path / "results.json").read_text())
    data["status"] = "failed"
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(pytest.fail.Exception):
        run(cfg, tmp_path)


@pytest.mark.e2e  # long end to end: make test-e2e
def test_killed_sweep_resumes_missing_jobs_only(tmp_path):
    """A 3 x 3 sweep from one command; killed midway, the same command finishes only what is
    missing."""
    import subprocess
    import sys
    import time

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "sparsebench.cli",
        "-m",
        "model=tiny-llama",
        "logger=disabled",
        "method=magnitude,wanda,sparsegpt",
        "sparsity=0.3,0.5,0.7",
        f"hydra.sweep.dir={sweep}",
    ]

    def complete():
        return {
            p.parent.name: p.stat().st_mtime_ns
            for p in sweep.glob("*/results.json")
            if json.loads(p.read_text())["status"] == "complete"
        }

    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(complete()) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    before = complete()
    assert any(n.startswith("dense_tiny-llama_") for n in before) and 4 <= len(before) < 10, before

    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    after = complete()
    assert len(after) == 10  # 9 jobs + the dense baseline
    assert all(
        after[name] == mtime for name, mtime in before.items()
    )  # finished jobs were not re-run

    report.main([str(sweep)])
    rows = [ln for ln in (sweep / "report.md").read_text().splitlines() if ln.startswith("|")][2:]
    assert len(rows) == 10 and rows[0].startswith("| tiny-llama | dense |")
    assert (sweep / "report.png").stat().st_size > 5000


def test_report_zero_shot_columns(tmp_path):
    for i, (method, s, acc) in enumerate([("dense", 0.0, 0.6), ("wanda", 0.5, 0.45)]):
        _result(tmp_path / str(i), method, s, 10.0, 20.0)
        path = tmp_path / str(i) / "results.json"
        rec = json.loads(path.read_text())
        rec["zeroshot"] = {
            "tasks": {"boolq": {"headline": acc}, "arc_easy": {"headline": acc / 2}},
            "mean_acc": acc * 0.75,
        }
        path.write_text(json.dumps(rec))
    md = report.markdown(report.table(report.load_results(tmp_path)))
    assert "| boolq | arc_easy | mean acc | % dense (acc) |" in md
    assert "| 0.4500 | 0.2250 | 0.3375 | 75.0 |" in md


def test_rows_of_different_kernel_environments_never_fold_or_read_as_one(tmp_path):
    """Seeds of one config fold into mean +- std only within one kernel environment; two
    environments are labelled apart and listed under the table."""

    def result(folder, seed, wiki, aten):
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(
            json.dumps(
                {
                    "status": "complete",
                    "seed": seed,
                    "config": {
                        "model": {"name": "m"},
                        "method": {"name": "sparsegpt"},
                        "sparsity": 0.7,
                        "pattern": "unstructured",
                        "seed": seed,
                    },
                    "metrics": {"wikitext2": wiki, "c4": wiki},
                    "sparsity": {"pattern": "unstructured", "actual_sparsity": 0.7},
                    "versions": {
                        "kernels": {
                            "cpu": "AMD EPYC (family 25, model 17)",
                            "aten_capability": aten,
                            "mkl_cbwr": "unset",
                            "threads": 2,
                        }
                    },
                }
            )
        )

    result(tmp_path / "a0", 0, 340.0, "AVX2")
    result(tmp_path / "a1", 1, 344.0, "AVX2")
    result(tmp_path / "b0", 0, 363.0, "AVX512")
    rows = report.table(report.load_results(tmp_path))
    assert sorted(r["n"] for r in rows) == [
        1,
        2,
    ]  # the AVX2 seeds fold; the AVX-512 run stays apart
    assert sorted(r["label"] for r in rows) == ["sparsegpt [env 1]", "sparsegpt [env 2]"]
    note = report.versions_note(rows)
    assert "env 1: AMD EPYC (family 25, model 17) / ATen AVX2 / MKL_CBWR unset / 2 threads" in note
    assert "env 2:" in note and "ATen AVX512" in note
