"""``jdiff --help``: the config groups with their options and the option in use, and every key of the schema with
its meaning, in a screenful. Rendered from the composed config by the resolver ``${jdiff.help:}``, which
conf/hydra/help/jdiff.yaml makes Hydra's help template; the meanings are :data:`jdiff.config.HELP`, the groups
and their options the folders of the config tree."""

from __future__ import annotations

import textwrap
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from jdiff.config import HELP, JdiffConfig
from jdiff.confdir import CONF_DIR

# Config groups that are no key of the schema: presets that set keys of other groups.
PRESET_HELP = {
    "experiment": "a preset over groups and keys: the demo, the baseline, the ready-made sweeps (launch/)",
    "search": "a hyperparameter search for -m sweeps (optuna: the best final score)",
}
WIDTH = 118
GROUP_COLUMN, KEY_COLUMN = 24, 34  # where the meanings start
USAGE = """\
jdiff: few-shot style transfer with Stable Diffusion (DreamBooth + LoRA), on Jittor and PyTorch

  jdiff style=03                               train on data/styles/03, generate, score
  jdiff experiment=demo                        the demo: a tiny random model, every stage, on any CPU
  jdiff style=03 engine=torch lora.unet_rank=16 train.steps=400
  jdiff -m style=00,01 lora.unet_rank=4,32     a sweep: every combination, into multirun/
"""
FOOTER = """\
A group's own keys: group.key=value (train.steps=400); see them with jdiff --cfg job --package train.
The whole composed config: jdiff --cfg job [overrides]. Hydra's flags (-m, --cfg, --shell-completion, ...):
jdiff --hydra-help. Shell completion: eval "$(jdiff --shell-completion install=bash)". More: README.md, docs/."""


def config_groups() -> dict[str, list[str]]:
    """Group -> its options: the folders of the config tree and their YAML files, Hydra's own groups left out."""
    return {folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
            for folder in sorted(CONF_DIR.iterdir()) if folder.is_dir() and folder.name != "hydra"}


def group_help(group: str) -> str:
    return HELP.get(group) or PRESET_HELP.get(group) or ""


def show(value: Any) -> str:
    """A value as it would be written on the command line (unresolved: interpolations stay as written)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def row(left: str, meaning: str, column: int) -> str:
    """``left`` padded to ``column``, then ``meaning`` wrapped under itself."""
    lines = textwrap.wrap(meaning, WIDTH - column) or [""]
    first = f"  {left}".ljust(column) if len(left) + 3 <= column else f"  {left}\n" + " " * column
    return first + lines[0] + "".join("\n" + " " * column + line for line in lines[1:])


def render(cfg: DictConfig) -> str:
    """The help text for the composed config ``cfg`` (with its ``hydra`` node, for the options chosen)."""
    data = OmegaConf.to_container(cfg, resolve=False)
    hydra = data.pop("hydra", {}) or {}
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    groups = config_groups()
    keys = [f.name for f in fields(JdiffConfig)]

    out = [USAGE, "Config groups (group=option), with the option in use:"]
    for group, options in groups.items():
        out.append(row(f"{group}={show(choices.get(group))}", group_help(group), GROUP_COLUMN))
        out.append(" " * GROUP_COLUMN + "options: " + " ".join(options))
    out += ["", "Keys (key=value), with their values now:"]
    for key in keys:
        if key in groups:
            continue
        value = data.get(key)
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        left = " ".join(f"{key}{'' if sub is None else '.' + sub}={show(v)}" for sub, v in pairs)
        out.append(row(left, HELP.get(key, ""), KEY_COLUMN))
    out += ["", FOOTER]
    # Hydra fills its template with string.Template: a literal $ (an interpolation's) is written $$.
    return "\n".join(out).replace("$", "$$")


def help_resolver(*, _root_: DictConfig) -> str:
    return render(_root_)


def register_help() -> None:
    if not OmegaConf.has_resolver("jdiff.help"):
        OmegaConf.register_new_resolver("jdiff.help", help_resolver)
