"""The engine interface: the tensor work behind jdiff, in whichever deep-learning framework.

The method is not here: the training loss is :func:`jdiff.train.diffusion_loss`, the sampling loop
:func:`jdiff.generate.denoise`, the samplers :mod:`jdiff.samplers`. An engine gives them primitives (load the
model, encode prompts and images, predict with the attached adapters, decode, concatenate) and does what only a
framework can: the optimiser step over the loss's gradients, recorded steps (CUDA graphs, Jittor's replay),
memory. The core hands an engine plain numpy arrays (images, noise, timesteps) and gets numpy back, so both
engines see the same random numbers and can be checked against each other.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from jdiff.engines.options import ENGINES, EngineOptionError, engine_options
from jdiff.lora_file import Adapter, adapter_file, initial_down_weights, load_adapters


class EngineError(RuntimeError):
    """The engine cannot run (missing weights, out of memory, framework missing); the message says why."""


class OutOfMemory(EngineError):
    """The GPU ran out of memory (a pack that does is split in two and run again: jdiff.sweep)."""


def out_of_memory(what: str, tries: str, cause: str) -> EngineError:
    """The error for a GPU that ran out of memory while doing ``what``: what to try first, then the usual
    remedies, then the framework's own words (``cause``)."""
    return OutOfMemory(f"out of GPU memory while {what}. Try {tries}, a smaller train.batch_size or "
                       f"infer.batch_size, or a free GPU ({cause})")


ANOTHER_MODEL = ("Was the adapter trained on another model? Train one for this model, or point lora.path at an "
                 "adapter trained on it.")
SHOWN = 3  # how many names an error message lists


def check_rank_and_alpha(prefix: str, rank, alpha) -> None:
    """The rank and alpha of fresh adapters: an alpha of inf or NaN gives NaN images (B = 0 times inf)."""
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise EngineError(f"lora.{prefix}_rank={rank!r} is invalid: a LoRA rank is an integer >= 1.")
    if not np.isfinite(alpha) or alpha <= 0:
        raise EngineError(f"lora.{prefix}_alpha={alpha!r} is invalid: alpha must be a finite number > 0 "
                          f"(or null for alpha = rank).")


def lora_misfits(file: Path, prefix: str, adapter: Adapter, layers: dict, model) -> Optional[str]:
    """Why the adapters of ``prefix`` in ``file`` do not fit the adapted ``layers`` (name -> layer with
    ``in_features`` and ``out_features``) of ``model``, or None when they do: a module the model has no linear
    layer of, or an A (rank x in) or B (out x rank) matrix whose size is not the layer's."""
    missing = sorted(set(adapter.layers) - set(layers))
    if missing:
        listed = ", ".join(missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
        return (f"{file}: the {prefix} of the model in {model} has no linear layer {missing[0]} "
                f"({len(missing)} of the file's {len(adapter.layers)} {prefix} layers are missing: {listed}). "
                f"{ANOTHER_MODEL}")
    wrong = []
    for name, (down, up) in sorted(adapter.layers.items()):
        layer = layers[name]
        want_down, want_up = (adapter.rank, layer.in_features), (layer.out_features, adapter.rank)
        if tuple(down.shape) != want_down:
            wrong.append(f"{prefix}.{name}.lora_A.weight is {tuple(down.shape)} but the layer takes "
                         f"{layer.in_features} inputs, so A must be {want_down}")
        if tuple(up.shape) != want_up:
            wrong.append(f"{prefix}.{name}.lora_B.weight is {tuple(up.shape)} but the layer gives "
                         f"{layer.out_features} outputs, so B must be {want_up}")
    if wrong:
        more = f"; {len(wrong) - SHOWN} more tensors do not fit" if len(wrong) > SHOWN else ""
        return (f"{file}: {'; '.join(wrong[:SHOWN])}{more}. The adapter does not fit the model in {model}. "
                f"{ANOTHER_MODEL}")
    return None


def uint8_images(images: np.ndarray, prompts: list[str], *, mixed_precision: str = "no", alternatives=(),
                 adapted: bool = False) -> list[np.ndarray]:
    """Decoded images (B, H, W, 3), floats nominally in [0, 1], as uint8 (H, W, 3) arrays, one per prompt.

    Non-finite pixels would become black (NaN) or saturated (inf) images that still get saved and scored, so an
    image with any is refused: an EngineError names its prompts and what to try (``alternatives``: the
    engine.mixed_precision values to suggest instead of ``mixed_precision``; ``adapted``: a LoRA is attached)."""
    images = np.asarray(images)
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if not finite.all():
        bad = [p for p, ok in zip(prompts, finite) if not ok]
        listed = ", ".join(map(repr, bad[:SHOWN])) + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
        tries = []
        if mixed_precision != "no" and alternatives:
            tries.append(f"engine.mixed_precision={mixed_precision} can overflow: try engine.mixed_precision="
                         f"{' or '.join(alternatives)}")
        if adapted:
            tries.append("the LoRA adapter may be broken (a training that diverged): check lora.path, or train "
                         "again with a smaller train.lr")
        else:
            tries.append("no adapter is loaded, so check the model's weights (model.path)")
        raise EngineError(f"the images of {len(bad)} of {len(prompts)} prompts came out non-finite (NaN or inf "
                          f"pixels; saved, they would be black images that still get scored): {listed}. "
                          f"{'; '.join(tries)}.")
    return [(im.clip(0, 1) * 255).round().astype(np.uint8) for im in images]


@dataclass(frozen=True)
class LoraSpec:
    unet_rank: int
    unet_alpha: float
    unet_targets: tuple[str, ...]
    text_encoder_rank: int = 0
    text_encoder_alpha: float = 1.0
    text_encoder_targets: tuple[str, ...] = ()
    seed: int = 0  # initial A matrices come from jdiff.lora_file.initial_down_weights


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    text_encoder_lr_ratio: float


@dataclass
class TrainBatch:
    pixels: np.ndarray  # (B, 3, H, W) float32 in [-1, 1]
    prompts: list[str]
    weights: np.ndarray  # (B,) loss weight of each sample; the step's loss is sum(weights * per-sample MSE)
    timesteps: np.ndarray  # (B,) int64
    signal: np.ndarray  # (B,) sqrt(alpha_bar_t)
    noise_level: np.ndarray  # (B,) sqrt(1 - alpha_bar_t)
    noise: np.ndarray  # (B, C, h, w) the diffusion noise
    posterior_noise: np.ndarray  # (B, C, h, w) the noise of the VAE posterior sample


@dataclass
class GenerateRequest:
    prompts: list[str]
    noise: np.ndarray  # (B, C, h, w) initial latent noise, one per prompt
    steps: int
    guidance_scale: float
    negative_prompt: str = ""
    origin_prompts: Optional[list[str]] = None  # blended in with origin_scale
    origin_scale: float = 0.0
    init_image: Optional[np.ndarray] = None  # (3, H, W), or (B, 3, H, W) one per prompt, in [-1, 1]: img2img
    init_posterior_noise: Optional[np.ndarray] = None  # (B, C, h, w)
    strength: float = 1.0
    sampler: str = "model"
    adapters: Optional[np.ndarray] = None  # a pack's sampling: the adapter (run of the pack) of each prompt


class Engine(abc.ABC):
    """Loads a diffusers-format folder and gives the method its tensor primitives.

    Tensors are the engine's own (torch tensors, Jittor Vars); the method uses only arithmetic, slicing,
    ``reshape`` and ``mean`` on them, and the primitives below for everything else. Latents and predictions are
    float32 whatever the model's precision: an engine casts at the networks' inputs and outputs.
    """

    name: str
    mixed_precision: str  # engine.mixed_precision
    fallback_precisions: tuple[str, ...]  # the engine.mixed_precision values to suggest when half precision fails
    lora_settings: dict[str, tuple[int, float]]  # "unet" / "text_encoder" -> (rank, alpha) of the adapters

    @abc.abstractmethod
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latents of a ``resolution`` px image."""

    @property
    @abc.abstractmethod
    def prediction_type(self) -> str:
        """epsilon or v_prediction: what the UNet is trained to predict."""

    # -- LoRA: the same in every engine, through _attach and _set_adapter ----------------------------------

    def _models(self) -> dict:
        """The models that take adapters, by their prefix in LoRA files."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @abc.abstractmethod
    def _attach(self, prefix: str, targets, rank: int, alpha: float) -> dict:
        """Put adapters on the layers of ``prefix`` ("unet", "text_encoder") that ``targets`` name; return the
        adapted layers by their name in a LoRA file. Each has ``in_features`` and ``out_features``."""

    @abc.abstractmethod
    def _set_adapter(self, layer, down: np.ndarray, up: np.ndarray) -> None:
        """Copy A (rank x in) and B (out x rank) into one adapted layer."""

    def _attach_new(self, prefix: str, targets, rank: int, alpha: float) -> dict:
        self._refuse_second_adapter(prefix)
        layers = self._attach(prefix, targets, rank, alpha)
        if not layers:
            raise EngineError(f"lora targets {list(targets)} match no layer of the {prefix}")
        return layers

    def _refuse_second_adapter(self, prefix: str) -> None:
        if prefix in self.lora_settings:
            raise EngineError(f"the {prefix} has adapters already; attach one LoRA per engine (load a new engine).")

    def add_lora(self, spec: LoraSpec) -> None:
        """Attach fresh adapters (B = 0, so the model is unchanged until trained; A from the seed)."""
        plan = {"unet": (spec.unet_targets, spec.unet_rank, spec.unet_alpha)}
        if spec.text_encoder_rank > 0:
            plan["text_encoder"] = (spec.text_encoder_targets, spec.text_encoder_rank, spec.text_encoder_alpha)
        for prefix, (_, rank, alpha) in plan.items():
            check_rank_and_alpha(prefix, rank, alpha)
        for prefix, (targets, rank, alpha) in plan.items():
            key = f"lora.{prefix}_targets"
            try:
                layers = self._attach_new(prefix, targets, rank, alpha)
                for name, layer in layers.items():
                    down = initial_down_weights(name, rank, layer.in_features, spec.seed)
                    self._set_adapter(layer, down, np.zeros((layer.out_features, rank), np.float32))
            except (ValueError, RuntimeError, AttributeError) as err:  # peft's, or a layer that is not linear
                usual = "to_q, to_k, to_v, to_out.0" if prefix == "unet" else "q_proj, k_proj, v_proj, out_proj"
                raise EngineError(f"{key}={list(targets)} cannot take LoRA adapters ({str(err)[:200]}); name linear "
                                  f"layers of the {prefix}, such as {usual}.") from None
            self.lora_settings[prefix] = (rank, float(alpha))

    def load_lora(self, path: Path) -> None:
        """Attach the adapters stored in a jdiff/diffusers or kohya-ss (WebUI/ComfyUI) LoRA .safetensors file (or
        a run folder's lora.safetensors). Every value is checked first (:func:`jdiff.lora_file.load_adapters`;
        kohya names are matched against the model's linear layers), then every tensor against the layer it
        adapts (:func:`lora_misfits`): a file that cannot work is refused by name, before any image is made."""
        from jdiff.lora_file import linear_layer_names

        try:
            file = adapter_file(path)
            stored = load_adapters(file, lambda prefix: linear_layer_names(self._models()[prefix], prefix))
        except ValueError as err:
            raise EngineError(str(err)) from err
        model = getattr(self, "model_dir", "this engine's model")
        for prefix in stored:
            self._refuse_second_adapter(prefix)
        attached = {}
        for prefix, adapter in stored.items():  # every prefix checked before any weight is copied
            try:
                layers = self._attach(prefix, sorted(adapter.layers), adapter.rank, adapter.alpha)
            except ValueError as err:  # peft: no such module, or one it cannot adapt
                cause = str(err) if len(str(err)) <= 300 else str(err)[:300] + " ..."
                raise EngineError(f"{file}: the {prefix} of the model in {model} cannot take the adapters of its "
                                  f"{len(adapter.layers)} layers ({min(adapter.layers)}, ...): {cause} "
                                  f"{ANOTHER_MODEL}") from err
            problem = lora_misfits(file, prefix, adapter, layers, model)
            if problem:
                raise EngineError(problem)
            attached[prefix] = layers
        for prefix, adapter in stored.items():
            for name, (down, up) in sorted(adapter.layers.items()):
                try:
                    self._set_adapter(attached[prefix][name], down, up)
                except (RuntimeError, ValueError, TypeError) as err:  # a layer that is not a plain linear one
                    raise EngineError(f"{file}: cannot load {prefix}.{name} into the model's layer ({err}); is "
                                      f"that layer a linear one? {ANOTHER_MODEL}") from err
        for prefix, adapter in stored.items():
            self.lora_settings[prefix] = (adapter.rank, adapter.alpha)

    @abc.abstractmethod
    def save_lora(self, path: Path) -> None:
        """Write the attached adapters in the format diffusers' load_lora_weights reads."""

    @abc.abstractmethod
    def _adapted_layers(self, prefix: str) -> dict:
        """The adapted layers of ``prefix`` by their name in a LoRA file (as :meth:`_attach` returns them)."""

    def restore_lora(self, path: Path) -> None:
        """Copy the weights of a LoRA file this engine saved (:meth:`save_lora`) into the adapters attached now:
        the same prefixes, layers and ranks (a training checkpoint's adapter)."""
        stored = load_adapters(adapter_file(path))
        if sorted(stored) != sorted(self.lora_settings):
            raise EngineError(f"{path}: its adapters are on {sorted(stored)}, not on {sorted(self.lora_settings)}")
        for prefix, adapter in stored.items():
            layers = self._adapted_layers(prefix)
            problem = lora_misfits(Path(path), prefix, adapter, layers, getattr(self, "model_dir", "the model"))
            if problem or sorted(adapter.layers) != sorted(layers):
                raise EngineError(problem or f"{path}: its {prefix} adapters are on other layers than this run's")
            for name, (down, up) in adapter.layers.items():
                self._set_adapter(layers[name], down, up)

    def trainable_names(self) -> list[str]:
        """The adapter parameters the optimizer trains, by their key in a LoRA file
        (``unet.<layer>.lora_A.weight``), in the order of the optimizer's parameters."""
        return [f"{prefix}.{name}.lora_{part}.weight" for prefix in ("unet", "text_encoder") if prefix in
                self.lora_settings for name in self._adapted_layers(prefix) for part in ("A", "B")]

    @abc.abstractmethod
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's state after the steps taken, engine-neutral: ``step`` (steps taken, int64), and for each
        of :meth:`trainable_names` AdamW's moments ``<name>.exp_avg`` and ``<name>.exp_avg_sq`` (float32); an
        engine may add its own (``loss_scale``: scale and good steps of fp16 loss scaling)."""

    @abc.abstractmethod
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from an :meth:`optimizer_state` (after :meth:`setup_training`)."""

    # -- the text states of training batches ------------------------------------------------------------

    def token_array(self, prompts: list[str]) -> np.ndarray:
        """The CLIP token ids of ``prompts`` (B, 77), padded and truncated as Stable Diffusion's pipelines do."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="np").input_ids

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]):
        """The text encoder's last hidden states for ``prompts``: (B, tokens, width)."""

    @abc.abstractmethod
    def _states_without_gradients(self, prompts: list[str]) -> list:
        """One text-state tensor per prompt, computed outside the autograd graph."""

    @abc.abstractmethod
    def _stack(self, states: list):
        """Tensors of one shape as one batch tensor."""

    def training_prompt_states(self, prompts: list[str]):
        """The text states of a training batch. While the text encoder has no adapter its states never change,
        so each prompt is encoded once and kept."""
        if "text_encoder" in self.lora_settings:
            return self.encode_prompts(prompts)
        kept = self.__dict__.setdefault("_frozen_prompt_states", {})
        missing = [p for p in dict.fromkeys(prompts) if p not in kept]
        if missing:
            kept.update(zip(missing, self._states_without_gradients(missing)))
        return self._stack([kept[p] for p in prompts])

    @abc.abstractmethod
    def setup_training(self, settings: OptimizerSettings) -> None:
        """Freeze everything but the adapters and build the optimizer."""

    @abc.abstractmethod
    def train_step(self, batch: TrainBatch, lr: float) -> np.ndarray:
        """One optimizer step; returns the per-sample losses (B,) before weighting."""

    def start_train_step(self, batch: TrainBatch, lr: float) -> Callable[[], np.ndarray]:
        """Queue one optimizer step; the returned function waits for it and gives its per-sample losses.

        The training loop reads a step's losses only after queuing the next step, so an engine that runs
        asynchronously keeps its device busy while the host prepares the next batch. This default runs the
        step at once."""
        losses = self.train_step(batch, lr)
        return lambda: losses

    # -- the primitives of the method -------------------------------------------------------------------

    @abc.abstractmethod
    def encode_images(self, pixels, posterior_noise):
        """Latents of images (B, 3, H, W) in [-1, 1]: a VAE posterior sample, mean + std * posterior_noise, scaled
        into the UNet's latent space; float32, no gradients. Numpy arrays or the engine's tensors in."""

    @abc.abstractmethod
    def predict(self, latents, timesteps, states):
        """The UNet's float32 prediction for (B, C, h, w) float32 ``latents`` at (B,) ``timesteps`` given text
        ``states``, with the attached adapters; gradients flow to the adapters (in a training step)."""

    @abc.abstractmethod
    def sampling_prediction(self, latents, timestep, states):
        """:meth:`predict` at one sampling timestep (an element of the sampler's timesteps) for the whole batch,
        without gradients; recorded and replayed where the engine's compile mode does that."""

    @abc.abstractmethod
    def make_sampler(self, sampler: str):
        """A sampler for infer.sampler ``sampler`` (model: the scheduler the model's config names), with the
        interface of :mod:`jdiff.samplers`."""

    @abc.abstractmethod
    def latents(self, array: np.ndarray):
        """A host float32 array as the engine's float32 tensor."""

    @abc.abstractmethod
    def concat(self, tensors: list):
        """Tensors joined along the batch dimension."""

    def step_done(self, latents):
        """Called with the latents after each sampling step; an engine that builds lazy graphs runs the step
        here (Jittor), so the loop does not grow one graph over all its steps."""
        return latents

    @abc.abstractmethod
    def decode(self, latents) -> np.ndarray:
        """Images (B, H, W, 3) as float32 numpy, nominally in [0, 1], from float32 latents."""

    # -- self-attention hooks (StyleID style injection, jdiff/inject.py) ---------------------------------------

    def attention_layers(self) -> list[str]:
        """The UNet's attention modules (Transformer2DModel) that have self-attention, by their diffusers names
        (``up_blocks.2.attentions.1``), in the order of the network."""
        return list(dict.fromkeys(owner for owner, _, _ in self._self_attentions()))

    def _self_attentions(self) -> list[tuple[str, str, object]]:
        """(attention module, full name, module) of every transformer block's self-attention (``attn1``)."""
        found = []
        for name, module in self.unet.named_modules():
            parts = name.split(".")
            if len(parts) >= 4 and parts[-1] == "attn1" and parts[-3] == "transformer_blocks":
                found.append((".".join(parts[:-3]), name, module))
        return found

    @contextlib.contextmanager
    def self_attention_hook(self, layers: list[str], hook: Callable):
        """While inside, the self-attention of every transformer block of the attention modules ``layers`` calls
        ``hook(name, q, k, v)`` with its query, key and value after the projections (engine tensors, batch x
        heads x tokens x head_dim; ``name`` the attn1 module's full name) and attends with the (q, k, v) it
        returns: softmax(q k^T / sqrt(head_dim)) v, as it would have. Meanwhile sampling UNet calls run eagerly,
        not from a recorded graph (engine.compile=cuda-graphs, replay), whose Python code would not run."""
        chosen = [(name, module) for owner, name, module in self._self_attentions() if owner in set(layers)]
        if not chosen:
            raise EngineError(f"no self-attention in the UNet's layers {list(layers)}; it has "
                              f"{', '.join(self.attention_layers())}.")
        for name, module in chosen:
            self._hook_attention(module, name, hook)
        self.hooked = True
        try:
            yield
        finally:
            self.hooked = False
            for _, module in chosen:
                self._unhook_attention(module)

    hooked = False  # a self_attention_hook is active: sampling calls run eagerly

    @property
    def sampling_eagerly(self) -> bool:
        """Whether sampling calls must run eagerly, not from a recording: an attention hook is active (style
        injection), or a pack's prompts are routed to their adapters (the routing changes from batch to batch)."""
        router = getattr(self, "router", None)
        return self.hooked or (router is not None and router.ids is not None)

    @abc.abstractmethod
    def _hook_attention(self, module, name: str, hook: Callable) -> None:
        """Make the self-attention ``module`` pass its (q, k, v) through ``hook(name, q, k, v)``."""

    @abc.abstractmethod
    def _unhook_attention(self, module) -> None:
        """Give ``module`` back its own attention."""

    @abc.abstractmethod
    def sampling(self) -> contextlib.AbstractContextManager:
        """The context sampling runs in: no gradients, and the engine's advice when the GPU runs out of memory."""

    def generate(self, request: GenerateRequest) -> list[np.ndarray]:
        """Sample images with the method's loop; returns uint8 (H, W, 3) arrays, one per prompt."""
        from jdiff.generate import denoise  # the method lives with the stage that uses it, not in the engines

        with self.sampling(), self.routed(request.adapters):
            return denoise(self, request)

    # -- packs: the adapters of K runs on one model, each sample through its run's (jdiff.pack) -------------

    def add_packed_lora(self, specs: list[LoraSpec]) -> None:
        """Attach fresh adapters for each of ``specs`` (the runs of a pack: the same target layers, any ranks and
        alphas), each initialised as :meth:`add_lora` would for that run alone."""
        raise EngineError(f"engine={self.name} cannot train packed runs; use sweep.pack=1")

    def setup_packed_training(self, settings: list[OptimizerSettings]) -> None:
        """An optimiser per run of the pack (its own learning rate, betas, eps, decay and clipping norm)."""
        raise EngineError(f"engine={self.name} cannot train packed runs; use sweep.pack=1")

    def start_packed_train_step(self, batch: TrainBatch, lrs: np.ndarray) -> Callable[[], np.ndarray]:
        """Queue one step of every run: ``batch`` is the runs' batches one after the other, of equal sizes, and
        ``lrs`` their learning rates; the returned function gives the per-sample losses."""
        raise EngineError(f"engine={self.name} cannot train packed runs; use sweep.pack=1")

    def packed_adapters(self, k: int) -> dict[str, Adapter]:
        """Run ``k``'s adapters, as :func:`jdiff.lora_file.save_adapters` takes them."""
        raise EngineError(f"engine={self.name} cannot train packed runs")

    def keep_packed(self, members: list[int]) -> None:
        """Go on with runs ``members`` of the pack only (a run that failed is dropped)."""
        raise EngineError(f"engine={self.name} cannot train packed runs")

    @contextlib.contextmanager
    def routed(self, ids: Optional[np.ndarray]):
        """The context of a pack's sampling: prompt i through the adapter of run ``ids[i]`` (the packed layers'
        router, which :meth:`add_packed_lora` made, takes them as the engine's tensor: :meth:`route_ids`)."""
        if ids is None:
            yield
            return
        router = getattr(self, "router", None)
        if router is None:
            raise EngineError(f"engine={self.name} has no packed adapters to route prompts to")
        router.ids = self.route_ids(np.asarray(ids))
        try:
            yield
        finally:
            router.ids = None

    def route_ids(self, ids: np.ndarray):
        """Adapter indices (one per prompt) as the engine's integer tensor."""
        raise EngineError(f"engine={self.name} cannot sample packed runs")


def pack_plan(specs: list[LoraSpec]) -> list[tuple[str, tuple, list[int], list[float]]]:
    """(prefix, targets, ranks, alphas) of the models a pack adapts; the runs of a pack adapt the same layers."""
    plan = [("unet", specs[0].unet_targets, [s.unet_rank for s in specs], [s.unet_alpha for s in specs])]
    if specs[0].text_encoder_rank > 0:
        plan.append(("text_encoder", specs[0].text_encoder_targets, [s.text_encoder_rank for s in specs],
                     [s.text_encoder_alpha for s in specs]))
    return plan


def create_engine(name: str, model_dir: Path, *, prediction_type: Optional[str] = None, deterministic: bool = False,
                  **options) -> Engine:
    """The ``name`` engine (see jdiff.engines.options.ENGINES) on the model in ``model_dir``, its module imported
    only now: the core never imports a deep-learning framework itself.

    ``options`` are the engine's options (``engine.*``: TorchOptions or JittorOptions): one the engine does not
    have, or a value that cannot work, raises an EngineError naming it, before anything is imported.
    ``prediction_type`` (model.prediction_type) overrides the scheduler config's; ``deterministic``
    (the top-level key): repeatable results where the framework has deterministic kernels, at some cost in speed;
    the torch engine uses it, the Jittor engine has no such setting yet and ignores it.
    """
    try:
        settings = engine_options(name, options)
    except EngineOptionError as err:
        raise EngineError(str(err)) from None
    entry = ENGINES[name]
    engine_class = getattr(importlib.import_module(entry.module), entry.cls)
    return engine_class(model_dir, settings, prediction_type=prediction_type, deterministic=deterministic)
