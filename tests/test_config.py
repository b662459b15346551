"""Every config file composes, and every composed config builds valid specs."""

import pytest

from sparsebench.errors import SparsebenchError
from sparsebench.registry import METHODS
from sparsebench.specs import build_specs

from .conftest import CONF, compose

GROUPS = ["model", "method", "recover", "schedule", "data", "eval", "logger", "protocol"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_file_composes(group, option):
    overrides = [f"{group}={option}"]
    if option == "local" and group == "model":
        overrides.append("model.path=/some/folder")
    if (group, option) == ("schedule", "evopress"):  # the released search scores 65536 tokens:
        with pytest.raises(SparsebenchError, match="lower the tokens"):  # more than the CPU
            build_specs(compose(overrides))  # protocol's 64 windows of 512 hold
        overrides.append("protocol=paper")
    cfg = compose(overrides)
    specs = build_specs(cfg)
    assert specs.sparsity == (0.0 if specs.pruner.name == "dense" else 0.5)


def test_method_files_match_registry():
    # every registered method has a file of its own name; presets name a registered method
    assert set(METHODS.names()) <= set(options("method"))
    for option in options("method"):
        assert compose([f"method={option}"]).method.name in METHODS.names()


def test_default_is_offline_smollm2_wanda():
    cfg = compose()
    assert (cfg.model.name, cfg.method.name, cfg.sparsity, cfg.data.source) == (
        "smollm2-135m",
        "wanda",
        0.5,
        "local",
    )
    assert cfg.protocol == "cpu" and cfg.data.nsamples == 64 and cfg.eval.max_windows == 64
    assert cfg.logger.mode == "offline"


def test_models_choose_protocols_and_cli_wins():
    assert compose(["model=llama2-7b"]).protocol == "paper"
    assert compose(["model=tiny-llama"]).protocol == "tiny"
    cfg = compose(["model=llama2-7b", "protocol=cpu", "data.nsamples=7"])
    assert cfg.protocol == "cpu" and cfg.data.nsamples == 7


def test_nm_override_and_paper_models():
    specs = build_specs(compose(["pattern=2:4", "method=sparsegpt"]))
    assert str(specs.pattern) == "2:4" and specs.pruner.group == "block:128+1"
    for name in [
        "llama2-7b",
        "llama2-13b",
        "llama3-8b",
        "mistral-7b",
        "qwen2.5-7b",
        "opt-1.3b",
        "gemma2-2b",
    ]:
        assert compose([f"model={name}"]).model.source == "hub"


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert (
        cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        and cfg.hydra.launcher.gpus_per_node == 1
    )
