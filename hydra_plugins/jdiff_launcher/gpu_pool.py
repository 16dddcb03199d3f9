"""jdiff's sweep launcher (``hydra/launcher=gpu_pool``, the default): Hydra's joblib launcher, which first plans
the sweep's packs when ``sweep.pack`` is not 1 (:func:`jdiff.sweep.plan_launch`). Hydra takes launchers only from
the ``hydra_plugins`` package, hence this module."""

from __future__ import annotations

from typing import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class GpuPoolLauncher(JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from jdiff.sweep import plan_launch

        order = plan_launch(self.config, self.hydra_context.config_loader, job_overrides, initial_job_idx)
        returns = super().launch([job_overrides[i] for i in order], initial_job_idx)
        ordered: list = [None] * len(order)
        for position, i in enumerate(order):
            ordered[i] = returns[position]
        return ordered
