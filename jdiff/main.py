"""``python -m jdiff.main [overrides]``: compose the config with Hydra, validate it, run the stages.

    python -m jdiff.main experiment=demo
    python -m jdiff.main style=03 lora.unet_rank=32
    python -m jdiff.main -m style=00,01 lora.unet_rank=4,32
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from jdiff.config import register_configs
from jdiff.data import StyleDataError
from jdiff.engines.base import EngineError
from jdiff.models import ModelNotFoundError
from jdiff.pipeline import run
from jdiff.validate import ConfigError

log = logging.getLogger("jdiff")
USER_ERRORS = (ConfigError, StyleDataError, ModelNotFoundError, EngineError)

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """The Hydra task: returns the final score, so sweepers (Optuna) can maximise it."""
    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
