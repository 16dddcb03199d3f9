"""The command line's own help and completion: ``--help`` names every config group and every key of the schema
with its meaning in a screenful; Hydra's completion query offers the groups' options. (The ``jdiff`` command and
the installed package: tests/test_install.py.)"""

from __future__ import annotations

from dataclasses import fields

from conftest import CONF, jdiff_cli

from jdiff.config import HELP, JdiffConfig
from jdiff.help import GROUP_COLUMN, KEY_COLUMN, PRESET_HELP, WIDTH, config_groups

GROUPS = ("model", "engine", "lora", "prior", "augment", "init", "inject", "train", "infer", "score", "data",
          "experiment", "search")
KEYS = [f.name for f in fields(JdiffConfig)]


def test_every_key_of_the_schema_and_every_group_has_a_one_line_meaning():
    assert list(HELP) == KEYS  # in the schema's order, none missing, none stale
    assert set(config_groups()) == set(GROUPS)
    for group in GROUPS:
        assert (group in KEYS) != (group in PRESET_HELP), group  # a group's meaning is its key's, or a preset's
    for key, text in [*HELP.items(), *PRESET_HELP.items()]:  # each fits on its line
        column = GROUP_COLUMN if key in GROUPS else KEY_COLUMN
        assert text and "\n" not in text and len(text) <= WIDTH - column, text


def test_help_shows_the_groups_and_the_keys_with_their_meanings(tmp_path):
    done = jdiff_cli(["--help"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    lines = text.rstrip("\n").splitlines()
    assert 30 < len(lines) < 80 and max(map(len, lines)) <= WIDTH, text
    assert "Powered by Hydra" not in text and "== Config ==" not in text  # not Hydra's page with the whole YAML
    starts = [line.strip() for line in lines]
    for group in GROUPS:  # the option in use, its meaning, the options on the next line: conf/<group>/*.yaml
        (at,) = [i for i, line in enumerate(starts) if line.startswith(f"{group}=")]
        meaning = HELP.get(group) or PRESET_HELP[group]
        assert meaning in lines[at]
        assert starts[at + 1] == "options: " + " ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
    for key in KEYS:  # key=value (a nested key's own keys), then its meaning on that line or the next
        (at,) = [i for i, line in enumerate(starts) if line.startswith((f"{key}=", f"{key}."))]
        assert HELP[key] in lines[at] or HELP[key] == starts[at + 1], key
    assert "model=sd21 " in text and "engine=jittor " in text and "experiment=null " in text
    assert "style=??? " in text and "seed=42 " in text and "stages=[prior,train,generate,score]" in text
    assert "paths.root=. paths.cache=${paths.root}/data/cache" in text  # interpolations as written, $ and all
    assert 'eval "$(jdiff --shell-completion install=bash)"' in text


def test_help_shows_the_options_and_values_the_overrides_chose(tmp_path):
    done = jdiff_cli(["experiment=demo", "engine=torch", "seed=7", "lora=unet_te", "--help"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    starts = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and line.strip()]
    for chosen in ("experiment=demo", "engine=torch", "model=tiny", "data=demo", "lora=unet_te", "style=00", "seed=7"):
        assert chosen in starts, chosen
    assert list(tmp_path.iterdir()) == []  # help writes nothing


def completions(line: str, tmp_path, monkeypatch) -> list[str]:
    """What Hydra's bash completion gets for the command line ``line``: ``jdiff -sc query=bash`` with COMP_LINE."""
    monkeypatch.setenv("COMP_LINE", line)
    monkeypatch.setenv("COMP_POINT", str(len(line)))
    done = jdiff_cli(["-sc", "query=bash"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_completion_offers_a_groups_options_and_its_keys(tmp_path, monkeypatch):
    offered = completions("jdiff engine=", tmp_path, monkeypatch)
    assert {"engine=jittor", "engine=jittor_fast", "engine=torch", "engine=torch_fast"} <= set(offered)
    assert all(word.startswith("engine=") for word in offered)
    presets = completions("jdiff style=03 experiment=", tmp_path, monkeypatch)
    assert {"experiment=demo", "experiment=rank_grid"} <= set(presets)
    # the keys of the engine chosen earlier on the line
    keys = completions("jdiff engine=torch engine.", tmp_path, monkeypatch)
    assert "engine.group_norm=" in keys and "engine.threads=" in keys
