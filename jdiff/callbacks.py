"""Hydra callbacks, registered under ``hydra.callbacks`` in ``conf/config.yaml``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """At the end of every multirun, write the sweep's report (``jdiff.report``) into the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from jdiff.report import write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            runs = write_report(sweep_dir)
        except Exception as err:  # a report problem must not turn a finished sweep into a failed one
            log.error("could not write the sweep report into %s: %s (retry: python -m jdiff.report %s)",
                      sweep_dir, err, sweep_dir)
            return
        log.info("sweep report (%d runs): %s", len(runs), sweep_dir / "report.html")
