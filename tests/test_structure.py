"""The structure the code promises (docs/contributing.md), checked on the code itself: the
methods that work block by block go through the one sequential driver, the layers import
only what their docstrings allow, no module reaches into another's underscore names, the
memory plan knows no method by name, and every file reads in one sitting."""

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from sparsebench.engine import driver

from .conftest import REPO, tiny_spec

PKG = REPO / "sparsebench"


@pytest.fixture
def spy(monkeypatch):
    """Counts the blocks every Sequential driver hands out."""
    seen = []
    real = driver.Sequential.__iter__

    def iterate(self):
        for step in real(self):
            seen.append((self.desc, step.index))
            yield step

    monkeypatch.setattr(driver.Sequential, "__iter__", iterate)
    return seen


def _tiny():
    from sparsebench.models import load_model

    return load_model(tiny_spec("llama"), seed=0)


def test_safe_reconstruction_and_the_owl_probe_run_through_the_shared_driver(spy):
    from sparsebench.allocation import outlier_ratios
    from sparsebench.data import DataSpec
    from sparsebench.pruners import PruneContext
    from sparsebench.pruners.safe import Safe
    from sparsebench.recover import RecoverContext
    from sparsebench.recover.reconstruct import Reconstruct
    from sparsebench.sparsity import Pattern, Schedule

    model, tok = _tiny()
    cpu = torch.device("cpu")
    calib = torch.randint(0, 256, (4, 64))
    ratios = outlier_ratios(model, calib, cpu, 5.0)
    assert [i for d, i in spy if d.startswith("owl")] == [0, 1] and len(ratios) == 2

    masks = Safe(epochs=1, batch_size=2).prune(
        PruneContext(model, 0.5, Pattern(), Schedule(), cpu, calib)
    )
    assert [i for d, i in spy if d == "safe blocks"] == [0, 1]

    rec = Reconstruct(batch_size=2)
    rec.run(
        RecoverContext(
            model, masks, cpu, tok, DataSpec(nsamples=4), 64, load_dense=lambda: _tiny()[0]
        )
    )
    assert [i for d, i in spy if d == "recover reconstruct"] == [0, 1]
    assert rec.report()["steps_run"] > 0


def test_one_shot_methods_run_through_the_shared_driver(spy):
    from sparsebench.pruners import PruneContext
    from sparsebench.pruners.wanda import Wanda
    from sparsebench.sparsity import Pattern, Schedule

    model, _ = _tiny()
    Wanda().prune(
        PruneContext(
            model, 0.5, Pattern(), Schedule(), torch.device("cpu"), torch.randint(0, 256, (2, 64))
        )
    )
    assert [i for d, i in spy] == [0, 1]


# ----------------------------------------------------------------------------- the code itself

# what each folder may import from the package (its __init__ docstring says the same)
# (lowrank: the sparse + low-rank linear the model map knows, OATS's)
FOUNDATIONS = {"errors", "registry", "sparsity", "masks", "models", "data", "lowrank"}
ALLOWED = {
    "engine": FOUNDATIONS | {"engine"},
    "evaluation": FOUNDATIONS | {"engine", "evaluation", "plan", "native"},
    "native": {"errors", "native"},  # the compiled kernel: torch and the compiler only
    "records": {"errors", "registry", "records", "evaluation", "families", "formats", "lowrank"},
    "pruners": FOUNDATIONS | {"engine", "pruners", "plan", "cut"},
    "cut": FOUNDATIONS | {"engine", "cut", "families"},  # the model map: experts, fused parts
    "recover": FOUNDATIONS | {"engine", "recover", "plan"},
    "refine": FOUNDATIONS | {"refine"},
    "quant": FOUNDATIONS | {"engine", "quant"},
}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _package_imports(path: Path, tree: ast.Module) -> set[str]:
    """Top-level parts of sparsebench that `path` imports (relative imports resolved)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    here = parts[:-1]  # the package the module is in (for __init__.py: its own)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level + 1]
            full = base + (node.module.split(".") if node.module else [])
            if len(full) > 1:
                out.add(full[1])
            else:
                out.update(a.name for a in node.names)
    return out


def test_each_layer_imports_only_what_it_may():
    bad = []
    for path, tree in _modules():
        layer = path.relative_to(PKG).parts[0]
        if layer in ALLOWED:
            extra = _package_imports(path, tree) - ALLOWED[layer]
            if extra:
                bad.append(f"{path.relative_to(REPO)} imports {sorted(extra)}")
    assert not bad, bad


def test_no_module_imports_another_modules_underscore_names():
    bad = []
    for root in ("sparsebench", "scripts"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    bad += [
                        f"{path.relative_to(REPO)}:{node.lineno} {a.name}"
                        for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                    ]
    assert not bad, bad


def test_no_file_in_the_package_is_over_450_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long


def test_the_memory_plan_names_no_method():
    """plan/ does the arithmetic of what methods declare (plan_terms): no method or
    recovery name in any of its strings, docstrings included."""
    from sparsebench.recover import RECOVERIES
    from sparsebench.registry import METHODS

    names = [n for n in METHODS.names() + RECOVERIES.names() if n not in ("dense", "none")]
    strings = [
        node.value
        for path in sorted((PKG / "plan").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    found = {
        (n, s[:60]) for s in strings for n in names if re.search(rf"(?i)\b{re.escape(n)}\b", s)
    }
    found |= {("dense", s) for s in strings if s == "dense"}
    assert not found, sorted(found)


def test_a_method_without_plan_terms_is_refused_by_the_plan():
    """A one-shot method that declares no statistic (plan_terms None) is refused with one
    line naming it, never planned without its statistics."""
    from dataclasses import dataclass

    from sparsebench.errors import SparsebenchError
    from sparsebench.launch import memory_plan
    from sparsebench.pruners.wanda import Wanda
    from sparsebench.specs import build_specs

    from .conftest import compose

    @dataclass
    class Undeclared(Wanda):
        statistic = None

    Undeclared.name = "undeclared"
    specs = build_specs(compose(["model=tiny-llama", "logger=disabled", "dry_run=true"]))
    specs.pruner = Undeclared()
    with pytest.raises(
        SparsebenchError, match=r"^method 'undeclared' declares no memory-plan terms.*plan_terms"
    ):
        memory_plan(specs, 1)


@pytest.mark.parametrize(
    "case,method,extra", [("wanda", "wanda", {}), ("finetune", "wanda", {"recovery": "finetune"})]
)
def test_the_entry_point_on_a_loaded_model_gives_the_commands_numbers(case, method, extra):
    """pipeline.prune_model on a model object the caller loaded runs the command's stages:
    the same masks and perplexities as `sparsebench model=tiny-llama method=...` (the golden
    record of that command), bit for bit where the golden environment is this one."""
    import sys

    from sparsebench.data import DataSpec
    from sparsebench.pipeline import prune_model

    sys.path.insert(0, str(REPO / "scripts"))
    import golden

    model, tok = _tiny()
    opts = {"recover_options": {"steps": 2}} if extra else {}  # as the golden case: recover.steps=2
    out = prune_model(
        model,
        tok,
        method=method,
        sparsity=0.5,
        data=DataSpec(nsamples=8),
        seqlen=64,
        evaluate=("wikitext2", "c4"),
        max_windows=4,
        **extra,
        **opts,
    )
    want = json.loads(golden.GOLDEN.read_text())
    assert out.sparsity["pruned_params"] == want["cases"][case]["pruned_params"]
    assert out.budget["prune"]["calib_tokens"] == 8 * 64 and out.timings_s["prune"] >= 0
    if want["environment"] == golden.environment():
        assert golden.digest(out.masks) == want["cases"][case]["masks"]
        assert repr(out.metrics["wikitext2"]) == want["cases"][case]["wikitext2"]
        assert repr(out.metrics["c4"]) == want["cases"][case]["c4"]


def test_the_worked_example_of_contributing_md_runs_from_the_cli_and_is_planned(tmp_path):
    """The method of docs/contributing.md, its two code blocks saved as the files they name in
    a copy of the package and conf/, is found without editing a list, planned by dry_run
    (with its statistic) and run by the command with exact sparsity."""
    import shutil
    import subprocess
    import sys

    text = (REPO / "docs" / "contributing.md").read_text()
    blocks = re.findall(
        r"```(?:python|yaml)\n# ((?:sparsebench|conf)/[\w/.]+)\n(.*?)```", text, re.S
    )
    assert [path for path, _ in blocks] == ["sparsebench/pruners/ria.py", "conf/method/ria.yaml"]
    for part in ("sparsebench", "conf"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    for path, body in blocks:
        (tmp_path / path).write_text(f"# {path}\n{body}")
    script = (
        "import sys\n"
        "from sparsebench import cli\n"
        "for argv in (['dry_run=true'], ['hydra.run.dir=run']):\n"
        "    try:\n"
        "        cli.main(['model=tiny-llama', 'logger=disabled', 'method=ria'] + argv)\n"
        "    except SystemExit as err:\n"
        "        if err.code: sys.exit(err.code)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)
    from sparsebench.data import resolve_root

    env["SPARSEBENCH_DATA_ROOT"] = str(resolve_root(None))  # the copy has no ../shared beside it
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "statistics: input norms (float32)" in out.stdout and "verdict: fits" in out.stdout
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "complete" and res["config"]["method"]["name"] == "ria"
    assert res["sparsity"]["actual_sparsity"] == 0.5 and res["metrics"]["wikitext2"] > 0
