"""The configuration schema: one dataclass per config group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` choose values; these dataclasses fix the keys and their types, so a typo
in an override or a wrong type fails while Hydra composes the config. Ranges and cross-key rules that a
type cannot express are checked by :mod:`jdiff.validate` right after composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from jdiff.engines.options import ENGINES, unknown_option

STAGES = ("prior", "train", "generate", "score")


@dataclass
class PathsConfig:
    # Everything relative resolves against the directory jdiff was started from.
    root: str = "."
    cache: str = "${paths.root}/data/cache"


@dataclass
class ModelConfig:
    name: str = MISSING
    # A local diffusers-format folder or a Hugging Face hub id.
    path: str = MISSING
    # "tiny" / "sd21_random": the folder is built locally (random weights, SD 2.1 architecture, tiny or full
    # size) when missing.
    builder: Optional[str] = None
    builder_seed: int = 0
    # Overrides the scheduler config's prediction type (epsilon / v_prediction) when set.
    prediction_type: Optional[str] = None
    revision: Optional[str] = None
    # Allow a hub download when the weights are not on disk yet.
    allow_download: bool = False


@dataclass
class LoraConfig:
    unet_rank: int = 32
    unet_alpha: Optional[float] = None  # None: equal to the rank
    unet_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_rank: int = 0  # 0: no text-encoder LoRA
    text_encoder_alpha: Optional[float] = None
    text_encoder_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    text_encoder_lr_ratio: float = 0.1
    # An existing adapter (file, or a run directory holding lora.safetensors) used instead of training.
    path: Optional[str] = None


@dataclass
class PriorConfig:
    enabled: bool = True
    weight: float = 1.0
    images_per_object: int = 8
    template: str = "an image of {object}"
    include_prompt_objects: bool = True  # class images for the prompt objects too, not only the training set's
    # object: class images of the style's own objects; sweep: one class set for every run, the objects of
    # prior.styles (docs/sweeps.md)
    share: str = "object"
    # share=sweep: the styles whose objects form the class set (null: a sweep's own styles; a single run: every
    # style under data.root). A sweep records its styles here in each run's config.yaml.
    styles: Optional[List[str]] = None
    max_objects: Optional[int] = None  # at most this many objects (those most styles name); null: all of them
    # images per sampling batch (null: 16 on a GPU, infer.batch_size on the CPU); not a setting of the run's
    batch_size: Optional[int] = None


@dataclass
class AugmentConfig:
    crop_scale: float = 1.04  # resize to this multiple of the resolution, then crop back
    random_crop: bool = True  # False: centre crop
    hflip: float = 0.0  # probability of a horizontal flip
    rotate_degrees: float = 0.0  # uniform rotation in [-d, d]


@dataclass
class InitConfig:
    mode: str = "avg_image"  # avg_image, noise
    strength: float = 0.9  # img2img strength for avg_image


@dataclass
class InjectConfig:
    # none; styleid: StyleID style injection on each generated image (jdiff/inject.py, docs/styleid.md)
    name: str = "none"
    gamma: float = 0.75  # query blend: gamma * q_content + (1 - gamma) * q_now (0.3: more style)
    temperature: float = 1.5  # the injected attention's logits are multiplied by this
    # Attention modules whose self-attention is injected, by diffusers name (up_blocks.2.attentions.1); null:
    # StyleID's choice, the decoder's last two attention levels less the first module (SD 2.1: up_blocks.2.
    # attentions.1-2, up_blocks.3.attentions.0-2)
    layers: Optional[List[str]] = None
    inversion_steps: int = 20  # DDIM steps of the inversions and of the stylised sampling
    adain_init: bool = True  # start from the inverted content latents AdaIN-ed to the style's channel statistics
    style_image: str = "average"  # the style reference to inject: its index (0, 1, ...) or average (their mean)


@dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 1  # style images per step (and as many class images with prior preservation)
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant, linear, cosine (after lr_warmup_steps of linear warm-up)
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 disables clipping
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual); 0: off
    noise_offset: float = 0.0  # offset * N(0,1) per sample and channel added to the noise (e.g. 0.05); 0: off
    checkpoint_every: int = 0  # write checkpoint/ every N steps; a resumed run continues from it; 0: off
    sample_every: int = 0  # generate sample_prompts every N steps into samples/step_<k>/; 0: off
    # The prompts of sample_every, verbatim; null: the style's first 2 prompt objects in data.infer_template.
    sample_prompts: Optional[List[str]] = None


@dataclass
class InferConfig:
    steps: int = 40
    guidance_scale: float = 7.5
    batch_size: int = 5
    negative_prompt: str = ""
    # Blend of the style prompt's embedding (0) and the plain prompt's embedding (1).
    origin_scale: float = 0.0
    sampler: str = "model"  # model: the scheduler named by the model's config; ddim


@dataclass
class ScoreConfig:
    # Metrics to compute; a metric whose weights are missing is skipped and the final score marked partial.
    metrics: List[str] = field(default_factory=lambda: ["dinov2", "hist", "lpips", "fid", "clip_iqa", "clip_r"])
    # Metrics scored too when they can run (weights found), else left out with one info line, not a warning.
    optional: List[str] = field(default_factory=list)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    batch_size: int = 25
    allow_download: bool = False  # fetch missing metric weights (otherwise only local files and caches are used)
    # Hugging Face hub ids or local folders.
    dinov2_model: str = "facebook/dinov2-base"
    # CLIP-IQA: OpenAI's RN50.pt as the checker's torchmetrics/piq loaded it (a path, or a file name in
    # ~/.cache/clip), another .pt/.safetensors CLIP ResNet in OpenAI's layout, or a transformers CLIP
    # (folder or hub id). The tokenizer (a folder or hub id) serves the OpenAI-layout weights.
    clip_iqa_model: str = "RN50.pt"
    clip_iqa_tokenizer: str = "openai/clip-vit-base-patch16"
    clip_r_model: str = "openai/clip-vit-large-patch14"
    # .pth state dicts: a path, or a file name in torch's hub cache (~/.cache/torch/hub/checkpoints).
    lpips_backbone: str = "squeezenet1_1-b8a52dc0.pth"  # torchvision's SqueezeNet 1.1
    lpips_head: str = "squeeze.pth"  # the lpips package's v0.1 linear layers
    fid_weights: str = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception v3
    fid_feature: int = 64  # Inception layer width: 64 (the challenge's), 192, 768 or 2048
    clip_r_names: Optional[str] = None  # a file of candidate names, one a line; null: the challenge's 215


@dataclass
class DataConfig:
    root: str = "${paths.root}/data/styles"
    # "demo": a small style set jdiff draws itself into root when root is missing.
    builder: Optional[str] = None
    resolution: int = 512
    train_template: str = "an image of {object} in style_{style}"
    infer_template: str = "an image of {object} in style_{style}"
    origin_template: str = "an image of {object}"


@dataclass
class SweepConfig:
    # The sweep folder under multirun/; a named sweep run again skips its finished runs.
    name: str = "${now:%Y-%m-%d}/${now:%H-%M-%S}"
    # Runs that share a base model train together, one process a GPU: 1 (each run alone), N (at most N a pack)
    # or auto (the runs spread over the GPUs, at most 16 a pack; a pack too big for the GPU is halved)
    pack: Any = 1


@dataclass
class JdiffConfig:
    style: str = MISSING
    seed: int = 42
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    # Repeatable GPU results where the framework allows it, at some cost in speed.
    deterministic: bool = False
    # Replace a finished run in the run directory (hydra.run.dir=D, or a sweep's run folders) instead of refusing
    # (a single run) or skipping it (a sweep). Nothing else ever deletes or overwrites a finished run.
    overwrite: bool = False
    # Sweeps (-m): the GPUs to fill, one job per GPU at a time (null: every GPU this machine shows,
    # [] for none), and how many jobs run at once (null: one per GPU, or 1 without GPUs).
    gpus: Optional[List[str]] = None
    n_jobs: Optional[int] = None
    sweep: SweepConfig = field(default_factory=SweepConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Typed by the chosen engine's options (jdiff/engines/options.py: TorchOptions, JittorOptions): each
    # conf/engine/<option>.yaml names its engine's schema first in its defaults, so an option that engine does not
    # have fails at composition. Untyped here, so that either engine's options fit.
    engine: Any = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    init: InitConfig = field(default_factory=InitConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    data: DataConfig = field(default_factory=DataConfig)


# One line for each key of JdiffConfig, for `jdiff --help` (jdiff/help.py renders them with the config groups);
# tests/test_cli.py fails while a key has none. A group's own keys are documented in its dataclass above.
HELP = {
    "style": "the style folder under data.root: style=03 trains on data/styles/03 (required)",
    "seed": "the seed of the class images, the training and the generation",
    "stages": "the stages to run: prior (class images), train (LoRA), generate, score",
    "deterministic": "repeatable GPU results where the framework allows it, at some cost in speed",
    "overwrite": "replace a finished run in its folder instead of refusing (a sweep: skipping) it",
    "gpus": "sweeps (-m): the GPUs to fill, one job each (null: all this machine has; []: none)",
    "n_jobs": "sweeps (-m): the jobs at once (null: one per GPU, or 1 without GPUs)",
    "sweep": "the sweep's folder under multirun/; a named sweep run again skips its finished runs",
    "paths": "root: where relative paths start (data/ is there); cache: built models, drawn styles",
    "model": "the Stable Diffusion to start from (tiny, sd21_random: random weights, built here)",
    "engine": "Jittor or PyTorch + diffusers; the _fast options: the GPU speed settings",
    "lora": "the LoRA adapters: ranks, alphas, target layers (unet_te: the text encoder's too)",
    "prior": "prior preservation: class images of the objects, and their loss weight",
    "augment": "training-image augmentation: crop scale, flips, rotation",
    "init": "where generation starts: the average style image (img2img) or noise",
    "inject": "style injection after generation: none, or styleid (gamma, temperature, layers, style_image)",
    "train": "LoRA training: steps, batch size, learning rate and its schedule, AdamW",
    "infer": "generation: sampling steps, guidance scale, negative prompt, sampler, batch size",
    "score": "the challenge's metrics and the models they load (hist: needs no weights)",
    "data": "the styles and the prompt templates (demo: a small style set jdiff draws itself)",
}


def register_configs() -> None:
    """Register the schema; ``conf/config.yaml`` lists it first in its defaults, so every group is typed. Each
    engine's options go into the engine group as ``<name>_schema``, for its conf/engine/ options to start from."""
    from omegaconf import OmegaConf

    from jdiff.devices import on_gpu

    OmegaConf.register_new_resolver("jdiff.on_gpu", on_gpu, replace=True)  # a value chosen by the machine
    store = ConfigStore.instance()
    store.store(name="jdiff_schema", node=JdiffConfig)
    for name, entry in ENGINES.items():
        store.store(group="engine", name=f"{name}_schema", node=entry.options)


def explain_composition_error(err: BaseException) -> Optional[str]:
    """One line for a composition error that Hydra reports in several, or None to leave it as Hydra says it: an
    override of an option the chosen engine does not have (``engine=jittor engine.group_norm=triton``)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause: Optional[BaseException] = err
    while cause is not None:
        typed = getattr(cause, "object_type", None)
        key = getattr(cause, "key", None)
        engine_key = getattr(cause, "full_key", None) == f"engine.{key}"
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and engine_key:
            engine = next((name for name, entry in ENGINES.items() if entry.options is typed), None)
            if engine is not None:
                return unknown_option(engine, str(key))
        cause = cause.__cause__
    return None
