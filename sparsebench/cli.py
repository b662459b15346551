"""The `sparsebench` command: Hydra composes conf/, run.py does the work.

Around Hydra, this file keeps the command's promises:
- `sparsebench --help` is sparsebench's own help (groups, options, examples);
- every job of the command line is composed once before anything runs, so an unknown
  key, group option or malformed override is one line naming the valid ones (exit 2);
- in a sweep a job that fails is recorded (results.json "failed") and the sweep goes
  on; at the end the command exits 1 naming the failed jobs;
- Ctrl-C and SIGTERM end the run or the sweep with one line (exit 130 / 143), the
  running job's results.json saying "interrupted".
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .errors import Interrupted, SparsebenchError, catch_interrupts, one_line
from .records import ledger  # noqa: F401  (registers the sb_job resolver that names sweep folders)
from .registry import did_you_mean

# conf/ sits beside the package in the repository (installed editable: `make install`).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MULTIRUN_FLAGS = ("-m", "--multirun")
FAILED: list[str] = []  # jobs of this sweep that failed, for the closing line
SWEEP: dict[str, object] = {}  # the sweep's folder and its jobs' outcomes, for the closing summary

log = logging.getLogger("sparsebench")


DOES_NOT_FIT = 3  # exit code of a dry run whose plan does not fit


def remove_if_left_empty(folder: Path) -> None:
    """A refused command or a dry run leaves nothing behind: Hydra made the run folder (and,
    under the working directory, maybe its dated parents such as outputs/<date>/) before the
    job started; remove each that is still empty. Outside the working directory only the
    run folder itself."""
    cwd = Path.cwd().resolve()
    path = Path(folder).resolve()
    while True:
        try:
            path.rmdir()  # fails unless empty
        except OSError:
            return
        path = path.parent
        if path == cwd or cwd not in path.parents:
            return


def _fail(message: str, code: int = 2):
    print(f"sparsebench: error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _task(cfg: DictConfig) -> float | None:
    from .run import run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out = Path(hc.runtime.output_dir)
    from .records.summary import run_summary
    from .run import OUTCOMES

    if multirun:
        SWEEP["dir"] = Path(hc.sweep.dir)
    try:
        results = run(cfg, out, Path(hc.sweep.dir) if multirun else None)
    except ledger.FolderBusy as err:
        remove_if_left_empty(out)
        if not multirun:
            _fail(str(err))
        OUTCOMES[str(out)] = "busy"
        print(f"sparsebench: skipped: {err}", file=sys.stderr)
        return None
    except Exception as err:
        known = isinstance(err, SparsebenchError)
        text = str(err) if known else one_line(err)
        where = "" if known else f" (traceback in {out / 'results.json'})"
        if not multirun:
            remove_if_left_empty(out)  # refused before any work: nothing was written there
            _fail(text + where, 2 if known else 1)
        if not (out / "results.json").exists():  # refused before any work: the sweep keeps it
            ledger.record_refused(out, text, cfg, list(hc.overrides.task))
            where = f" (recorded in {out / 'results.json'})"
        FAILED.append(f"{out.name}: {text}")
        OUTCOMES[str(out)] = "failed"
        print(
            f"sparsebench: job {out.name} failed: {text}{where}; the sweep goes on", file=sys.stderr
        )
        return None
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 records and reports
        return None
    if "fits" in results:  # dry_run: the plan and its verdict were the output; nothing written
        remove_if_left_empty(out)
        if not results["fits"]:
            if not multirun:
                sys.exit(DOES_NOT_FIT)
            FAILED.append(f"{out.name}: dry run: {results['verdict']}")
        return None
    from .run import WANDB_LINES

    extra = [WANDB_LINES[str(out)]] if str(out) in WANDB_LINES else []
    if OUTCOMES.get(str(out)) == "skipped":
        print(
            f"sparsebench: {out} already holds this run's complete result (resume=false runs it "
            "again)"
        )
    if multirun:  # one line a job; the sweep's summary and the report say the rest
        m = results.get("metrics") or {}
        ppl = ", ".join(
            f"{k} {m[k]:.4f}" for k in ("wikitext2", "c4") if isinstance(m.get(k), (int, float))
        )
        print(
            f"sparsebench: job {out.name}: {ppl or results.get('evaluation', 'no evaluation')}",
            flush=True,
        )
    else:
        print(run_summary(results, out / "results.json", extra), flush=True)
    return results["metrics"].get("wikitext2")


# ----------------------------------------------------------------------------- help


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def help_text() -> str:
    names = "model method refine recover protocol data eval schedule logger".split()
    groups = {g: _options(g) for g in names}
    width = max(map(len, groups)) + 1
    lines = [
        "sparsebench: prune a causal LM with one method at one sparsity, evaluate it, record "
        "results.json.",
        "",
        "usage: sparsebench [-m] [GROUP=OPTION ...] [KEY=VALUE ...]",
        "",
        "Config groups (GROUP=OPTION):",
        *(f"  {g + '=':<{width + 1}} {', '.join(opts)}" for g, opts in groups.items()),
        "",
        "Keys (KEY=VALUE):",
        "  sparsity=0.5            fraction of zeros in every pruned linear, in [0, 1)",
        "  pattern=unstructured    unstructured | 2:4 | 4:8 (N:M fixes sparsity at 0.5)",
        "  seed=0  device=auto     auto | cpu | cuda | cuda:N",
        "  method.<option>=...     a method's options (see conf/method/<name>.yaml)",
        "  model.seqlen=...  data.nsamples=...  data.root=...  eval.max_windows=...",
        "  save.enabled=true save.dir=<new or empty folder>   export the pruned model",
        "  save.format=dense       dense | bitmask (kept values + 1-bit masks; docs/speed.md)",
        "  eval.speed.enabled=true decode and prefill, dense and sparse kernels side by side",
        "  eval.speed.kernels=[csr16] eval.speed.batch_sizes=[1,8] eval.speed.repeats=3",
        "  resume=true             skip a folder holding this run's complete result",
        "  dry_run=true world_size=4   print the memory plan and exit (hub models plan from "
        "model.arch: no download)",
        "  hydra.run.dir=...  hydra.sweep.dir=...   where results go",
        "",
        "Examples:",
        "  sparsebench                                            # SmolLM2-135M, Wanda, 50%, "
        "offline",
        "  sparsebench method=sparsegpt sparsity=0.7",
        "  sparsebench method=wanda pattern=2:4 model=gemma3-270m",
        "  sparsebench -m method=magnitude,wanda,sparsegpt sparsity=0.5,0.7 "
        "hydra.sweep.dir=sweeps/s",
        "  sparsebench method=sparsegpt sparsity=0.9 recover=finetune_cpu   # elsa_cpu's control",
        "  sparsebench model=llama2-7b method=elsa dry_run=true world_size=4 device=cuda",
        "  sparsebench-report sweeps/s --by-tokens                # table + plots of a sweep",
        "  sparsebench --cfg job method=sparsegpt                 # print the composed config",
        "",
        "Hydra's own help: sparsebench --hydra-help. README.md has the rest.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------- the command line, checked once


def _node_keys(cfg, dotted: str) -> list[str]:
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, dotted) if dotted else cfg
    return sorted(str(k) for k in node.keys()) if hasattr(node, "keys") else []


def _explain(err: Exception, job: list[str], compose) -> str:
    """One line for a composition error: the bad key or option and the valid ones."""
    text = str(err)
    cause = err.__cause__ or err
    missing = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", text)
    if missing and (CONF_DIR / missing.group(1)).is_dir():
        group, name = missing.groups()
        opts = _options(group)
        return f"unknown {group} '{name}'{did_you_mean(name, opts)}; valid: {', '.join(opts)}"
    override = re.search(r"Could not override '([^']+)'", text)
    key = override.group(1) if override else getattr(cause, "full_key", None)
    if key and ("not in struct" in str(cause) or "Could not override" in text):
        parent, _, leaf = str(key).rpartition(".")
        rest = [o for o in job if not o.lstrip("+~").split("=")[0].startswith(str(key))]
        try:
            valid = _node_keys(compose(rest), parent)
        except Exception:
            valid = []
        where = f"{parent}" if parent else "the config"
        valid_keys = ", ".join(valid) or "(none)"
        return (
            f"unknown key '{key}'{did_you_mean(leaf, valid)}; valid keys of {where}: {valid_keys}"
        )
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return f"{first} (see sparsebench --help)"


def _check_output_root(folder: str) -> None:
    """The nearest existing folder of a run or sweep folder must take a file, before Hydra
    creates anything (a read-only place is one line, not a traceback from Hydra)."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        _fail(
            f"output folder {folder}: {path} is a file; set hydra.run.dir (hydra.sweep.dir) to a "
            "folder"
        )
    try:
        probe = path / f".sparsebench-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        _fail(
            f"output folder {folder} is not writable ({path}: {err.strerror}); set hydra.run.dir "
            f"(hydra.sweep.dir for -m) to a writable folder"
        )


# Hydra's own flags (sparsebench passes them through); those that take the next word as value
HYDRA_FLAGS = {
    "-m",
    "--multirun",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--hydra-help",
    "--resolve",
    "--package",
    "-p",
    "--run",
    "-r",
    "--shell-completion",
    "-sc",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
TAKES_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
}


def version_text() -> str:
    from importlib import metadata

    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"sparsebench {v('sparsebench')} (torch {v('torch')}, transformers {v('transformers')})"


def check_habits(argv: list[str]) -> None:
    """Other tools' habits (`--method wanda`, `sparsity 0.5`) get one line saying what
    sparsebench takes (key=value), not Hydra's usage or a parse error."""
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        nxt = (
            argv[i + 1]
            if i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]
            else None
        )
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            if flag in HYDRA_FLAGS:
                skip = flag in TAKES_VALUE and "=" not in arg and nxt is not None
                continue
            key = flag.lstrip("-").replace("-", "_")
            value = arg.split("=", 1)[1] if "=" in arg else (nxt or "...")
            _fail(
                f"unknown option {flag}: sparsebench takes key=value, e.g. {key}={value} (see "
                "sparsebench --help)"
            )
        if "=" not in arg and not arg.startswith("~"):
            _fail(
                f"'{arg}' has no value: sparsebench takes key=value, e.g. {arg}={nxt or '...'} "
                "(see sparsebench --help)"
            )


def check_appended_keys(overrides: list[str], base) -> None:
    """`+key=value` adds a key Hydra did not have: refused unless sparsebench reads it (a model's
    free-form `model.arch.*` values, Hydra's own `hydra.*`); a group's own keys are checked when
    the run's options are built."""
    top_keys = sorted(str(k) for k in base.keys() if str(k) != "hydra")
    for o in overrides:
        if not o.startswith("+") or o.startswith("++"):
            continue
        key = o.lstrip("+").split("=", 1)[0]
        top = key.split(".")[0]
        if top == "hydra" or top in top_keys:
            continue
        _fail(
            f"unknown key '{key}'{did_you_mean(top, top_keys)}: sparsebench reads no such key; "
            "valid top-level "
            f"keys: {', '.join(top_keys)}"
        )


def precheck(argv: list[str]) -> None:
    """Compose every job of the command line (as Hydra will) and stop on the first error."""
    if any(a.startswith("-") and a not in MULTIRUN_FLAGS for a in argv):
        return  # --cfg, --info, --config-dir, ...: Hydra's own modes
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    overrides = [a for a in argv if not a.startswith("-")]
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        _fail(f"cannot parse the command line: {str(err).splitlines()[0]}")
    if multirun:
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    else:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            _fail(f"{sweeps[0]} lists several values: add -m to run a sweep")
        jobs = [overrides]

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def compose(job):
            return hydra_compose("config", overrides=job, return_hydra_config=True)

        check_appended_keys(overrides, compose([]))
        for job in jobs[:500]:
            try:
                cfg = compose(job)
            except Exception as err:
                _fail(_explain(err, job, compose))
        try:
            root = OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
        except Exception as err:
            _fail(f"hydra output folder cannot be resolved: {str(err).splitlines()[0]}")
    _check_output_root(str(root))


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return
    if "--version" in argv:
        print(version_text())
        return
    check_habits(argv)
    precheck(argv)
    # A killed job (SIGTERM from kill, SLURM, a launcher) unwinds like Ctrl-C: its
    # results.json says "failed" (interrupted) and keeps everything measured before.
    catch_interrupts()
    FAILED.clear()
    SWEEP.clear()
    from .run import BASELINES, OUTCOMES, WANDB_LINES

    for record in (OUTCOMES, BASELINES, WANDB_LINES):
        record.clear()
    sys.argv = [sys.argv[0] or "sparsebench", *argv]
    try:
        _task()
    except (KeyboardInterrupt, Interrupted) as err:
        name = "SIGINT" if isinstance(err, KeyboardInterrupt) else str(err)
        print(
            f"sparsebench: interrupted ({name}); the running job's results.json records it",
            file=sys.stderr,
        )
        sys.exit(130 if name == "SIGINT" else 128 + int(getattr(signal, name, signal.SIGTERM)))
    if SWEEP.get("dir") is not None:
        from .records.summary import sweep_summary
        from .run import BASELINES, OUTCOMES

        jobs = {k: v for k, v in OUTCOMES.items() if k not in BASELINES}
        print(
            sweep_summary(
                Path(str(SWEEP["dir"])),
                [k for k, v in jobs.items() if v == "done"],
                [k for k, v in jobs.items() if v in ("skipped", "busy")],
                FAILED,
                {k: v for k, v in BASELINES.items()},
            ),
            flush=True,
        )
    if FAILED:
        sys.exit(1)


if __name__ == "__main__":
    main()
