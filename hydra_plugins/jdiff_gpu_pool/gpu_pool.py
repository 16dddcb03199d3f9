"""``hydra/launcher=gpu_pool``: Hydra's joblib launcher, with the sweep's class images made first and, with
``sweep.pack`` != 1, the jobs planned into packs (:func:`jdiff.sweep.plan_launch`).

Before the jobs start, :func:`jdiff.prior_plan.plan_sweep` generates the class images every run of the batch
of jobs needs, once each, in large batches spread over the sweep's GPUs; then the jobs run as the joblib
launcher runs them (``jdiff.sweep.run_sweep_job`` in each). Kept small: Hydra imports its plugins on every command.
"""

from __future__ import annotations

import logging
from typing import Sequence

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

log = logging.getLogger(__name__)


class GpuPoolLauncher(JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from hydra.core.utils import configure_log

        from jdiff.prior_plan import compose_jobs, plan_sweep
        from jdiff.sweep import plan_launch

        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        composed = compose_jobs(self.config, self.hydra_context.config_loader, job_overrides)  # once, for both plans
        try:
            plan_sweep(self.config, composed)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # the runs make their class images themselves, as without a plan
            log.warning("the sweep's class-image plan failed (%s: %s); each run makes what it needs", type(err).__name__, err)
        order = plan_launch(self.config, composed, job_overrides, initial_job_idx)
        returns = super().launch([job_overrides[i] for i in order], initial_job_idx)
        ordered: list = [None] * len(order)  # in the order of the jobs given, as the sweeper expects
        for position, i in enumerate(order):
            ordered[i] = returns[position]
        return ordered
