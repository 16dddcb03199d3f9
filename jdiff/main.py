"""``python -m jdiff.main [overrides]``: compose the config with Hydra, validate it, run the stages.

    python -m jdiff.main experiment=demo
    python -m jdiff.main style=03 lora.unet_rank=32
    python -m jdiff.main -m style=00,01 lora.unet_rank=4,32       # a sweep: see jdiff/sweep.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from jdiff.config import register_configs
from jdiff.pipeline import USER_ERRORS, run
from jdiff.sweep import register_resolvers, run_sweep_job

log = logging.getLogger("jdiff")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """The Hydra task: returns the final score, so sweepers (Optuna) can maximise it."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_sweep_job(cfg, run_dir, label=f"#{hydra_cfg.job.num}")
    try:
        return run(cfg, run_dir)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    # Start the task under its importable name: launchers pickle it by reference, so each job process
    # imports jdiff.main (and so registers the schema and resolvers) rather than receiving a copy of it.
    from jdiff.main import main as task

    task()
