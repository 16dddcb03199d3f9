"""``python -m jdiff.main [overrides]``: compose the config with Hydra, validate it, run the stages.

    python -m jdiff.main experiment=demo
    python -m jdiff.main style=03 lora.unet_rank=32
    python -m jdiff.main -m style=00,01 lora.unet_rank=4,32       # a sweep: see jdiff/sweep.py

The ``jdiff`` command (pyproject.toml's console script, :func:`cli`) is the same: ``jdiff style=03``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from jdiff.confdir import CONF_DIR
from jdiff.config import register_configs
from jdiff.help import register_help
from jdiff.pipeline import USER_ERRORS, run
from jdiff.sweep import register_resolvers, run_sweep_job

log = logging.getLogger("jdiff")

register_configs()
register_resolvers()
register_help()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """The Hydra task: returns the final score, so sweepers (Optuna) can maximise it."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        try:
            return run_sweep_job(cfg, run_dir, label=f"#{hydra_cfg.job.num}", sweep_dir=Path(str(hydra_cfg.sweep.dir)))
        except KeyboardInterrupt:
            stop(f"interrupted: the sweep stopped; {run_dir} and the runs not started yet are unfinished. Launch the "
                 f"same command with sweep.name={cfg.sweep.name} to resume (finished runs are kept).", 130)
    try:
        return run(cfg, run_dir)
    except USER_ERRORS as err:
        stop(f"error: {err}", 2)
    except OSError as err:  # the disk, not jdiff: a full disk, a read-only folder, a file where a folder should be
        where = f" ({err.filename})" if err.filename else ""
        stop(f"error: {err.strerror or err}{where}. Free some space, or make that place a writable folder (the run "
             f"writes to hydra.run.dir, caches to paths.cache={cfg.paths.cache}); then run the same command with "
             f"hydra.run.dir={run_dir} to resume (the run is unfinished).", 1)
    except KeyboardInterrupt:
        stop(f"interrupted: {run_dir} is unfinished; run the same command with hydra.run.dir={run_dir} to resume.",
             130)


def report_composition_errors_in_one_line() -> None:
    """A composition error that jdiff can say in one line (:func:`jdiff.config.explain_composition_error`) ends the
    process like any other bad config: one ``error:`` line on stderr, exit code 2; the others as Hydra reports
    them. Hydra has no hook for it, so its reporter, which every command line goes through, is wrapped
    (``hydra._internal.utils.run_and_report``, hydra-core 1.3). HYDRA_FULL_ERROR=1 still gets Hydra's traceback."""
    from hydra._internal import utils as hydra_utils
    from hydra.errors import ConfigCompositionException

    from jdiff.config import explain_composition_error

    report = getattr(hydra_utils, "run_and_report", None)
    if report is None or getattr(report, "jdiff_wrapped", False):
        return

    def run_and_report(func):
        def explained():
            try:
                return func()
            except ConfigCompositionException as err:
                message = explain_composition_error(err)
                if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                stop(f"error: {message}", 2)

        return report(explained)

    run_and_report.jdiff_wrapped = True
    hydra_utils.run_and_report = run_and_report


def stop(message: str, code: int) -> None:
    """End the run with one line on stderr (the run's log gets it too), and ``code``."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logging.makeLogRecord({"name": "jdiff", "levelno": logging.ERROR, "levelname": "ERROR",
                                                  "msg": message}))
    print(message, file=sys.stderr)
    sys.exit(code)


def register_launcher() -> None:
    """Make the sweep launcher known to Hydra by name. Hydra finds plugins by listing the ``hydra_plugins``
    namespace's folders; an editable install (``pip install -e``) serves ``hydra_plugins.jdiff_gpu_pool`` through
    an import hook that listing does not see, so a sweep started outside the checkout would stop at "Unknown
    plugin class"."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.jdiff_gpu_pool.gpu_pool import GpuPoolLauncher

    Plugins.instance().register(GpuPoolLauncher)


def cli() -> None:
    """The command line: ``jdiff [overrides]`` (the console script) and ``python -m jdiff.main [overrides]``."""
    report_composition_errors_in_one_line()
    register_launcher()
    try:
        main()
    except KeyboardInterrupt:  # before a run began (while the config was composed): nothing was written
        print("interrupted before the run started; nothing was written.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    # Start the task under its importable name: launchers pickle it by reference, so each job process
    # imports jdiff.main (and so registers the schema and resolvers) rather than receiving a copy of it.
    from jdiff.main import cli as command

    command()
