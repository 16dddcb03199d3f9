"""Tests for the Hydra config tree (conf/), the schema (jdiff/config.py) and jdiff.validate.

Every option of every group must compose and validate; bad values must fail early with a message that
names the key and the value, both through the compose API and through the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from jdiff.config import STAGES, register_configs
from jdiff.lora_file import Adapter, save_adapters
from jdiff.validate import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ("model", "engine", "lora", "prior", "augment", "init", "train", "infer", "score", "data", "experiment")

register_configs()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in _options(g)]


@pytest.fixture
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_cfg(tmp_path: Path, *overrides: str, style: str = "00"):
    cfg = compose("config", overrides=[*overrides, f"style={style}"], return_hydra_config=False)
    cfg.paths.root = str(tmp_path)
    return cfg


def expect_config_error(cfg, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- every option composes and validates -------------------------------------------------------------------


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_validates(hydra_conf, tmp_path, group, option):
    cfg = compose_cfg(tmp_path, f"{group}={option}")
    validate_config(cfg)
    # Everything resolves (no dangling interpolation) and nothing is left MISSING.
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["style"] == "00"
    assert resolved["paths"]["root"] == str(tmp_path)
    assert resolved["data"]["root"].startswith(str(tmp_path))


def test_defaults_are_the_reference_method(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path)
    validate_config(cfg)
    assert list(cfg.stages) == list(STAGES)
    assert cfg.model.name == "sd21"
    assert cfg.lora.unet_rank == 32 and cfg.lora.unet_alpha is None and cfg.lora.text_encoder_rank == 0
    assert cfg.prior.enabled is True
    assert cfg.init.mode == "avg_image" and cfg.init.strength == pytest.approx(0.9)
    assert cfg.augment.crop_scale == pytest.approx(1.04) and cfg.augment.random_crop is True
    assert cfg.data.root == f"{tmp_path}/data/styles"


def test_experiment_baseline_values(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=baseline")
    assert cfg.lora.unet_rank == 4
    assert cfg.lora.text_encoder_rank == 0
    assert cfg.prior.enabled is False
    assert cfg.init.mode == "noise"
    assert cfg.data.train_template == "style_{style}"
    assert cfg.data.infer_template == "{object} in style_{style}"
    # The challenge baseline must be runnable: it has to pass validation too.
    validate_config(cfg)


def test_experiment_seed_best_values(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=seed_best")
    validate_config(cfg)
    assert cfg.model.name == "sd21"
    assert cfg.lora.unet_rank == 32 and cfg.lora.unet_alpha is None and cfg.lora.text_encoder_rank == 0
    assert cfg.prior.enabled is True and cfg.prior.weight == pytest.approx(1.0) and cfg.prior.images_per_object == 8
    assert cfg.init.mode == "avg_image" and cfg.init.strength == pytest.approx(0.9)
    assert cfg.train.steps == 800 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.infer.steps == 40 and cfg.infer.guidance_scale == pytest.approx(7.5)
    assert cfg.augment.crop_scale == pytest.approx(1.04) and cfg.augment.rotate_degrees == 0
    assert cfg.seed == 42


def test_command_line_group_choice_beats_experiment(hydra_conf, tmp_path):
    # Hydra: a group chosen on the command line wins over an experiment's `override /group`, so
    # `experiment=seed_best prior=off` is the ablation it reads as; the experiment's values stay.
    cfg = compose_cfg(tmp_path, "experiment=seed_best", "prior=off", "init=noise")
    validate_config(cfg)
    assert cfg.prior.enabled is False and cfg.init.mode == "noise"
    assert cfg.lora.unet_rank == 32 and cfg.train.steps == 800


def test_experiment_demo_values(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=demo")
    validate_config(cfg)
    assert cfg.model.name == "tiny" and cfg.model.builder == "tiny"
    assert cfg.data.builder == "demo" and cfg.data.resolution == 64
    assert cfg.data.root == f"{tmp_path}/data/cache/demo_styles"
    assert cfg.model.path == f"{tmp_path}/data/cache/models"
    assert cfg.prior.enabled is True and cfg.prior.images_per_object == 1
    assert cfg.train.steps == 30


def test_command_line_override_beats_experiment(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=demo", "lora.unet_rank=16", "train.steps=5")
    assert cfg.lora.unet_rank == 16 and cfg.train.steps == 5


def test_types_are_converted_by_schema(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "infer.origin_scale=1", "train.lr=1e-3", "stages=[prior,train]")
    assert isinstance(cfg.infer.origin_scale, float) and isinstance(cfg.train.lr, float)
    assert list(cfg.stages) == ["prior", "train"]
    validate_config(cfg)


# -- bad input fails at composition ---------------------------------------------------------------------------


def _composition_error_text(err: BaseException) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__
    return "\n".join(parts)


def test_wrong_type_fails_at_compose(hydra_conf, tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(tmp_path, "train.steps=abc")
    text = _composition_error_text(info.value)
    assert "train.steps" in text and "abc" in text


def test_unknown_key_fails_at_compose(hydra_conf, tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(tmp_path, "lora.unet_rnk=4")
    assert "unet_rnk" in _composition_error_text(info.value)


def test_unknown_group_option_fails_and_lists_options(hydra_conf, tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(tmp_path, "lora=nope")
    text = _composition_error_text(info.value)
    assert "lora/nope" in text and "unet_te" in text


# -- bad values fail in validate_config, naming key and value ---------------------------------------------


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    """The default config, composed once; tests change copies of it (schema typing still applies)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose_cfg(tmp_path_factory.mktemp("root"))


def with_values(base, **values):
    """A copy of ``base`` with dotted keys set (``with_values(cfg, **{"lora.unet_rank": -1})``)."""
    cfg = base.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("lora.unet_rank=-1", ("lora.unet_rank=-1", "[1, 1024]")),
        ("init.strength=1.5", ("init.strength=1.5", "(0, 1]")),
        ("infer.origin_scale=2", ("infer.origin_scale=2.0", "[0, 1]")),
        ("engine.device=gpu7", ("engine.device='gpu7'", "cuda:N")),
        ("engine.compile=default", ("engine.compile='default'", "replays recorded execution plans (replay)")),
    ],
)
def test_bad_value_from_override_names_key_and_value(hydra_conf, tmp_path, override, fragments):
    expect_config_error(compose_cfg(tmp_path, override), *fragments)


BAD_VALUES = [
    ("lora.unet_rank", 0, "lora.unet_rank=0"),
    ("lora.text_encoder_rank", -2, "lora.text_encoder_rank=-2"),
    ("lora.unet_alpha", 0, "lora.unet_alpha=0.0"),
    ("lora.text_encoder_alpha", -1, "lora.text_encoder_alpha=-1.0"),
    ("lora.text_encoder_lr_ratio", 0, "lora.text_encoder_lr_ratio=0.0"),
    ("lora.unet_targets", [], "lora.unet_targets=[]"),
    ("init.strength", 0, "init.strength=0.0"),
    ("init.mode", "zeros", "init.mode='zeros'"),
    ("infer.origin_scale", -0.1, "infer.origin_scale=-0.1"),
    ("infer.sampler", "euler", "infer.sampler='euler'"),
    ("infer.steps", 0, "infer.steps=0"),
    ("infer.batch_size", 0, "infer.batch_size=0"),
    ("infer.guidance_scale", -1, "infer.guidance_scale=-1.0"),
    ("engine.device", "cuda:x", "engine.device='cuda:x'"),
    ("engine.device", "CPU", "engine.device='CPU'"),
    ("engine.mixed_precision", "fp8", "engine.mixed_precision='fp8'"),
    ("engine.name", "tensorflow", "engine.name='tensorflow'"),
    ("engine.compile", "fast", "engine.compile='fast'"),
    ("train.steps", 0, "train.steps=0"),
    ("train.batch_size", 0, "train.batch_size=0"),
    ("train.lr", 0, "train.lr=0.0"),
    ("train.lr_schedule", "step", "train.lr_schedule='step'"),
    ("train.lr_warmup_steps", 900, "train.lr_warmup_steps=900"),
    ("train.adam_beta1", 1.0, "train.adam_beta1=1.0"),
    ("train.adam_beta2", -0.1, "train.adam_beta2=-0.1"),
    ("train.adam_epsilon", 0, "train.adam_epsilon=0.0"),
    ("train.weight_decay", -1, "train.weight_decay=-1.0"),
    ("train.max_grad_norm", -1, "train.max_grad_norm=-1.0"),
    ("augment.crop_scale", 0.9, "augment.crop_scale=0.9"),
    ("augment.hflip", 1.5, "augment.hflip=1.5"),
    ("augment.rotate_degrees", 200, "augment.rotate_degrees=200.0"),
    ("prior.template", "plain", "prior.template='plain'"),
    ("prior.weight", -1, "prior.weight=-1.0"),
    ("prior.images_per_object", 0, "prior.images_per_object=0"),
    ("data.resolution", 100, "data.resolution=100"),
    ("data.resolution", 0, "data.resolution=0"),
    ("data.infer_template", "style_{style}", "data.infer_template='style_{style}'"),
    ("data.origin_template", "a thing", "data.origin_template='a thing'"),
    ("data.builder", "web", "data.builder='web'"),
    ("model.builder", "huge", "model.builder='huge'"),
    ("model.prediction_type", "sample", "model.prediction_type='sample'"),
    ("score.metrics", ["hist", "clip_score"], "score.metrics='clip_score'"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_key_and_value(base_cfg, key, value, fragment):
    validate_config(base_cfg)  # the base is fine; only the one change breaks it
    message = expect_config_error(with_values(base_cfg, **{key: value}), fragment)
    assert "invalid" in message


def test_schema_rejects_wrong_type_on_assignment(base_cfg):
    from omegaconf.errors import ValidationError

    with pytest.raises(ValidationError, match="steps"):
        with_values(base_cfg, **{"train.steps": "abc"})


def test_valid_device_forms_pass(base_cfg):
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        validate_config(with_values(base_cfg, **{"engine.device": device}))


def test_stages_out_of_order(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "stages=[train,prior]")
    expect_config_error(cfg, "stages=['train', 'prior']", "order")


def test_unknown_stage(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "stages=[prior,paint]")
    expect_config_error(cfg, "stages='paint'", "prior, train, generate, score")


def test_empty_and_duplicate_stages(base_cfg):
    expect_config_error(with_values(base_cfg, stages=[]), "stages=[]")
    expect_config_error(with_values(base_cfg, stages=["train", "train"]), "stages=['train', 'train']")


@pytest.mark.parametrize("stages", [["prior"], ["train"], ["prior", "train"], ["train", "generate"],
                                    ["train", "generate", "score"]])
def test_valid_stage_subsets(base_cfg, stages):
    validate_config(with_values(base_cfg, stages=stages))


def test_generate_without_train_needs_lora_path(hydra_conf, tmp_path):
    cfg = compose_cfg(tmp_path, "stages=[generate,score]")
    expect_config_error(cfg, "lora.path=None", "lora.path=<run dir")


def test_lora_path_to_missing_file(hydra_conf, tmp_path):
    missing = tmp_path / "nowhere" / "lora.safetensors"
    cfg = compose_cfg(tmp_path, "stages=[generate,score]", f"lora.path={missing}")
    expect_config_error(cfg, "lora.path=", str(missing), "does not exist")


def test_lora_path_to_run_dir_without_adapter(base_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = with_values(base_cfg, stages=["generate", "score"], **{"lora.path": str(run_dir)})
    expect_config_error(cfg, f"lora.path={run_dir}", "has no lora.safetensors")


def test_lora_path_to_a_damaged_adapter_is_refused_before_any_model_loads(base_cfg, tmp_path):
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    cfg = with_values(base_cfg, stages=["generate", "score"], **{"lora.path": str(tmp_path)})
    expect_config_error(cfg, f"lora.path={tmp_path}", "not a readable safetensors file")


def test_lora_path_to_existing_adapter_passes(base_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    layers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (np.ones((4, 8), np.float32),
                                                                             np.zeros((8, 4), np.float32))}
    save_adapters(run_dir / "lora.safetensors", {"unet": Adapter(rank=4, alpha=4.0, layers=layers)})
    validate_config(with_values(base_cfg, stages=["generate", "score"], **{"lora.path": str(run_dir)}))
    validate_config(with_values(base_cfg, stages=["generate"], **{"lora.path": str(run_dir / "lora.safetensors")}))


# -- the real CLI -----------------------------------------------------------------------------------------------


def run_cli(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jdiff.main", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"jdiff took {elapsed:.1f} s to fail"
    assert proc.returncode != 0, f"jdiff succeeded:\n{proc.stdout}\n{proc.stderr}"
    return proc, elapsed


def _no_model_built(tmp_path: Path) -> None:
    assert not (tmp_path / "data" / "cache" / "models").exists(), "a model was built before the error"
    assert not list(tmp_path.rglob("COMPLETE"))
    assert not list(tmp_path.rglob("lora.safetensors"))


def test_cli_bad_rank(tmp_path):
    proc, _ = run_cli(tmp_path, "lora.unet_rank=-1", "style=00", "experiment=demo")
    assert "lora.unet_rank=-1" in proc.stderr
    _no_model_built(tmp_path)
    # Validation runs before anything is written: not even the demo styles.
    assert not (tmp_path / "data" / "cache" / "demo_styles").exists()


def test_cli_missing_style_lists_available(tmp_path):
    proc, _ = run_cli(tmp_path, "experiment=demo", "style=99")
    assert "style=99" in proc.stderr
    assert "00, 01" in proc.stderr
    _no_model_built(tmp_path)


def test_cli_missing_model_path(tmp_path):
    proc, _ = run_cli(tmp_path, "model.path=/nonexistent", "style=00", "experiment=demo", "model.builder=null")
    assert "model.path=/nonexistent" in proc.stderr
    _no_model_built(tmp_path)


def test_cli_wrong_type_names_key(tmp_path):
    proc, _ = run_cli(tmp_path, "experiment=demo", "train.steps=abc")
    assert "train.steps" in proc.stderr and "abc" in proc.stderr


def _challenge_root(tmp_path: Path, broken: str) -> Path:
    """A data.root with a good style 00 and a style 03 broken in the way named."""
    root = tmp_path / "styles"
    rng = np.random.default_rng(0)
    for style in ("00", "03"):
        images = root / style / "images"
        images.mkdir(parents=True)
        for name in ("sun", "boat"):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
        (root / style / "prompt.json").write_text(json.dumps({"0": "Apple", "1": "Lion"}))
    bad = root / "03"
    if broken == "corrupt_image":
        (bad / "images" / "fox.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif broken == "bad_json":
        (bad / "prompt.json").write_text('{"0": "Apple",')
    elif broken == "no_images":
        for p in (bad / "images").iterdir():
            p.unlink()
    else:
        raise AssertionError(broken)
    return root


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("corrupt_image", "03/images/fox.jpg"),
        ("bad_json", "03/prompt.json"),
        ("no_images", "03/images holds no images"),
    ],
)
def test_cli_broken_style_folder(tmp_path, broken, expected):
    root = _challenge_root(tmp_path, broken)
    proc, _ = run_cli(tmp_path, "style=03", "lora.unet_rank=32", f"data.root={root}")
    assert expected in proc.stderr, proc.stderr
    _no_model_built(tmp_path)


def test_defaults_have_one_source():
    """A group option states only what it changes: the schema (jdiff/config.py) holds every default, so the
    two can never contradict each other."""
    import dataclasses

    from jdiff import config as schema
    from jdiff.engines.options import ENGINES

    groups = {"lora": schema.LoraConfig, "prior": schema.PriorConfig, "augment": schema.AugmentConfig,
              "init": schema.InitConfig, "train": schema.TrainConfig, "infer": schema.InferConfig,
              "score": schema.ScoreConfig, "data": schema.DataConfig, "model": schema.ModelConfig}

    def schema_of(group: str, values: dict):
        if group == "engine":  # typed by the engine schema its defaults list names first (<engine>_schema)
            return ENGINES[values["defaults"][0].removesuffix("_schema")].options
        return groups[group]

    for group in (*groups, "engine"):
        for option in _options(group):
            values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(schema_of(group, values))
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
            restated = [k for k, v in values.items() if k != "defaults" and k in defaults and v == defaults[k]]
            assert not restated, f"conf/{group}/{option}.yaml restates the schema's defaults of {restated}"
    # The primary config picks the options whose values the schema's defaults are.
    cfg = OmegaConf.load(CONF / "config.yaml")
    picked = {k: v for d in cfg.defaults if isinstance(d, dict) or OmegaConf.is_dict(d) for k, v in d.items()}
    assert picked["prior"] == "on" and schema.PriorConfig().enabled
    assert picked["init"] == "avg_image" and schema.InitConfig().mode == "avg_image"
