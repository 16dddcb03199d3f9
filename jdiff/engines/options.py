"""The engines jdiff knows and the options each one takes (``engine.*``), without importing either framework.

Each engine declares its options as one typed dataclass: :class:`TorchOptions`, :class:`JittorOptions`. The
config schema types ``conf/engine/<option>.yaml`` by its engine's dataclass (registered as ``<name>_schema`` in
the ``engine`` group, see :func:`jdiff.config.register_configs`), so an option the chosen engine does not have
fails while Hydra composes the config. The values are checked by one method per class, :meth:`problem`, which
:mod:`jdiff.validate` and :func:`jdiff.engines.base.create_engine` both call (through :func:`engine_options`).
What needs the runtime (is Triton importable, does ``device=auto`` find a CUDA GPU) is checked by the engine
when it is built.

This module imports no deep-learning framework: the config is composed and checked without one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from jdiff.devices import DeviceError, parse_device


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1): how tests run them without a
    GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class EngineOptionError(ValueError):
    """An engine, option or option value that cannot work; the message is one line naming the key and the fix."""


def _invalid(key: str, value, need: str) -> str:
    return f"engine.{key}={value!r} is invalid: {need}."


def _one_of(key: str, value, allowed) -> Optional[str]:
    return None if value in allowed else _invalid(key, value, f"use one of {', '.join(map(str, allowed))}")


@dataclass
class EngineOptions:
    """The options every engine takes. A subclass per engine sets ``name`` and adds its own options."""

    name: str  # the engine: each engine's subclass sets it
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    mixed_precision: str = "no"  # no (float32) or a half precision the engine supports; LoRA weights stay fp32
    allow_pickle: bool = False  # load .bin (pickle) weights when no .safetensors exist
    # torch: torch.compile the UNet and the VAE encoder with this mode (no, default, reduce-overhead:
    # + CUDA graphs, max-autotune; the first steps compile, minutes on a GPU), or cuda-graphs: no compiler,
    # the whole training step and each sampling UNet call recorded as CUDA graphs (seconds; GPU only).
    # jittor: no, or replay: the training step and each sampling UNet call planned by Jittor's executor once and
    # replayed from the recorded plan (no Python, no re-planning; CPU or GPU).
    compile: str = "no"

    def problem(self) -> Optional[str]:
        """The first option value this engine cannot run with, as one line naming the key, the value and the
        fix; None when every value can work. The one place the values of ``engine.*`` are checked."""
        if not isinstance(self.allow_pickle, bool):
            return _invalid("allow_pickle", self.allow_pickle, "true or false")
        try:
            parse_device(self.device, "engine.device")
        except DeviceError as err:
            return str(err)
        return None


@dataclass
class TorchOptions(EngineOptions):
    """``engine=torch``: PyTorch + diffusers + peft (jdiff/engines/torch)."""

    name: str = "torch"
    # CPU threads for the tensor work; null: every core this process may use. CPU results depend on it
    # (reductions split differently), so it is part of a run's numerical config.
    threads: Optional[int] = None
    # GroupNorm by PyTorch (native) or by jdiff's Triton kernels (triton: statistics split over many blocks,
    # channels-last kept; CUDA only), and the UNet and VAE in channels-last memory format.
    group_norm: str = "native"
    channels_last: bool = False

    MIXED_PRECISION = ("no", "bf16", "fp16")
    COMPILE = ("no", "default", "reduce-overhead", "max-autotune", "cuda-graphs")
    GROUP_NORMS = ("native", "triton")

    def problem(self) -> Optional[str]:
        shared = super().problem()
        if shared:
            return shared
        if self.mixed_precision not in self.MIXED_PRECISION:
            return _one_of("mixed_precision", self.mixed_precision, self.MIXED_PRECISION)
        if self.compile == "replay":
            return _invalid("compile", self.compile,
                            "replay is the Jittor engine's: use engine=jittor, or cuda-graphs for the torch engine")
        if self.compile not in self.COMPILE:
            return _one_of("compile", self.compile, self.COMPILE)
        # device=auto on a machine without a GPU is the engine's to refuse (TorchEngine: it needs torch.cuda)
        if self.compile == "cuda-graphs" and str(self.device) == "cpu":
            return _invalid("compile", self.compile,
                            "CUDA graphs need a GPU: use engine.compile=no with engine.device=cpu")
        if self.group_norm not in self.GROUP_NORMS:
            return _one_of("group_norm", self.group_norm, self.GROUP_NORMS)
        # Whether Triton is installed, and a device=auto that finds no GPU, are the engine's to refuse
        # (TorchEngine._convolution_layout: they need the runtime)
        if self.group_norm == "triton" and str(self.device) == "cpu" and not triton_interpreting():
            return _invalid("group_norm", self.group_norm,
                            "the Triton GroupNorm runs on CUDA GPUs: use engine.group_norm=native with "
                            "engine.device=cpu")
        if not isinstance(self.channels_last, bool):
            return _invalid("channels_last", self.channels_last, "true or false")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            return _invalid("threads", self.threads, "a thread count >= 1, or null for every core")
        return None


@dataclass
class JittorOptions(EngineOptions):
    """``engine=jittor``: jdiff's native Stable Diffusion in Jittor (jdiff/engines/jittor). Jittor's CPU kernels
    take no thread count from jdiff, and it has no GroupNorm or memory-format choice: no such options."""

    name: str = "jittor"

    MIXED_PRECISION = ("no", "fp16")
    COMPILE = ("no", "replay")

    def problem(self) -> Optional[str]:
        shared = super().problem()
        if shared:
            return shared
        if self.mixed_precision not in self.MIXED_PRECISION:
            return _invalid("mixed_precision", self.mixed_precision,
                            "the Jittor engine runs in float32 (no) or fp16: use one of those, or engine=torch for "
                            "bf16")
        if self.compile not in self.COMPILE:
            return _invalid("compile", self.compile,
                            "the Jittor engine runs eagerly (no) or replays recorded execution plans (replay): use "
                            "one of those")
        return None


@dataclass(frozen=True)
class EngineEntry:
    """An engine in the registry: its options, and where its class is (imported only when an engine is built)."""

    options: type
    module: str
    cls: str


# name -> the engine; conf/engine/<option>.yaml starts with `defaults: [<name>_schema, _self_]`
ENGINES: dict[str, EngineEntry] = {
    "jittor": EngineEntry(JittorOptions, "jdiff.engines.jittor.engine", "JittorEngine"),
    "torch": EngineEntry(TorchOptions, "jdiff.engines.torch.engine", "TorchEngine"),
}


def option_names(options: type) -> list[str]:
    """The options of an engine's dataclass, ``name`` (the engine itself) left out."""
    return [f.name for f in dataclasses.fields(options) if f.name != "name"]


def unknown_option(engine: str, key: str) -> str:
    """The message for ``engine.<key>``, which the ``engine`` engine does not have: whose option it is, what
    this engine has, and what to do."""
    has = ", ".join(option_names(ENGINES[engine].options))
    owners = [name for name, entry in ENGINES.items() if key in option_names(entry.options)]
    if owners:
        return (f"engine.{key} is a {' and '.join(owners)} engine option; the {engine} engine has: {has}. Drop "
                f"engine.{key}, or choose the {owners[0]} engine (engine={owners[0]}).")
    return f"engine.{key} is not an option of the {engine} engine, which has: {has}. Drop engine.{key} or fix its name."


def engine_options(name: str, values: Mapping[str, Any]) -> EngineOptions:
    """The ``name`` engine's options from ``values`` (option -> value; ``name`` may be among them), checked: an
    unknown engine, an option it does not have or a value that cannot work raises :class:`EngineOptionError`."""
    if name not in ENGINES:
        raise EngineOptionError(f"engine.name={name!r} is invalid: use one of {', '.join(ENGINES)} "
                                f"(engine={' or engine='.join(ENGINES)}).")
    entry = ENGINES[name]
    values = {key: value for key, value in values.items() if key != "name"}
    known = set(option_names(entry.options))
    for key in values:
        if key not in known:
            raise EngineOptionError(unknown_option(name, key))
    options = entry.options(**values)
    problem = options.problem()
    if problem:
        raise EngineOptionError(problem)
    return options
