"""A result is never silently wrong, stale or lost: one test per mechanism (issue #15).

Fingerprinted resume, protocol-keyed dense baselines, content-keyed data cache, option
validation, save.dir safety, a failed job inside a sweep, an extended sweep, concurrent
sweeps, interrupts, hand-edited results, smoke-sized training budgets.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparsebench import cli
from sparsebench.data import DataSpec, eval_stream, resolve_root
from sparsebench.errors import SparsebenchError
from sparsebench.records import report
from sparsebench.run import run
from sparsebench.specs import build_specs

from .conftest import REPO, compose

TINY = ["model=tiny-llama", "logger=disabled"]


def _cli(argv, capsys=None):
    """sparsebench in this process; returns (exit code, stderr)."""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as err:
        code = err.code
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture()
def data_root(tmp_path):
    """A private copy of the offline data files the tiny runs read (so tests may edit them)."""
    src = resolve_root(None)
    root = tmp_path / "data"
    for rel in (
        "wikitext-2-raw-v1/wiki.test.raw",
        "wikitext-2-raw-v1/wiki.valid.raw",
        "c4/c4_validation_2k.parquet",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, root / rel)
    return root


# ----------------------------------------------------------------------------- resume


def test_resume_only_on_an_equal_fingerprint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = run(compose(TINY + ["method=wanda"]), out)
    assert len(first["fingerprint"]["digest"]) == 64 and first["protocol_id"]
    before = (out / "results.json").read_bytes()

    # another method into the same folder: one error naming the key, the result untouched
    with pytest.raises(
        SparsebenchError,
        match=r"holds a complete result of another config \(method.name: wanda -> magnitude\)",
    ):
        run(compose(TINY + ["method=magnitude"]), out)
    with pytest.raises(SparsebenchError, match=r"data.nsamples: 8 -> 16"):
        run(compose(TINY + ["method=wanda", "data.nsamples=16"]), out)
    assert (out / "results.json").read_bytes() == before

    # the same run is skipped, whatever the logger or a version says
    import sparsebench.record as runmod

    rec = json.loads(before)
    rec["versions"]["torch"] = "0.0.1"  # a package upgrade alone re-runs nothing
    (out / "results.json").write_text(json.dumps(rec))
    monkeypatch.setattr(runmod, "load_model", lambda *a, **k: pytest.fail("re-ran a finished run"))
    assert (
        run(compose(TINY + ["method=wanda", "logger=offline"]), out)["metrics"] == first["metrics"]
    )


def test_calib_batch_enters_the_identity_only_away_from_one_window():
    from sparsebench.records.ledger import identity

    def ident(extra):
        return identity(
            OmegaConf.to_container(compose(TINY + ["method=wanda"] + extra), resolve=True)
        )

    assert "calib_batch" not in ident([])  # runs from before the key keep their identity
    assert ident([]) == ident(["calib_batch=1"])
    assert ident(["calib_batch=4"])["calib_batch"] == 4


def test_edited_data_file_changes_the_fingerprint(tmp_path, data_root):
    out = tmp_path / "run"
    args = TINY + ["method=magnitude", f"data.root={data_root}"]
    run(compose(args), out)
    with open(data_root / "wikitext-2-raw-v1/wiki.test.raw", "a") as f:
        f.write("\n an edit in place \n")
    with pytest.raises(
        SparsebenchError,
        match=r"data file wikitext-2-raw-v1/wiki.test.raw: [0-9a-f]{64} -> [0-9a-f]{64}",
    ):
        run(compose(args), out)
    # moving the data elsewhere (same content) is the same run
    moved = tmp_path / "moved"
    shutil.move(str(data_root), moved)
    with open(moved / "wikitext-2-raw-v1/wiki.test.raw", "rb+") as f:
        f.truncate(
            os.path.getsize(moved / "wikitext-2-raw-v1/wiki.test.raw")
            - len("\n an edit in place \n")
        )
    assert (
        run(compose(TINY + ["method=magnitude", f"data.root={moved}"]), out)["status"] == "complete"
    )


def test_refused_validation_writes_nothing_and_never_touches_a_complete_result(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SparsebenchError, match="option 'lr' must be > 0"):
        run(compose(TINY + ["method=elsa", "method.lr=-1"]), out)
    assert not (out / "results.json").exists()  # refused before any work: no record
    run(compose(TINY + ["method=magnitude"]), out)
    done = (out / "results.json").read_bytes()
    with pytest.raises(SparsebenchError):
        run(compose(TINY + ["method=elsa", "method.lr=-1"]), out)
    assert (out / "results.json").read_bytes() == done


# ----------------------------------------------------------------- baselines and the report


def test_dense_baseline_per_protocol(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code, err = _cli(
        [
            "-m",
            *TINY,
            "method=magnitude",
            "model.seqlen=32,64",
            "data.nsamples=4,8",
            f"hydra.sweep.dir={sweep}",
        ],
        capsys,
    )
    assert code == 0, err
    dense = sorted(sweep.glob("dense_*/results.json"))
    # seqlen changes the dense numbers (two baselines); nsamples only the pruning (shared)
    assert len(dense) == 2
    seqlens = sorted(_results(p.parent)["config"]["model"]["seqlen"] for p in dense)
    assert seqlens == [32, 64]
    jobs = [p for p in sweep.glob("tiny-llama_*/results.json")]
    assert len(jobs) == 4
    rows = report.table(report.load_results(sweep))
    for r in rows:
        if r["method"] == "magnitude":
            d = next(
                d for d in rows if d["method"] == "dense" and d["protocol_id"] == r["protocol_id"]
            )
            assert r["wikitext2_dense_retained_pct"] == round(
                100 * d["wikitext2"] / r["wikitext2"], 2
            )


def test_report_survives_hand_edited_results(tmp_path):
    run(compose(TINY + ["method=dense"]), tmp_path / "d")
    run(compose(TINY + ["method=magnitude"]), tmp_path / "m")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(
        '{"status": "complete", "config": {"sparsity": "0.5 "'
    )  # cut off
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "results.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "config": {
                    "model": {"name": "tiny-llama"},
                    "method": {"name": "wanda"},
                    "sparsity": "0.5 ",
                },
                "metrics": {"wikitext2": "12"},
            }
        )
    )
    report.main([str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert "unreadable: results.json unreadable" in md
    assert "unreadable: config.sparsity is not a number: '0.5 '" in md
    assert "Versions:" in md and "torch" in md


# ----------------------------------------------------------------------------- cache


def test_cache_is_keyed_by_content_and_rebuilds_a_corrupt_entry(tmp_path, data_root, caplog):
    from sparsebench.models import byte_tokenizer, cache_root

    tok = byte_tokenizer()
    spec = DataSpec(root=str(data_root))
    first = eval_stream(spec, "wikitext2", tok, 64)
    wiki = data_root / "wikitext-2-raw-v1/wiki.test.raw"
    wiki.write_text("A different text entirely.\n" * 50)
    second = eval_stream(spec, "wikitext2", tok, 64)
    assert second.shape != first.shape  # the edit is read, not the stale cache
    # corrupt every cached entry: each is rebuilt with one warning, never a traceback
    for path in (cache_root() / "data").glob("*.pt"):
        path.write_bytes(b"not a torch file")
    again = eval_stream(spec, "wikitext2", tok, 64)
    assert again.equal(second) and "unreadable" in caplog.text


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=elsa", "method.lr=-1"], r"method 'elsa' option 'lr' must be > 0, got -1.0"),
        (
            ["method=elsa", "method.betas=[0.9,1.5]"],
            r"option 'betas' \(entry 1\) must be < 1, got 1.5",
        ),
        (["method=elsa", "method.eps=0"], r"option 'eps' must be > 0"),
        (["method=elsa", "method.clip=-1"], r"option 'clip' must be > 0"),
        (["method=elsa", "method.lam=-0.1"], r"option 'lam' must be >= 0"),
        (["method=elsa", "method.steps=1.5"], r"option 'steps' must be an integer, got 1.5"),
        (["method=elsa", "method.interval=0"], r"option 'interval' must be >= 1"),
        (
            ["method=elsa_l", "method.z_format=int4"],
            r"option 'z_format' is 'int4'; valid: float32, bfloat16, fp8",
        ),
        (["method=safe", "method.rho=-1"], r"option 'rho' must be >= 0"),
        (["method=safe", "method.epochs=0"], r"option 'epochs' must be >= 1"),
        (["method=safe", "method.warmup_epochs=-1"], r"option 'warmup_epochs' must be >= 0"),
        (["method=sparsegpt", "method.percdamp=0"], r"option 'percdamp' must be > 0"),
        (["method=sparsegpt", "method.blocksize=0"], r"option 'blocksize' must be >= 1"),
        (
            ["method=sparsegpt", "method.count=approx"],
            r"option 'count' is 'approx'; valid: official, exact",
        ),
        (["seed=1.5"], r"^seed must be an integer, got 1.5$"),
        (["seed=abc"], r"^seed must be an integer, got 'abc'$"),
        (["sparsity='0.5 '"], r"sparsity must be a number in \[0, 1\), got '0.5 '"),
        (["data.nsamples=0"], r"data option 'nsamples' must be >= 1"),
        (["eval.max_windows=0"], r"eval option 'max_windows' must be >= 1"),
        (["eval=full", "eval.zeroshot.limit=-3"], r"eval.zeroshot option 'limit' must be >= 1"),
        (
            ["eval.speed.enabled=true", "eval.speed.kernels=[semi_structured]", "pattern=2:4"],
            r"eval.speed.kernels: semi_structured runs on cuda, the model is on cpu; kernels for "
            r"cpu and 2:4: bitmask, csr16, gather, scipy_csr, torch_csr",
        ),
        (
            ["eval.speed.rows_many=8", "eval.speed.rows_prefill=4"],
            r"eval.speed.rows_prefill=4 is below eval.speed.rows_many=8",
        ),
        (
            ["eval.speed.kernels=[csr_16]"],
            r"unknown eval.speed kernel 'csr_16' \(did you mean 'csr16'",
        ),
        (
            ["model.dtype=float8"],
            r"model option 'dtype' is 'float8'; valid: float32, float16, bfloat16",
        ),
        (["logger.mode=foo"], r"logger option 'mode' is 'foo'; valid: online, offline, disabled"),
        (["resume=maybe"], r"resume must be true or false, got 'maybe'"),
        (["save.enabled=yes"], r"save option 'enabled' must be true or false, got 'yes'"),
        (
            ["schedule=cubic", "schedule.ramp.initial=1.5"],
            r"schedule.ramp option 'initial' must be < 1",
        ),
        (["calib_batch=0"], r"calib_batch must be >= 1"),
        (["device=mps"], r"device=mps is not supported by sparsebench \(valid here: auto, cpu"),
    ],
)
def test_every_option_is_validated(overrides, message):
    with pytest.raises(SparsebenchError, match=message):
        build_specs(compose(TINY + overrides))


def test_noop_options_warn_once(caplog):
    build_specs(compose(TINY + ["method=wanda", "schedule=cubic", "save.dir=/tmp/x"]))
    build_specs(compose(TINY + ["method=elsa", "calib_batch=4"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("calib_batch=4 does nothing for 'elsa'" in w for w in warnings)
    assert any("does nothing for the one-shot method 'wanda'" in w for w in warnings)
    assert any("save.enabled=false" in w for w in warnings)


# ----------------------------------------------------------------------------- saves


def test_save_dir_never_deletes_what_is_not_ours(tmp_path, monkeypatch):
    import sparsebench.record as runmod

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    monkeypatch.setattr(runmod, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(
        SparsebenchError, match=r"save.dir .*mine already holds files sparsebench did not write"
    ):
        run(
            compose(TINY + ["method=wanda", "save.enabled=true", f"save.dir={mine}"]),
            tmp_path / "run",
        )
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    monkeypatch.undo()

    # a new folder is written; the same run may replace its own export; another run may not
    export = tmp_path / "export"
    run(compose(TINY + ["method=wanda", "save.enabled=true", f"save.dir={export}"]), tmp_path / "a")
    run(
        compose(TINY + ["method=wanda", "save.enabled=true", f"save.dir={export}", "resume=false"]),
        tmp_path / "a",
    )
    with pytest.raises(SparsebenchError, match="already holds an export of another run"):
        run(
            compose(TINY + ["method=magnitude", "save.enabled=true", f"save.dir={export}"]),
            tmp_path / "b",
        )
    assert json.loads((export / "sparsebench.json").read_text())["method"] == "wanda"


def test_sweep_with_one_save_dir_gets_a_folder_per_job(tmp_path, capsys):
    export = tmp_path / "export"
    code, err = _cli(
        [
            "-m",
            *TINY,
            "method=magnitude,wanda",
            "save.enabled=true",
            f"save.dir={export}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        capsys,
    )
    assert code == 0, err
    metas = sorted(json.loads(p.read_text())["method"] for p in export.glob("*/sparsebench.json"))
    assert metas == ["magnitude", "wanda"]


# ----------------------------------------------------------------------------- sweeps


def test_a_failed_job_does_not_end_the_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_:
        cli.main(
            ["-m", *TINY, "method=sparsegpt", "method.percdamp=-1,0.01", f"hydra.sweep.dir={sweep}"]
        )
    printed = capsys.readouterr()
    assert exit_.value.code == 1
    assert "option 'percdamp' must be > 0" in printed.err and "Traceback" not in printed.err
    assert (
        "sparsebench sweep: 1 done, 0 skipped (already complete), 1 failed" in printed.out
    )  # ... but counts
    assert "failed: tiny-llama_sparsegpt_0.5_unstructured_none_" in printed.out
    assert f"table and plots: sparsebench-report {sweep}" in printed.out
    status = sorted(_results(p.parent)["status"] for p in sweep.glob("tiny-llama_*/results.json"))
    # the refused job is recorded in the sweep (status and error), for the report
    assert status == ["complete", "refused"]
    assert len(list(sweep.glob("tiny-llama_*"))) == 2


def test_extending_a_sweep_runs_only_the_new_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert (
        _cli(
            ["-m", *TINY, "method=magnitude", "sparsity=0.5,0.7", f"hydra.sweep.dir={sweep}"],
            capsys,
        )[0]
        == 0
    )
    before = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    assert len(before) == 3
    assert (
        _cli(
            ["-m", *TINY, "method=magnitude", "sparsity=0.5,0.6,0.7", f"hydra.sweep.dir={sweep}"],
            capsys,
        )[0]
        == 0
    )
    after = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    assert len(after) == 4 and all(after[k] == v for k, v in before.items())
    rows = report.table(report.load_results(sweep))
    assert sorted(r["sparsity"] for r in rows) == [0.0, 0.5, 0.6, 0.7]


def test_a_held_folder_is_never_run_twice(tmp_path, capsys, caplog):
    from sparsebench.records.ledger import LOCK, FolderBusy

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "then"})
        )
        with pytest.raises(FolderBusy, match=rf"is being run by pid {holder.pid}"):
            run(compose(TINY + ["method=magnitude"]), out)
        assert not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is taken over with a warning
    assert run(compose(TINY + ["method=magnitude"]), out)["status"] == "complete"
    assert "no longer running" in caplog.text and not (out / LOCK).exists()


@pytest.mark.e2e  # long end to end: make test-e2e
def test_two_concurrent_sweeps_run_each_job_once(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "sparsebench.cli",
        "-m",
        *TINY,
        "method=magnitude,wanda,sparsegpt",
        "sparsity=0.5,0.7",
        f"hydra.sweep.dir={sweep}",
    ]
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = sorted(sweep.glob("*/run.log"))
    assert len(logs) == 7  # 6 jobs + one dense baseline
    for log in logs:  # every job pruned and evaluated exactly once, by one of the two
        assert log.read_text().count("wikitext2 perplexity") == 1, log


# ----------------------------------------------------------------------------- interrupts


FINALIZER = """
import signal
# Ctrl-C raises KeyboardInterrupt, as in a terminal: a suite started in the background (`&`)
# hands its children SIGINT ignored, and the signal sent again would be dropped by the kernel
signal.signal(signal.SIGINT, signal.default_int_handler)
from sparsebench.errors import Interrupted, catch_interrupts
catch_interrupts()  # as cli.main does
class Finalized:
    def __del__(self):
        raise {exc}  # the signal's exception, raised while a finalizer runs
import time
try:
    Finalized()
    end = time.monotonic() + 30  # the signal comes again 0.01 s later
    while time.monotonic() < end:
        pass
    print("lost")
except (KeyboardInterrupt, Interrupted) as err:
    print("interrupted by", type(err).__name__)
"""


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "Interrupted('SIGTERM')"])
def test_a_signal_that_lands_in_a_finalizer_is_delivered_again(exc):
    """Python drops an exception raised in `__del__` (the tokenizer's regex objects have one):
    Ctrl-C there was once lost and the sweep ran on. The hook sends the signal again."""
    proc = subprocess.run(
        [sys.executable, "-c", FINALIZER.format(exc=exc)], capture_output=True, text=True
    )
    assert proc.stdout.strip() == f"interrupted by {exc.split('(')[0]}", proc.stderr[-2000:]


@pytest.mark.e2e  # long end to end: make test-e2e
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_ends_the_sweep_with_one_line(tmp_path, sig, code):
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sparsebench.cli",
            "-m",
            *TINY,
            "method=magnitude",
            "sparsity=0.3,0.5,0.7",
            "eval.max_windows=null",
            "dense_baseline=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the first job is evaluating
        found = [
            json.loads(p.read_text())
            for p in sweep.glob("tiny-llama_*/results.json")
            if p.stat().st_size
        ]
        if any("sparsity" in r and r["status"] == "running" for r in found):
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code
    name = signal.Signals(sig).name
    assert (
        err.strip().splitlines()[-1]
        == f"sparsebench: interrupted ({name}); the running job's results.json records it"
    )
    assert "Traceback" not in err
    recs = [json.loads(p.read_text()) for p in sweep.glob("tiny-llama_*/results.json")]
    assert len(recs) == 1 and recs[0]["status"] == "failed" and recs[0]["reason"] == "interrupted"
    assert (
        recs[0]["error"] == f"interrupted ({name})" and "sparsity" in recs[0]
    )  # what was measured is kept


# ----------------------------------------------------------------------------- smoke budgets


@pytest.mark.e2e  # long end to end: make test-e2e
def test_tiny_protocol_shrinks_training_budgets(tmp_path, capsys):
    """Every training method is a smoke run on the tiny protocol; an explicit value wins."""
    specs = build_specs(compose(TINY + ["method=elsa_l"]))
    assert specs.pruner.steps == 4
    assert build_specs(compose(TINY + ["method=elsa_l", "method.steps=6"])).pruner.steps == 6
    assert (
        build_specs(compose(["method=elsa_l"])).pruner.steps == 4096
    )  # the published recipe elsewhere
    assert build_specs(compose(TINY + ["method=safe_plus"])).pruner.epochs == 1
    start = time.time()
    sweep = tmp_path / "sweep"
    code, err = _cli(
        [
            "-m",
            *TINY,
            "method=elsa_l,safe_plus,sparsegpt",
            "sparsity=0.3,0.5,0.7",
            f"hydra.sweep.dir={sweep}",
        ],
        capsys,
    )
    assert code == 0, err
    assert time.time() - start < 150
    recs = [_results(p.parent) for p in sweep.glob("tiny-llama_*/results.json")]
    assert len(recs) == 9 and all(r["status"] == "complete" for r in recs)
    steps = {
        r["config"]["method"]["name"]: r.get("method_report", {}).get("steps_run") for r in recs
    }
    assert steps["elsa_l"] == 4 and steps["safe_plus"] == 2  # one epoch of 1 batch x 2 blocks


def test_help_text_lists_groups_and_examples():
    proc = subprocess.run(
        [sys.executable, "-m", "sparsebench.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("sparsebench: prune a causal LM")
    for needle in (
        "method=",
        "elsa_l",
        "protocol=",
        "sparsebench -m method=",
        "sparsebench-report",
    ):
        assert needle in proc.stdout
    assert "Powered by Hydra" not in proc.stdout
