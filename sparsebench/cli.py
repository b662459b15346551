"""The `sparsebench` command: Hydra composes conf/, run.py does the work."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .errors import SparsebenchError

# conf/ sits beside the package in the repository (installed editable: `make install`).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from .run import run  # heavy imports after Hydra has parsed the command line

    # A killed job (SIGTERM from kill, SLURM, a launcher) unwinds like an error, so its
    # results.json says "failed" and keeps everything measured before the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"terminated by signal {signum}"))
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    try:
        results = run(cfg, Path(hc.runtime.output_dir), sweep_dir)
    except SparsebenchError as err:
        logging.getLogger("sparsebench").error("%s", err)
        print(f"sparsebench: error: {err}", file=sys.stderr)
        sys.exit(2)
    return results["metrics"].get("wikitext2")


if __name__ == "__main__":
    main()
