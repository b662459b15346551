import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Tokenized-data and model caches go to a temp folder, never the user's ~/.cache.
    os.environ["SPARSEBENCH_CACHE"] = str(tmp_path_factory.mktemp("sbcache"))
    os.environ.setdefault("WANDB_MODE", "disabled")
    # Two threads (the documented machine) unless `make test-portable` asks for another count:
    # a reduction split over other threads adds in another order.
    torch.set_num_threads(int(os.environ.get("SPARSEBENCH_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _same_threads():
    # A test that runs a rank's body in this process sets one thread (tests/test_fsdp.py); the
    # next test must not inherit it: the thread count decides a reduction's order.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded():
    # Every test draws the same random numbers on every run: a failure reproduces, never flakes.
    torch.manual_seed(0)


def tiny_spec(kind: str = "llama"):
    from omegaconf import OmegaConf

    from sparsebench.models import ModelSpec

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"tiny-{kind}.yaml"))["model"]
    return ModelSpec(**cfg)


@pytest.fixture(params=["llama", "gemma3"])
def tiny_model(request):
    from sparsebench.models import load_model

    model, tok = load_model(tiny_spec(request.param), seed=0)
    return model, tok


def compose(overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


TINY = ["model=tiny-llama", "logger=disabled"]


def run_cli(argv, folder) -> dict:
    """The command with `argv`, its results in `folder`; its results.json (a failure is a
    non-zero exit: the test fails naming the arguments)."""
    import json

    from sparsebench import cli

    try:
        cli.main([*argv, f"hydra.run.dir={folder}"])
    except SystemExit as err:
        assert not err.code, argv
    return json.loads((Path(folder) / "results.json").read_text())


def run_reload(saved, folder) -> dict:
    """The export a run saved in `saved` (save.enabled=true), loaded and evaluated by the
    command (model=local, method=dense): its results.json."""
    reload = ["model=local", f"model.path={Path(saved) / 'model'}", "method=dense"]
    return run_cli([*reload, "logger=disabled"], folder)
