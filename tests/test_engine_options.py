"""Each engine declares its options (jdiff/engines/options.py): the registry, the typed engine configs, one check.

An option the chosen engine does not have fails at composition, in one line; the values are checked by the
engine's options class alone, for jdiff.validate and create_engine alike; none of it imports a framework.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, REPO, assert_one_line_error, compose_config, jdiff_cli
from jdiff.config import explain_composition_error, register_configs
from jdiff.engines.base import EngineError, create_engine
from jdiff.engines.options import (ENGINES, EngineOptions, JittorOptions, TorchOptions, engine_options,
                                   option_names)
from jdiff.validate import ConfigError, validate_config

ENGINE_CONFIGS = sorted(p.stem for p in (CONF / "engine").glob("*.yaml"))


# -- the registry, without a framework ---------------------------------------------------------------------


def test_the_registry_names_each_engine_by_its_options_and_its_class():
    assert set(ENGINES) == {"torch", "jittor"}
    for name, entry in ENGINES.items():
        assert entry.options().name == name
        # the engine class is where the registry says, found without importing its framework
        source = REPO / (entry.module.replace(".", "/") + ".py")
        classes = {n.name: n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ClassDef)}
        assert entry.cls in classes, f"{source} defines no class {entry.cls}"
        init = next(f for f in classes[entry.cls].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        assert [a.arg for a in init.args.args] == ["self", "model_dir", "options"]
        assert [a.arg for a in init.args.kwonlyargs] == ["prediction_type", "deterministic"]


def test_options_are_each_engines_own():
    assert option_names(TorchOptions) == ["device", "mixed_precision", "allow_pickle", "compile", "threads",
                                          "group_norm", "channels_last"]
    assert option_names(JittorOptions) == ["device", "mixed_precision", "allow_pickle", "compile"]


def test_composing_and_checking_the_engine_options_imports_no_framework(tmp_path):
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(REPO / 'tests')!r})
from conftest import compose_config
from jdiff.engines.base import EngineError, create_engine
from jdiff.validate import validate_config
validate_config(compose_config(["experiment=demo", "engine=torch_fast"], Path({str(tmp_path)!r})))
try:
    create_engine("jittor", Path("nowhere"), group_norm="triton")
except EngineError as err:
    print(err)
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "jittor", "diffusers", "transformers", "triton"}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "engine.group_norm is a torch engine option" in lines[0]
    assert lines[-1] == "[]", done.stdout


# -- conf/engine/*.yaml are typed by their engine's options ------------------------------------------------


@pytest.fixture
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


@pytest.mark.parametrize("option", ENGINE_CONFIGS)
def test_each_engine_config_composes_into_its_engines_dataclass(hydra_conf, option):
    engine = compose("config", overrides=["style=00", f"engine={option}"]).engine
    stated = OmegaConf.to_container(OmegaConf.load(CONF / "engine" / f"{option}.yaml"))
    schema = stated.pop("defaults")[0]
    entry = ENGINES[schema.removesuffix("_schema")]
    assert OmegaConf.get_type(engine) is entry.options
    # the dataclass's defaults, and what the option states on top: nothing else (a value chosen by the machine,
    # ${jdiff.on_gpu:...}, as it resolves here)
    stated = {key: engine[key] if str(value).startswith("${") else value for key, value in stated.items()}
    assert OmegaConf.to_object(engine) == entry.options(**stated)


@pytest.mark.parametrize("gpus, overrides, want", [
    ("", [], ("no", "no")),  # no GPU: float32, eager
    ("0", [], ("fp16", "replay")),  # a GPU: the fast path
    ("0,1", ["engine.device=cuda:1"], ("fp16", "replay")),
    ("0", ["engine.device=cpu"], ("no", "no")),  # asked for the CPU on a GPU machine
    ("0", ["engine.mixed_precision=no"], ("no", "replay")),  # asked for float32
    ("0", ["engine.mixed_precision=no", "engine.compile=no"], ("no", "no")),
    ("", ["engine.device=cuda"], ("fp16", "replay")),  # asked for the GPU: validation checks it is there
])
def test_engine_jittor_takes_the_fast_path_on_a_gpu(hydra_conf, monkeypatch, gpus, overrides, want):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
    engine = compose("config", overrides=["style=00", "engine=jittor", *overrides]).engine
    assert (engine.mixed_precision, engine.compile) == want
    options = OmegaConf.to_object(engine)
    assert isinstance(options, JittorOptions) and options.problem() is None


def test_the_plain_engine_configs_are_their_dataclasses_defaults(hydra_conf):
    assert OmegaConf.to_object(compose("config", overrides=["style=00", "engine=torch"]).engine) == TorchOptions()
    # on a machine without a GPU; with one, engine=jittor takes the fast path (the test below)
    assert OmegaConf.to_object(compose("config", overrides=["style=00", "engine=jittor"]).engine) == JittorOptions()
    assert OmegaConf.to_object(compose("config", overrides=["style=00"]).engine) == JittorOptions()  # the default


def test_the_options_every_engine_takes_have_one_default():
    shared = {f.name: f.default for f in dataclasses.fields(EngineOptions) if f.name != "name"}
    assert shared == {"device": "auto", "mixed_precision": "no", "allow_pickle": False, "compile": "no"}
    for entry in ENGINES.values():
        options = entry.options()
        assert {key: getattr(options, key) for key in shared} == shared
        assert options.problem() is None  # the defaults can run


@pytest.mark.parametrize("override", ["engine.group_norm=triton", "engine.threads=2", "engine.channels_last=true"])
def test_an_option_the_engine_lacks_fails_at_composition(hydra_conf, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException) as info:
        compose("config", overrides=["style=00", "engine=jittor", override])
    message = explain_composition_error(info.value)
    assert message is not None and "\n" not in message
    assert message.startswith(f"{key} is a torch engine option; the jittor engine has: device, mixed_precision, ")
    assert "engine=torch" in message


def test_an_unknown_engine_option_is_named_as_unknown(hydra_conf):
    with pytest.raises(ConfigCompositionException) as info:
        compose("config", overrides=["style=00", "engine=torch", "engine.fast=true"])
    assert explain_composition_error(info.value) == (
        "engine.fast is not an option of the torch engine, which has: device, mixed_precision, allow_pickle, "
        "compile, threads, group_norm, channels_last. Drop engine.fast or fix its name.")


def test_other_composition_errors_are_left_to_hydra(hydra_conf):
    with pytest.raises(ConfigCompositionException) as info:
        compose("config", overrides=["style=00", "lora.unet_rnk=4"])
    assert explain_composition_error(info.value) is None


# -- the command line: one line, before anything is written -------------------------------------------------


@pytest.mark.parametrize(("override", "words"), [
    ("engine.group_norm=triton", ("engine.group_norm is a torch engine option", "the jittor engine has: device",
                                  "engine=torch")),
    ("engine.threads=2", ("engine.threads is a torch engine option", "the jittor engine has: device", "engine=torch")),
    ("+engine.threads=2", ("engine.threads is a torch engine option", "engine=torch")),
    ("engine.mixed_precision=bf16", ("engine.mixed_precision='bf16'", "fp16", "engine=torch for bf16")),
])
def test_cli_refuses_what_the_jittor_engine_cannot_do_in_one_line(tmp_path, override, words):
    done = jdiff_cli(["experiment=demo", "engine=jittor", override], tmp_path)
    assert_one_line_error(done, *words)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a run folder


def test_score_cli_refuses_an_option_the_engine_lacks_in_one_line(tmp_path):
    done = jdiff_cli([tmp_path, "engine=jittor", "engine.group_norm=triton"], tmp_path, module="jdiff.score")
    assert_one_line_error(done, "engine.group_norm is a torch engine option", "engine=torch")


def test_cli_prints_the_jittor_engines_config(tmp_path, monkeypatch):
    for gpus, chosen in (("", {}), ("0", {"mixed_precision": "fp16", "compile": "replay"})):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
        done = jdiff_cli(["--cfg", "job", "--resolve", "engine=jittor"], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        engine = OmegaConf.create(done.stdout).engine
        assert OmegaConf.to_container(engine) == dataclasses.asdict(JittorOptions(**chosen))


# -- one check of the values, for validate_config and create_engine alike -------------------------------------

BAD = [
    ("jittor", "mixed_precision", "bf16", "engine.mixed_precision='bf16' is invalid: the Jittor engine runs in"),
    ("jittor", "compile", "cuda-graphs", "engine.compile='cuda-graphs' is invalid: the Jittor engine runs eagerly"),
    ("jittor", "device", "gpu", "engine.device='gpu' is invalid: use auto, cpu, cuda or cuda:N"),
    ("torch", "mixed_precision", "fp8", "engine.mixed_precision='fp8' is invalid: use one of no, bf16, fp16"),
    ("torch", "compile", "replay", "engine.compile='replay' is invalid: replay is the Jittor engine's"),
    ("torch", "compile", "fast", "engine.compile='fast' is invalid: use one of no, default"),
    ("torch", "group_norm", "apex", "engine.group_norm='apex' is invalid: use one of native, triton"),
    ("torch", "threads", 0, "engine.threads=0 is invalid: a thread count >= 1"),
]


@pytest.mark.parametrize(("engine", "key", "value", "message"), BAD, ids=[f"{e}-{k}={v}" for e, k, v, _ in BAD])
def test_validate_and_create_engine_give_the_same_message(jdiff_root, tmp_path, engine, key, value, message):
    cfg = compose_config(["experiment=demo", f"engine={engine}"], jdiff_root)
    OmegaConf.update(cfg, f"engine.{key}", value, merge=False)
    with pytest.raises(ConfigError) as validated:
        validate_config(cfg)
    with pytest.raises(EngineError) as created:
        create_engine(engine, tmp_path, **{key: value})
    assert str(validated.value) == str(created.value)
    assert str(created.value).startswith(message)


def test_cross_key_rules_of_the_engine_options(jdiff_root, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    for changes, message in (({"compile": "cuda-graphs"}, "CUDA graphs need a GPU"),
                             ({"group_norm": "triton"}, "engine.group_norm=native with engine.device=cpu")):
        with pytest.raises(EngineError, match=message):
            create_engine("torch", tmp_path, device="cpu", **changes)
        assert TorchOptions(device="cuda", **changes).problem() is None  # on a GPU they can work


def test_create_engine_refuses_an_option_the_engine_lacks_by_name(tmp_path):
    with pytest.raises(EngineError) as info:
        create_engine("jittor", tmp_path, group_norm="triton")
    assert str(info.value).startswith("engine.group_norm is a torch engine option; the jittor engine has: device, ")
    with pytest.raises(EngineError, match="engine.threads is a torch engine option"):
        create_engine("jittor", tmp_path, device="cpu", threads=2)
    with pytest.raises(EngineError, match="engine.name='tensorflow' is invalid: use one of jittor, torch"):
        create_engine("tensorflow", tmp_path)


def test_engine_options_builds_the_dataclass(tmp_path):
    assert engine_options("torch", {"name": "torch", "threads": 2}) == TorchOptions(threads=2)
    assert engine_options("jittor", {"compile": "replay"}) == JittorOptions(compile="replay")


def test_validate_refuses_options_added_around_the_schema(jdiff_root):
    # `+engine.threads=2` adds the key past the schema; validation still refuses it, naming it
    cfg = compose_config(["experiment=demo", "engine=jittor", "+engine.threads=2"], jdiff_root)
    with pytest.raises(ConfigError, match="engine.threads is a torch engine option; the jittor engine has"):
        validate_config(cfg)


def test_validate_refuses_an_engine_name_that_is_not_the_options(jdiff_root):
    cfg = compose_config(["experiment=demo", "engine=jittor", "engine.name=torch"], jdiff_root)
    with pytest.raises(ConfigError, match="the engine options are the jittor engine's.*engine=torch"):
        validate_config(cfg)


def test_a_sweep_runs_config_is_typed_by_its_engine_again(jdiff_root, tmp_path):
    from jdiff.job import load_config

    for engine, options in (("jittor", JittorOptions), ("torch_fast", TorchOptions)):
        cfg = compose_config(["experiment=demo", f"engine={engine}"], jdiff_root)
        (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        loaded = load_config(Path(tmp_path))
        assert OmegaConf.get_type(loaded.engine) is options
        assert OmegaConf.to_object(loaded.engine) == OmegaConf.to_object(cfg.engine)
        validate_config(loaded)
