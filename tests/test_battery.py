"""A battery of bad inputs and faults, each through the real command (in this process).

Every case ends in one of two ways: exit code != 0 with exactly one `sparsebench: error:`
line on stderr and no traceback, or a correct complete run. In both, nothing outside the
run folder changes and no results.json is left "running".
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparsebench import cli
from sparsebench.data import resolve_root

TINY = ["model=tiny-llama", "logger=disabled"]
DATA_FILES = (
    "wikitext-2-raw-v1/wiki.test.raw",
    "wikitext-2-raw-v1/wiki.valid.raw",
    "c4/c4_validation_2k.parquet",
)


def _copy_data(dst: Path) -> Path:
    src = resolve_root(None)
    for rel in DATA_FILES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    return dst


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One pruned tiny model exported by sparsebench, copied by the cases that break it."""
    folder = tmp_path_factory.mktemp("export") / "model"
    cli_run(
        TINY
        + [
            "method=wanda",
            "save.enabled=true",
            f"save.dir={folder}",
            f"hydra.run.dir={folder.parent / 'run'}",
        ]
    )
    assert (folder / "sparsebench.json").is_file()
    return folder


def cli_run(argv):
    try:
        cli.main(list(argv))
        return 0
    except SystemExit as err:
        return err.code


# ----------------------------------------------------------------------------- the cases
# Each: (id, setup) where setup(tmp) -> (argv, expected). expected is a regex that the one
# error line must match, or "complete" for a fault that must be absorbed correctly.


def data_fault(break_it):
    def setup(tmp):
        root = _copy_data(tmp / "data")
        break_it(root)
        return TINY + ["method=wanda", f"data.root={root}"], None

    return setup


def _truncate(path: Path, keep: int):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _no_text_column(root: Path):
    pq.write_table(pa.table({"body": ["x"] * 2000}), root / "c4/c4_validation_2k.parquet")


def _local(folder):
    return [
        "model=local",
        f"model.path={folder}",
        "model.seqlen=64",
        "protocol=tiny",
        "method=dense",
        "logger=disabled",
    ]


def _run_dir_is_file(t: Path):
    (t / "afile").write_text("x")
    return TINY + [
        f"hydra.run.dir={t / 'afile' / 'run'}"
    ], r"output folder .*afile/run: .*afile is a file"


def _save_dir_foreign(t: Path):
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("keep")
    return TINY + [
        "save.enabled=true",
        f"save.dir={t / 'mine'}",
    ], r"already holds files sparsebench did not write"


def _save_dir_is_file(t: Path):
    (t / "f.bin").write_text("x")
    return TINY + [
        "save.enabled=true",
        f"save.dir={t / 'f.bin'}",
    ], r"save.dir .*f.bin is a file, not a folder"


CASES = [
    # --- the command line and the config
    (
        "unknown-method",
        lambda t: (
            TINY + ["method=wandaa"],
            r"unknown method 'wandaa' \(did you mean 'wanda'\?\); valid: alps, angular, dense, ",
        ),
    ),
    (
        "unknown-model",
        lambda t: (["model=llama9"], r"unknown model 'llama9'.*valid: .*smollm2-135m"),
    ),
    (
        "unknown-method-key",
        lambda t: (
            TINY + ["method=sparsegpt", "method.blocksz=64"],
            r"unknown key 'method.blocksz' \(did you mean 'blocksize'\?\); valid keys of method: "
            r"blocksize",
        ),
    ),
    (
        "unknown-top-key",
        lambda t: (
            TINY + ["sparsty=0.5"],
            r"unknown key 'sparsty' \(did you mean 'sparsity'\?\); valid keys of the config:",
        ),
    ),
    (
        "sweep-without-m",
        lambda t: (TINY + ["sparsity=0.5,0.7"], r"sparsity=0.5,0.7 lists several values: add -m"),
    ),
    ("malformed-override", lambda t: (TINY + ["sparsity=[0.5"], r"cannot parse the command line")),
    ("sparsity-one", lambda t: (TINY + ["sparsity=1.0"], r"sparsity must be in \[0, 1\), got 1.0")),
    ("sparsity-negative", lambda t: (TINY + ["sparsity=-0.2"], r"sparsity must be in \[0, 1\)")),
    (
        "sparsity-string",
        lambda t: (
            TINY + ["sparsity='0.5 '"],
            r"sparsity must be a number in \[0, 1\), got '0.5 '",
        ),
    ),
    ("nm-ratio", lambda t: (TINY + ["pattern=3:4"], r"ratio 0.5")),
    (
        "nm-with-sparsity",
        lambda t: (TINY + ["pattern=2:4", "sparsity=0.7"], r"fixes sparsity at 0.5"),
    ),
    ("seed-float", lambda t: (TINY + ["seed=1.5"], r"seed must be an integer, got 1.5")),
    (
        "elsa-negative-lr",
        lambda t: (
            TINY + ["method=elsa", "method.lr=-1"],
            r"method 'elsa' option 'lr' must be > 0, got -1.0",
        ),
    ),
    (
        "safe-beta-one",
        lambda t: (
            TINY + ["method=safe", "method.betas=[0.9,1.0]"],
            r"option 'betas' \(entry 1\) must be < 1",
        ),
    ),
    (
        "sparsegpt-zero-damp",
        lambda t: (
            TINY + ["method=sparsegpt", "method.percdamp=0"],
            r"option 'percdamp' must be > 0",
        ),
    ),
    (
        "nsamples-zero",
        lambda t: (TINY + ["data.nsamples=0"], r"data option 'nsamples' must be >= 1"),
    ),
    (
        "seqlen-beyond-model",
        lambda t: (
            TINY + ["model.seqlen=1024"],
            r"model.seqlen=1024 exceeds the maximum of tiny-llama \(256 positions\)",
        ),
    ),
    (
        "dtype-unknown",
        lambda t: (
            TINY + ["model.dtype=float8"],
            r"model option 'dtype' is 'float8'; valid: float32",
        ),
    ),
    (
        "device-mps",
        lambda t: (TINY + ["device=mps"], r"device=mps is not supported by sparsebench"),
    ),
    (
        "device-cuda-absent",
        lambda t: (TINY + ["device=cuda"], r"device=cuda but no CUDA GPU is visible"),
    ),
    (
        "logger-mode",
        lambda t: (
            TINY + ["logger.mode=foo"],
            r"logger option 'mode' is 'foo'; valid: online, offline, disabled",
        ),
    ),
    ("eval-dataset", lambda t: (TINY + ["eval.datasets=[ptb]"], r"unknown eval dataset 'ptb'")),
    (
        "zeroshot-task",
        lambda t: (
            TINY + ["eval=full", "eval.zeroshot.tasks=[boolqq]"],
            r"unknown zero-shot task 'boolqq' \(did you mean 'boolq'\?\)",
        ),
    ),
    (
        "bool-switch",
        lambda t: (TINY + ["resume=maybe"], r"resume must be true or false, got 'maybe'"),
    ),
    # --- data faults
    (
        "data-root-missing",
        lambda t: (TINY + ["data.root=/nonexistent/data"], r"data root not found"),
    ),
    ("c4-missing", data_fault(lambda r: (r / "c4/c4_validation_2k.parquet").unlink())),
    ("wiki-empty", data_fault(lambda r: (r / "wikitext-2-raw-v1/wiki.test.raw").write_text(""))),
    (
        "wiki-whitespace",
        data_fault(lambda r: (r / "wikitext-2-raw-v1/wiki.test.raw").write_text("\n \n\t\n")),
    ),
    (
        "wiki-not-utf8",
        data_fault(
            lambda r: (r / "wikitext-2-raw-v1/wiki.test.raw").write_bytes(b"ok \xff\xfe bad")
        ),
    ),
    (
        "parquet-truncated",
        data_fault(lambda r: _truncate(r / "c4/c4_validation_2k.parquet", 100_000)),
    ),
    ("parquet-no-text", data_fault(_no_text_column)),
    (
        "calib-docs-beyond",
        lambda t: (
            TINY + ["method=wanda", "data.calib_docs=[1100,5000]"],
            r"has 2000 documents; sparsebench reads documents \[0, 5000\)",
        ),
    ),
    # --- folders
    (
        "run-dir-unwritable",
        lambda t: (
            TINY + ["hydra.run.dir=/proc/sparsebench-out"],
            r"output folder /proc/sparsebench-out is not writable",
        ),
    ),
    ("run-dir-is-file", lambda t: _run_dir_is_file(t)),
    ("save-dir-foreign", lambda t: _save_dir_foreign(t)),
    ("save-dir-is-file", lambda t: _save_dir_is_file(t)),
    ("run-dir-other-result", "other-result"),
    # --- saved models
    (
        "local-missing",
        lambda t: (_local(t / "nothing-here"), r"model folder '.*nothing-here' does not exist"),
    ),
    ("export-no-masks", "export:no-masks"),
    ("export-masks-truncated", "export:masks-truncated"),
    ("export-meta-corrupt", "export:meta-corrupt"),
    # --- faults absorbed correctly
    ("results-hand-edited", "complete:results-edited"),
    ("stale-lock", "complete:stale-lock"),
    ("corrupt-cache", "complete:corrupt-cache"),
]


def _setup(case, tmp: Path, export_folder: Path):
    """(argv, expected regex or 'complete') for one case; the run folder is tmp/'run'."""
    out = tmp / "run"
    if callable(case):
        argv, expected = case(tmp)
        if expected is None:  # a data fault: the error must name the broken file
            expected = r"data file .*(wiki.test.raw|c4_validation_2k.parquet)"
        return argv + [f"hydra.run.dir={out}"] if not any(
            a.startswith("hydra.run.dir=") for a in argv
        ) else argv, expected
    kind, _, what = case.partition(":")
    if case == "other-result":
        assert cli_run(TINY + ["method=magnitude", f"hydra.run.dir={out}"]) == 0
        return TINY + [
            "method=wanda",
            f"hydra.run.dir={out}",
        ], r"holds a complete result of another config \(method.name: magnitude -> wanda\)"
    if kind == "export":
        folder = tmp / "model"
        shutil.copytree(export_folder, folder)
        if what == "no-masks":
            (folder / "sparsebench_masks.safetensors").unlink()
            expected = (
                r"is a sparsebench export without sparsebench_masks.safetensors; "
                r"its masks cannot be verified"
            )
        elif what == "masks-truncated":
            _truncate(folder / "sparsebench_masks.safetensors", 50)
            expected = r"sparsebench_masks.safetensors is unreadable"
        else:
            (folder / "sparsebench.json").write_text("{ not json")
            expected = r"sparsebench.json is unreadable"
        return _local(folder) + [f"hydra.run.dir={out}"], expected
    # faults that must be absorbed: the run completes correctly
    if what == "results-edited":
        out.mkdir()
        (out / "results.json").write_text('{"status": "complete", "metr')
    elif what == "stale-lock":
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        out.mkdir()
        (out / ".sparsebench.lock").write_text(
            json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename})
        )
    elif what == "corrupt-cache":
        from sparsebench.models import cache_root

        assert cli_run(TINY + ["method=wanda", f"hydra.run.dir={tmp / 'warm'}"]) == 0
        for path in (cache_root() / "data").glob("*.pt"):
            path.write_bytes(path.read_bytes()[:40])
    return TINY + ["method=wanda", f"hydra.run.dir={out}"], "complete"


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and skip not in path.parents:
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def test_battery_has_30_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("name,case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_or_fault(name, case, tmp_path, export, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs would land here and be seen
    argv, expected = _setup(case, tmp_path, export)
    capsys.readouterr()
    before = _snapshot(tmp_path, tmp_path / "run")
    code = cli_run(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    if expected == "complete":
        assert code == 0, err
        rec = json.loads((tmp_path / "run" / "results.json").read_text())
        assert rec["status"] == "complete" and rec["metrics"]["wikitext2"] > 1
    else:
        assert code not in (0, None)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("sparsebench: error: ") and re.search(expected, lines[0]), lines[
            0
        ]
    assert _snapshot(tmp_path, tmp_path / "run") == before  # nothing outside the run folder changed
    for path in tmp_path.rglob("results.json"):
        assert json.loads(path.read_text())["status"] != "running", path
