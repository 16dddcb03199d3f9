"""Hydra callbacks, registered under ``hydra.callbacks`` in ``conf/config.yaml``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class RunGuard(Callback):
    """Before a single run writes anything (Hydra's record included), refuse a config that cannot work or a run
    folder the run may not use (a finished run, somebody else's folder): one line on stderr, exit code 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from jdiff.pipeline import USER_ERRORS, check_before_run

        try:
            check_before_run(config)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


class SweepGuard(Callback):
    """Before a sweep starts: how many jobs and which GPUs (read by the launcher before any job could check them),
    and a sweep folder that is new or a sweep's own. One line on stderr and exit code 2 otherwise."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from jdiff.report import ReportError, check_sweep_folder
        from jdiff.validate import ConfigError, check_placement

        try:
            check_placement(config)
            check_sweep_folder(Path(str(config.hydra.sweep.dir)))
        except (ConfigError, ReportError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


class SweepReport(Callback):
    """At the end of every multirun, write the sweep's report (``jdiff.report``) into the sweep folder. A sweep
    whose folder holds a run that is not complete (failed, unfinished, broken) says so in one line on stderr and
    ends with exit code 1, so that a script or a scheduler does not take it for a finished sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from jdiff.report import status_counts, write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            runs = write_report(sweep_dir)
        except Exception as err:  # a report problem must not turn a finished sweep into a failed one
            log.error("could not write the sweep report into %s: %s (retry: python -m jdiff.report %s)",
                      sweep_dir, err, sweep_dir)
            return
        log.info("sweep report (%d runs): %s", len(runs), sweep_dir / "report.html")
        counts = status_counts(runs)
        if counts["complete"] < len(runs):
            others = ", ".join(f"{n} {status}" for status, n in counts.items() if n and status != "complete")
            print(f"error: {len(runs) - counts['complete']} of the sweep's {len(runs)} runs did not complete "
                  f"({others}); {sweep_dir / 'report.html'} says why. The same command with "
                  f"{relaunch_override(sweep_dir)} runs the failed and unfinished ones again.", file=sys.stderr)
            sys.exit(1)


def relaunch_override(sweep_dir: Path) -> str:
    """The override that launches a sweep into ``sweep_dir`` again: ``sweep.name=`` for the usual multirun/NAME
    (a name made of the start time too), else ``hydra.sweep.dir=`` the folder."""
    parts = sweep_dir.parts
    if len(parts) > 1 and parts[0] == "multirun":
        return "sweep.name=" + "/".join(parts[1:])
    return f"hydra.sweep.dir={sweep_dir}"
