"""Checks that run after Hydra composed the config and before any model is loaded.

Types and key names are already enforced by the schema (jdiff/config.py); here go the ranges and the
rules between keys. Every message names the key, the value, and what would work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jdiff.config import STAGES
from jdiff.devices import DeviceError, parse_device
from jdiff.engines.options import ENGINES, EngineOptionError, EngineOptions, engine_options
from jdiff.lora_file import check_adapter_file
from jdiff.tiny_model import ARCHITECTURES

INIT_MODES = ("noise", "avg_image")
LR_SCHEDULES = ("constant", "linear", "cosine")
SAMPLERS = ("model", "ddim")
PRIOR_SHARES = ("object", "sweep")
PREDICTION_TYPES = ("epsilon", "v_prediction")
KNOWN_METRICS = ("dinov2", "hist", "lpips", "fid", "clip_iqa", "clip_r")
FID_FEATURES = (64, 192, 768, 2048)


class ConfigError(ValueError):
    """A config value jdiff cannot run with; the message names the key and the fix."""


def _check(ok: bool, key: str, value, need: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {need}.")


def _one_of(key: str, value, allowed) -> None:
    _check(value in allowed, key, value, f"use one of {', '.join(map(str, allowed))}")


MAX_RANK = 1024  # SD's attention layers are 320 to 1280 wide; the reference method's best rank is 32
MAX_SEED = 2**32 - 1


def _device(value, key: str) -> None:
    try:
        parse_device(value, key)
    except DeviceError as err:
        raise ConfigError(str(err)) from err


def _check_present(cfg: DictConfig, schema, prefix: str = "") -> None:
    """Every key of the schema is there and set: ``~seed`` deletes one, ``style`` starts unset."""
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if OmegaConf.is_missing(cfg, f.name):
            if key == "style":
                raise ConfigError("style is not set: name a style folder under data.root, e.g. style=03 (or "
                                  "experiment=demo for the built-in demo styles).")
            raise ConfigError(f"{key} is not set: give it a value, e.g. {key}=<value>.")
        if f.name not in cfg:
            raise ConfigError(f"{key} was removed from the config (~{key}?); jdiff needs it: drop ~{key}, or set "
                              f"{key}=<value>.")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(cfg[f.name], DictConfig):
            _check_present(cfg[f.name], type(default), key + ".")


def check_placement(cfg: DictConfig) -> None:
    """How many jobs run at once and on which GPUs (a sweep's launcher reads them before any job starts)."""
    _check(cfg.n_jobs is None or cfg.n_jobs >= 1, "n_jobs", cfg.n_jobs, "run at least 1 job at a time, or null")
    if cfg.gpus is not None:
        gpus = list(cfg.gpus)
        _check(all(str(g).strip() for g in gpus) and len(set(gpus)) == len(gpus), "gpus", gpus,
               "list distinct GPU ids as nvidia-smi shows them, e.g. gpus=[0,2], or [] for none")
    pack = OmegaConf.select(cfg, "sweep.pack", default=1)
    _check(str(pack) == "auto" or (isinstance(pack, int) and not isinstance(pack, bool) and pack >= 1), "sweep.pack",
           pack, "give 1 (each run alone), a number of runs a pack, or auto")


def check_engine(engine) -> EngineOptions:
    """``engine.*``: a known engine, with the options of that engine, every one set; their values are checked by
    the engine's options class (jdiff.engines.options), the one place they are. Returns the options."""
    if not isinstance(engine, DictConfig):
        raise ConfigError(f"engine={engine!r} is invalid: choose an engine, engine={' or engine='.join(ENGINES)}.")
    if "name" not in engine or OmegaConf.is_missing(engine, "name"):
        raise ConfigError(f"engine.name is not set: choose an engine, engine={' or engine='.join(ENGINES)}.")
    _one_of("engine.name", engine.name, ENGINES)
    options = ENGINES[engine.name].options
    typed = OmegaConf.get_type(engine)
    if isinstance(typed, type) and issubclass(typed, EngineOptions) and typed is not options:
        owner = next(name for name, entry in ENGINES.items() if entry.options is typed)
        raise ConfigError(f"engine.name={engine.name!r} is invalid: the engine options are the {owner} engine's. "
                          f"Choose the engine as a group, engine={engine.name}, not by engine.name.")
    _check_present(engine, options, "engine.")
    try:
        return engine_options(engine.name, OmegaConf.to_container(engine, resolve=True))
    except EngineOptionError as err:
        raise ConfigError(str(err)) from err


INJECT = ("none", "styleid")


def check_inject(cfg: DictConfig) -> None:
    """``inject.*``: the StyleID settings (the layers are checked against the model once it is loaded)."""
    inject = cfg.inject
    _one_of("inject.name", inject.name, INJECT)
    if inject.name == "none":
        return
    _check(0.0 <= inject.gamma <= 1.0, "inject.gamma", inject.gamma,
           "the content query's share in [0, 1] (StyleID: 0.75; 0.3 for more style)")
    _check(0.0 < inject.temperature < float("inf"), "inject.temperature", inject.temperature,
           "a number > 0 (StyleID: 1.5; 1 leaves the logits as they are)")
    _check(1 <= inject.inversion_steps <= 1000, "inject.inversion_steps", inject.inversion_steps,
           "DDIM steps in [1, 1000] (StyleID: 20 on SD 2.1, 50 on SD 1.4)")
    _check(inject.layers is None or (len(inject.layers) > 0 and all(str(n).strip() for n in inject.layers)),
           "inject.layers", None if inject.layers is None else list(inject.layers),
           "name attention modules, e.g. [up_blocks.3.attentions.0], or null for StyleID's choice")
    style_image = str(inject.style_image)
    _check(style_image == "average" or style_image.isdecimal(), "inject.style_image", style_image,
           "the index of a reference image (0, 1, ...) or average")
    compile_mode = OmegaConf.select(cfg, "engine.compile")
    _check(compile_mode not in ("reduce-overhead", "max-autotune"), "engine.compile", compile_mode,
           "inject=styleid hooks Python code into the UNet's attention, which torch.compile would compile again "
           "for every layer and step: use engine.compile=no or cuda-graphs (engine=torch_fast), whose injected "
           "calls run eagerly")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on the first value that cannot work."""
    from jdiff.config import JdiffConfig

    _check_present(cfg, JdiffConfig)
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # a ${...} that cannot be resolved, or resolves to a wrong type
        key = getattr(err, "full_key", None) or "a value"
        raise ConfigError(f"{key} cannot be resolved: {str(err).splitlines()[0]}. Fix the ${{...}} reference or "
                          f"give {key} a plain value.") from err
    _check(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, f"a seed in [0, {MAX_SEED}]")
    style = str(cfg.style)
    _check(bool(style.strip()) and style not in (".", "..") and not any(c in style for c in "/\\"), "style", style,
           "name one style folder under data.root (e.g. style=03); to use styles elsewhere set data.root")
    stages = list(cfg.stages)
    for stage in stages:
        _one_of("stages", stage, STAGES)
    _check(len(stages) > 0, "stages", stages, "name at least one of " + ", ".join(STAGES))
    _check(len(set(stages)) == len(stages), "stages", stages, "name each stage once")
    _check(stages == [s for s in STAGES if s in stages], "stages", stages, f"list them in the order {list(STAGES)}")
    if "score" in stages:
        _check("generate" in stages, "stages", stages, "the score stage scores this run's images: add generate")

    lora = cfg.lora
    _check(1 <= lora.unet_rank <= MAX_RANK, "lora.unet_rank", lora.unet_rank,
           f"the UNet LoRA rank must be in [1, {MAX_RANK}] (e.g. 4 or 32)")
    _check(0 <= lora.text_encoder_rank <= MAX_RANK, "lora.text_encoder_rank", lora.text_encoder_rank,
           f"use 0 (off) or a rank in [1, {MAX_RANK}]")
    for key in ("unet_alpha", "text_encoder_alpha"):
        value = lora[key]
        _check(value is None or 0 < value < float("inf"), f"lora.{key}", value,
               "alpha must be a number > 0, or null for alpha = rank")
    _check(lora.text_encoder_lr_ratio > 0, "lora.text_encoder_lr_ratio", lora.text_encoder_lr_ratio, "must be > 0")
    _check(len(lora.unet_targets) > 0, "lora.unet_targets", list(lora.unet_targets), "name at least one module")
    _check(lora.text_encoder_rank == 0 or len(lora.text_encoder_targets) > 0, "lora.text_encoder_targets",
           list(lora.text_encoder_targets), "name at least one module (q_proj, k_proj, v_proj, out_proj), or set "
                                             "lora.text_encoder_rank=0")
    if "train" not in stages and ("generate" in stages):
        _check(
            lora.path is not None,
            "lora.path",
            lora.path,
            "without the train stage, generate needs a trained adapter: set lora.path=<run dir or .safetensors>",
        )
    _check(lora.path is None or "train" not in stages, "lora.path", lora.path,
           "the train stage trains a new adapter and would ignore it: to use this adapter drop train "
           "(stages=[generate,score]), or to train a new one unset it (lora.path=null)")
    if lora.path is not None and "train" not in stages:
        try:
            check_adapter_file(Path(lora.path))  # before any model loads: values, pairs, metadata
        except ValueError as err:
            raise ConfigError(f"lora.path={lora.path}: {err}") from err

    prior = cfg.prior
    _check(stages != ["prior"] or prior.enabled, "stages", stages,
           "the prior stage alone does nothing with prior preservation off: add prior=on, or other stages")
    _check(prior.weight >= 0, "prior.weight", prior.weight, "the class-loss weight must be >= 0")
    _check(prior.images_per_object >= 1, "prior.images_per_object", prior.images_per_object, "must be >= 1")
    _check("{object}" in prior.template, "prior.template", prior.template, "it must contain {object}")
    _one_of("prior.share", prior.share, PRIOR_SHARES)
    _check(prior.max_objects is None or prior.max_objects >= 1, "prior.max_objects", prior.max_objects,
           "keep at least 1 object, or null for all of them")
    _check(prior.batch_size is None or prior.batch_size >= 1, "prior.batch_size", prior.batch_size,
           "at least 1 image per batch, or null (16 on a GPU, infer.batch_size on the CPU)")
    if prior.styles is not None:
        styles = [str(s) for s in prior.styles]
        _check(prior.share == "sweep", "prior.styles", styles,
               "it names the styles of a shared class set: add prior.share=sweep, or drop prior.styles")
        _check(len(styles) > 0 and all(s.strip() and s not in (".", "..") and not any(c in s for c in "/\\")
                                       for s in styles), "prior.styles", styles,
               "name style folders under data.root, e.g. prior.styles=[00,01], or null")

    aug = cfg.augment
    _check(1.0 <= aug.crop_scale <= 2.0, "augment.crop_scale", aug.crop_scale,
           "in [1, 2] (1.0: no enlargement; the reference method uses 1.04)")
    _check(0.0 <= aug.hflip <= 1.0, "augment.hflip", aug.hflip, "a probability in [0, 1]")
    _check(0.0 <= aug.rotate_degrees <= 180.0, "augment.rotate_degrees", aug.rotate_degrees, "degrees in [0, 180]")

    _one_of("init.mode", cfg.init.mode, INIT_MODES)
    _check(0.0 < cfg.init.strength <= 1.0, "init.strength", cfg.init.strength, "a strength in (0, 1]")
    if cfg.init.mode == "avg_image" and cfg.infer.steps >= 1:
        _check(int(cfg.init.strength * cfg.infer.steps) >= 1, "init.strength", cfg.init.strength,
               f"with infer.steps={cfg.infer.steps} it leaves no denoising step: use a strength of at least "
               f"1/infer.steps ({1 / cfg.infer.steps:.3g}), or more steps")

    check_inject(cfg)

    train = cfg.train
    _check(train.steps >= 1, "train.steps", train.steps, "must be >= 1")
    _check(train.batch_size >= 1, "train.batch_size", train.batch_size, "must be >= 1")
    _check(train.lr > 0, "train.lr", train.lr, "must be > 0")
    _one_of("train.lr_schedule", train.lr_schedule, LR_SCHEDULES)
    _check(0 <= train.lr_warmup_steps <= train.steps, "train.lr_warmup_steps", train.lr_warmup_steps, "in [0, train.steps]")
    _check(0 <= train.adam_beta1 < 1, "train.adam_beta1", train.adam_beta1, "in [0, 1)")
    _check(0 <= train.adam_beta2 < 1, "train.adam_beta2", train.adam_beta2, "in [0, 1)")
    _check(train.adam_epsilon > 0, "train.adam_epsilon", train.adam_epsilon, "must be > 0")
    _check(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
    _check(train.max_grad_norm >= 0, "train.max_grad_norm", train.max_grad_norm, "must be >= 0 (0: no clipping)")
    _check(0 <= train.snr_gamma < float("inf"), "train.snr_gamma", train.snr_gamma, "must be >= 0 (0: off; 5 is usual)")
    _check(0 <= train.noise_offset < float("inf"), "train.noise_offset", train.noise_offset,
           "must be >= 0 (0: off; 0.05 to 0.1 is usual)")
    for key in ("checkpoint_every", "sample_every"):
        _check(train[key] >= 0, f"train.{key}", train[key], "a number of steps >= 0 (0: off)")
    if train.sample_prompts is not None:
        prompts = list(train.sample_prompts)
        _check(len(prompts) > 0 and all(str(p).strip() for p in prompts), "train.sample_prompts", prompts,
               "list at least one non-empty prompt, or null for the style's first 2 prompt objects")

    infer = cfg.infer
    _check(infer.steps >= 1, "infer.steps", infer.steps, "must be >= 1")
    _check(infer.guidance_scale >= 0, "infer.guidance_scale", infer.guidance_scale, "must be >= 0 (<= 1: no guidance)")
    _check(infer.batch_size >= 1, "infer.batch_size", infer.batch_size, "must be >= 1")
    _check(0.0 <= infer.origin_scale <= 1.0, "infer.origin_scale", infer.origin_scale, "a blend weight in [0, 1]")
    _one_of("infer.sampler", infer.sampler, SAMPLERS)

    score = cfg.score
    for metric in score.metrics:
        _one_of("score.metrics", metric, KNOWN_METRICS)
    for metric in score.optional:
        _one_of("score.optional", metric, KNOWN_METRICS)
    _check(len(score.metrics) > 0 or "score" not in stages, "score.metrics", list(score.metrics),
           f"name at least one of {', '.join(KNOWN_METRICS)} (score=hist needs no weights), or drop the score stage")
    _device(score.device, "score.device")
    _check(score.batch_size >= 1, "score.batch_size", score.batch_size, "must be >= 1")
    _one_of("score.fid_feature", score.fid_feature, FID_FEATURES)
    if score.clip_r_names is not None:
        _check(Path(score.clip_r_names).is_file(), "score.clip_r_names", score.clip_r_names,
               "no such file; give a text file of object names, one a line, or null for the challenge's 215")

    for key, template in (("prior.template", prior.template), ("data.train_template", cfg.data.train_template),
                          ("data.infer_template", cfg.data.infer_template),
                          ("data.origin_template", cfg.data.origin_template)):
        try:
            template.format(object="Dolphin", style="00")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"{key}={template!r} is invalid: only {{object}} and {{style}} can be filled in "
                              f"({type(err).__name__}: {err}); write other braces doubled, {{{{ and }}}}.") from err

    data = cfg.data
    _check(data.resolution >= 8 and data.resolution % 8 == 0, "data.resolution", data.resolution, "a multiple of 8")
    _check("{object}" in data.train_template or "{style}" in data.train_template, "data.train_template",
           data.train_template, "it must contain {object} or {style}")
    for key in ("infer_template", "origin_template"):
        _check("{object}" in data[key], f"data.{key}", data[key], "it must contain {object}")
    _check(data.builder in (None, "demo"), "data.builder", data.builder, "null or demo")

    check_engine(cfg.engine)

    check_placement(cfg)
    if cfg.model.prediction_type is not None:
        _one_of("model.prediction_type", cfg.model.prediction_type, PREDICTION_TYPES)
    _check(cfg.model.builder in (None, *ARCHITECTURES), "model.builder", cfg.model.builder,
           f"null or one of {', '.join(ARCHITECTURES)}")
