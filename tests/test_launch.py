"""The ready-made sweeps of launch/README.md: each config composes, and the grid it defines expands (the way
Hydra's basic sweeper expands it) to the runs the index promises, each of which composes and validates.
Nothing is run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from jdiff.config import register_configs
from jdiff.validate import validate_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
STYLES = [f"{i:02d}" for i in range(15)]
THREE_STYLES = ["00", "05", "10"]

register_configs()


@pytest.fixture
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def sweep_params(*overrides: str) -> dict:
    """``hydra.sweeper.params`` of the config that ``python -m jdiff.main -m <overrides>`` composes (as in a
    multirun, the swept overrides take no part in that)."""
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides))
             if not o.is_sweep_override()]
    cfg = compose("config", overrides=fixed, return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params or {})


def expand(*overrides: str) -> list[dict]:
    """The jobs of ``python -m jdiff.main -m <overrides>``: the config's grid, then the command line's
    overrides (a swept key there replaces the config's list), as Hydra's basic sweeper expands them."""
    params = [f"{key}={value}" for key, value in sweep_params(*overrides).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(overrides))
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [dict(o.split("=", 1) for o in job) for job in batch]


def grid(jobs: list[dict], key: str) -> list[str]:
    return sorted({job[key] for job in jobs}, key=lambda v: (float(v) if "." in v else int(v), v))


def test_the_index_names_only_configs_that_exist():
    index = (REPO / "launch" / "README.md").read_text()
    commands = re.findall(r"`(python -m jdiff\.main -m [^`]+)`", index)
    assert len(commands) >= 5, commands
    for command in commands:
        for group, option in re.findall(r"\b(experiment|search)=(\w+)", command):
            assert (CONF / group / f"{option}.yaml").exists(), f"{command}: no conf/{group}/{option}.yaml"
    assert not list((REPO / "launch").glob("*.py")), "benchmarks belong in jdiff/bench/"


def test_all_styles_is_seed_best_on_the_15_styles(hydra_conf):
    jobs = expand("experiment=all_styles")
    assert [job["style"] for job in jobs] == STYLES
    assert all(set(job) == {"style", "experiment"} for job in jobs)
    # a style list on the command line replaces the config's
    assert [job["style"] for job in expand("experiment=all_styles", "style=03,07")] == ["03", "07"]


def test_rank_grid_is_five_ranks_on_three_styles(hydra_conf):
    jobs = expand("experiment=rank_grid")
    assert len(jobs) == 15
    assert grid(jobs, "style") == THREE_STYLES and grid(jobs, "lora.unet_rank") == ["4", "8", "16", "32", "64"]
    # with the prior-weight grid on the command line: the old rank x prior grid, 27 runs
    jobs = expand("experiment=rank_grid", "lora.unet_rank=4,16,32", "prior.weight=0.0,0.5,1.0")
    assert len(jobs) == 27 and grid(jobs, "prior.weight") == ["0.0", "0.5", "1.0"]
    assert grid(jobs, "lora.unet_rank") == ["4", "16", "32"]


def test_prior_grid_is_five_weights_on_three_styles(hydra_conf):
    jobs = expand("experiment=prior_grid")
    assert len(jobs) == 15
    assert grid(jobs, "style") == THREE_STYLES
    assert grid(jobs, "prior.weight") == ["0.0", "0.25", "0.5", "1.0", "1.5"]


@pytest.mark.parametrize("experiment", ["all_styles", "rank_grid", "prior_grid"])
def test_every_run_of_a_sweep_composes_as_seed_best_and_validates(hydra_conf, tmp_path, experiment):
    best = compose("config", overrides=["experiment=seed_best", "style=00"])
    for job in expand(f"experiment={experiment}"):
        cfg = compose("config", overrides=[f"{k}={v}" for k, v in job.items()])
        cfg.paths.root = str(tmp_path)
        validate_config(cfg)
        assert cfg.style == job["style"]
        swept = {k for k in job if k not in ("style", "experiment")}
        for key in swept:
            group, name = key.split(".")
            assert str(cfg[group][name]) == job[key]
        for group in ("model", "lora", "prior", "augment", "init", "train", "infer"):  # the rest is seed_best
            ours = {k: v for k, v in cfg[group].items() if f"{group}.{k}" not in swept}
            assert ours == {k: v for k, v in best[group].items() if f"{group}.{k}" not in swept}, group


def test_optuna_search_space(hydra_conf):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose("config", overrides=["search=optuna", "style=03"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower() and sweeper.direction == "maximize" and sweeper.n_trials == 20
    params = {o.get_key_element(): o for o in
              OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])}
    assert set(params) == {"lora.unet_rank", "prior.weight", "init.strength", "train.steps"}
    assert list(params["lora.unet_rank"].sweep_iterator()) == [4, 8, 16, 32, 64]
    assert list(params["train.steps"].sweep_iterator()) == [400, 800, 1200]
    weight, strength = params["prior.weight"].value(), params["init.strength"].value()
    assert (weight.start, weight.end) == (0.0, 1.5) and (strength.start, strength.end) == (0.6, 1.0)
