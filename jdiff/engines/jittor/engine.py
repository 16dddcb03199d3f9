"""The Jittor engine: jdiff's native Stable Diffusion (UNet, VAE, CLIP text encoder) in Jittor, with jdiff's own
samplers (:mod:`jdiff.samplers`); the primitives of jdiff's method in Jittor.

It loads the same diffusers-format folder as the torch engine, by parameter name, and does the same
arithmetic in the same order, so the two engines given the same weights and random numbers agree within
float tolerance (tests/test_jittor_engine.py). Random numbers never come from Jittor: the core passes every
noise array in. LoRA files are the torch engine's (and diffusers') format, in both directions.

Mixed precision (``mixed_precision=fp16``): the UNet, VAE and text encoder run in float16, the LoRA adapters
stay float32 (see :mod:`jdiff.engines.jittor.lora`), and the loss and the sampler's arithmetic are float32.
The model inputs are cast to the model's dtype at the entry points below, so no float32 tensor promotes the
network back to float32 (Jittor computes a float32-float16 operation in float32).

``compile=replay`` (engine.compile): the whole training step (VAE encoding, UNet forward and backward, loss
scaling, clipping, AdamW) and each sampling UNet call are recorded once and replayed from Jittor's execution
plan (:mod:`jdiff.engines.jittor.fast.replay`). The step is then a function of its inputs: the adapters and their
AdamW moments go in and come out updated, and the numbers that change between steps (bias corrections,
learning rates, the loss scale) go in as a small array, computed on the host as Jittor's AdamW computes them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from jdiff.engines.base import Engine, EngineError, OptimizerSettings, TrainBatch, out_of_memory
from jdiff.engines.jittor.env import import_jittor, use_device
from jdiff.engines.options import JittorOptions

jt = import_jittor()  # before the modules below import Jittor: they find its environment set

from jdiff.engines.jittor.lora import (LoraLinear, adapter_linears, adapter_of, attach_lora,  # noqa: E402
                                       lora_layers, lora_parameters)
from jdiff.engines.jittor.fast.replay import Replay, device_arrays, extension  # noqa: E402
from jdiff.engines.jittor.pack import JittorPacking  # noqa: E402
from jdiff.engines.jittor.text_encoder import CLIPTextModel  # noqa: E402
from jdiff.engines.jittor.unet import UNet2DConditionModel  # noqa: E402
from jdiff.engines.jittor.vae import AutoencoderKL  # noqa: E402
from jdiff.lora_file import save_adapters  # noqa: E402
from jdiff.samplers import make_sampler  # noqa: E402
from jdiff.schedule import read_scheduler_config  # noqa: E402
from jdiff.train import diffusion_loss, weighted_loss  # noqa: E402

log = logging.getLogger(__name__)

DTYPES = {"no": "float32", "fp16": "float16"}
# How Jittor says the GPU ran out of memory: its allocator's own error (after it freed its cache and retried),
# the CUDA runtime's, and cuDNN's or cuBLAS's
OUT_OF_MEMORY_SIGNS = ("Unable to alloc cuda device memory", "cudaErrorMemoryAllocation", "STATUS_ALLOC_FAILED")


@contextlib.contextmanager
def out_of_memory_hint(what: str, tries: str):
    """Turn Jittor's out-of-memory error (a RuntimeError with its memory report) into an EngineError that says
    what to try; the line that named the failure is kept as the cause."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        sign = next((s for s in OUT_OF_MEMORY_SIGNS if s in text), None)
        if isinstance(err, EngineError) or sign is None:
            raise
        with contextlib.suppress(Exception):  # give back what Jittor can; the advice matters more
            jt.gc()
        cause = next(line for line in text.splitlines() if sign in line).strip()
        raise out_of_memory(what, tries, cause) from err


class DynamicLossScale:
    """Loss scaling for float16 training: the loss is multiplied by ``scale`` before the backward pass so small
    gradients do not underflow float16, and the gradients are divided by it again before clipping and the
    optimizer step. When a gradient comes out inf or nan, the step is skipped and the scale halved; after
    ``growth_interval`` good steps in a row it doubles (torch's GradScaler's policy)."""

    def __init__(self, scale: float = 2.0 ** 15, growth_interval: int = 200):
        self.scale = scale
        self.growth_interval = growth_interval
        self.good_steps = 0

    def backward(self, optimizer: "jt.optim.Optimizer", loss: "jt.Var") -> bool:
        """The unscaled gradients of ``loss`` into ``optimizer``; False (nothing to step) when they overflowed."""
        optimizer.backward(loss * self.scale)
        grads = [g for group in optimizer.param_groups for g in group["grads"]]
        for g in grads:
            g.update(g / self.scale)
        # any inf or nan makes the sum inf or nan; one reduction over all gradients (one kernel, not one a tensor)
        finite = bool(np.isfinite(jt.concat([g.flatten() for g in grads]).sum().item()))
        if not finite:
            optimizer.zero_grad()
            optimizer.n_step -= 1  # Jittor counts steps in backward(); AdamW's bias correction must see taken ones
        return self.update(finite)

    def update(self, finite: bool) -> bool:
        """The policy, after a step whose gradients were ``finite`` or not; returns ``finite``."""
        if not finite:
            self.scale /= 2
            self.good_steps = 0
            log.info("fp16 gradients overflowed: step skipped, loss scale now %g", self.scale)
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2
            self.good_steps = 0
        return True


class JittorEngine(JittorPacking, Engine):
    name = "jittor"
    fallback_precisions = ("no",)

    def __init__(self, model_dir: Path, options: JittorOptions, *, prediction_type: Optional[str] = None,
                 deterministic: bool = False):
        # The option values are checked by JittorOptions.problem (create_engine and jdiff.validate call it); a
        # device the machine lacks is use_device's to refuse. deterministic: Jittor has no such setting yet (ignored).
        device, mixed_precision, allow_pickle, compile = (options.device, options.mixed_precision,
                                                          options.allow_pickle, options.compile)
        use_device(jt, device)
        self.replay = compile == "replay"
        if self.replay:
            extension()  # compiled at first use (seconds, cached); fails here, not mid-run
        self.dtype = DTYPES[mixed_precision]
        self.model_dir = Path(model_dir)
        self.scheduler_config = read_scheduler_config(self.model_dir)
        self._prediction_type = prediction_type or self.scheduler_config.get("prediction_type", "epsilon")
        from transformers import CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.model_dir, subfolder="tokenizer")
        except (OSError, EnvironmentError) as err:
            raise EngineError(f"cannot load the tokenizer from {self.model_dir / 'tokenizer'}: {err}") from err
        self.text_encoder = CLIPTextModel.from_pretrained(self.model_dir / "text_encoder", allow_pickle)
        self.vae = AutoencoderKL.from_pretrained(self.model_dir / "vae", allow_pickle)
        self.unet = UNet2DConditionModel.from_pretrained(self.model_dir / "unet", allow_pickle)
        if self.dtype == "float16":  # the base weights only: adapters are added later, in float32
            for model in (self.text_encoder, self.vae, self.unet):
                model.float16()
        self.loss_scale = DynamicLossScale() if self.dtype == "float16" else None
        self.optimizer: Optional[jt.optim.AdamW] = None
        self.lora_settings: dict[str, tuple[int, float]] = {}  # prefix -> (rank, alpha) of attached adapters
        self._unet_call = Replay(self._unet_graph, "sampling UNet call")
        self._step_call = Replay(self._step_graph, "training step")
        self._linears: dict[str, list] = {}  # prefix -> adapter_linears of that model, until adapters are attached

    # -- shapes and settings ------------------------------------------------------------------------------

    @property
    def prediction_type(self) -> str:
        return self._prediction_type

    @property
    def mixed_precision(self) -> str:
        return "fp16" if self.dtype == "float16" else "no"

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.vae.downsampling_factor
        return (self.vae.latent_channels, resolution // factor, resolution // factor)

    # -- LoRA --------------------------------------------------------------------------------------------

    def _attach(self, prefix: str, targets, rank: int, alpha: float) -> dict[str, LoraLinear]:
        self._unet_call.clear()  # recorded plans hold the model as it was
        self._step_call.clear()
        self._linears.clear()
        return attach_lora(self._models()[prefix], targets, rank, alpha)

    def _adapter_linears(self, prefixes=("unet", "text_encoder")) -> list:
        """The adapters' linear layers, found once per attachment (walking every module costs milliseconds, and
        each replayed call needs them)."""
        for prefix in prefixes:
            if prefix not in self._linears:
                self._linears[prefix] = adapter_linears(self._models()[prefix])
        return [linear for prefix in prefixes for linear in self._linears[prefix]]

    @contextlib.contextmanager
    def _adapters_bound(self, linears: list, weights: list):
        """The adapters computing with ``weights`` (a recording's stand-ins) for a while."""
        kept = [linear.weight for linear in linears]
        for linear, weight in zip(linears, weights):
            linear.weight = weight
        try:
            yield
        finally:
            for linear, weight in zip(linears, kept):
                linear.weight = weight

    def _set_adapter(self, layer: LoraLinear, down: np.ndarray, up: np.ndarray) -> None:
        layer.set_weights(down, up)

    def save_lora(self, path: Path, extra_metadata: Optional[dict] = None) -> None:
        adapters = {prefix: adapter_of(lora_layers(self._models()[prefix]), rank, alpha)
                    for prefix, (rank, alpha) in self.lora_settings.items()}
        save_adapters(path, adapters, extra_metadata)

    def _adapted_layers(self, prefix: str) -> dict[str, LoraLinear]:
        return lora_layers(self._models()[prefix])

    # -- training -----------------------------------------------------------------------------------------

    def setup_training(self, settings: OptimizerSettings) -> None:
        """AdamW over the adapters only (torch's formula: decoupled weight decay, bias correction, eps outside
        the square root); the text encoder's adapters get ``text_encoder_lr_ratio`` times the learning rate."""
        self.settings = settings
        groups = []
        self.group_of = []  # per trainable parameter: 0 for the UNet's adapters, 1 for the text encoder's
        for index, (prefix, ratio) in enumerate((("unet", 1.0), ("text_encoder", settings.text_encoder_lr_ratio))):
            params = lora_parameters(self._models()[prefix])
            for p in params:
                p.start_grad()
            if params:
                groups.append({"params": params, "lr": settings.lr * ratio, "lr_ratio": ratio})
                self.group_of += [index] * len(params)
        if not groups:
            raise EngineError("no LoRA adapters to train: call add_lora first")
        self.trainable = [p for g in groups for p in g["params"]]
        if self.replay:  # the replayed step keeps AdamW's moments (m, then v) itself, as inputs and outputs
            self.moments = [jt.zeros(p.shape, p.dtype).stop_grad() for p in self.trainable * 2]
            self.steps_taken = 0
        else:
            self.optimizer = jt.optim.AdamW(groups, lr=settings.lr, eps=settings.eps, betas=settings.betas,
                                            weight_decay=settings.weight_decay)

    def _moments(self) -> tuple[list, list]:
        """AdamW's first and second moments, in the order of ``self.trainable``."""
        if self.replay:
            k = len(self.trainable)
            return self.moments[:k], self.moments[k:]
        groups = self.optimizer.param_groups  # Jittor's AdamW: "m" is exp_avg, "values" exp_avg_sq
        return [m for g in groups for m in g["m"]], [v for g in groups for v in g["values"]]

    def optimizer_state(self) -> dict[str, np.ndarray]:
        exp_avg, exp_avg_sq = self._moments()
        steps = self.steps_taken if self.replay else self.optimizer.n_step
        state = {"step": np.asarray(steps, np.int64)}
        for key, m, v in zip(self.trainable_names(), exp_avg, exp_avg_sq, strict=True):
            state[f"{key}.exp_avg"], state[f"{key}.exp_avg_sq"] = m.numpy().copy(), v.numpy().copy()
        if self.loss_scale:
            state["loss_scale"] = np.asarray([self.loss_scale.scale, self.loss_scale.good_steps], np.float64)
        return state

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        names = self.trainable_names()
        exp_avg = [jt.array(np.array(state[f"{key}.exp_avg"], np.float32)).stop_grad() for key in names]
        exp_avg_sq = [jt.array(np.array(state[f"{key}.exp_avg_sq"], np.float32)).stop_grad() for key in names]
        if self.replay:
            self.trainable = lora_parameters(self._models()["unet"]) + (
                lora_parameters(self.text_encoder) if "text_encoder" in self.lora_settings else [])
            self.moments = exp_avg + exp_avg_sq
            self.steps_taken = int(state["step"])
        else:
            for m, v, a, b in zip(*self._moments(), exp_avg, exp_avg_sq):
                m.assign(a)
                v.assign(b)
            self.optimizer.n_step = int(state["step"])
        if self.loss_scale and "loss_scale" in state:
            self.loss_scale.scale, good = (float(x) for x in state["loss_scale"])
            self.loss_scale.good_steps = int(good)

    def token_ids(self, prompts: list[str]) -> jt.Var:
        return jt.array(self.token_array(prompts).astype(np.int32))

    def encode_prompts(self, prompts: list[str]) -> jt.Var:
        return self.text_encoder(self.token_ids(prompts))

    def _states_without_gradients(self, prompts: list[str]) -> list[jt.Var]:
        with jt.no_grad():
            states = self.encode_prompts(prompts)
        return [states[i].stop_grad() for i in range(len(prompts))]

    def _stack(self, states: list[jt.Var]) -> jt.Var:
        return jt.stack(states)

    def encode_images(self, pixels, posterior_noise) -> jt.Var:
        pixels, posterior_noise = (jt.array(a) if isinstance(a, np.ndarray) else a for a in (pixels, posterior_noise))
        with jt.no_grad():
            mean, std = self.vae.encode(pixels.cast(self.dtype))
            return (mean.float32() + std.float32() * posterior_noise - self.vae.shift_factor) * self.vae.scaling_factor

    def predict(self, latents: jt.Var, timesteps: jt.Var, states: jt.Var) -> jt.Var:
        return self.unet(latents.cast(self.dtype), timesteps, states).float32()

    def loss_terms(self, batch: TrainBatch) -> jt.Var:
        """The per-sample losses of a batch (:func:`jdiff.train.diffusion_loss`)."""
        pixels, posterior_noise, noise, signal, noise_level, timesteps = (jt.array(a) for a in (
            batch.pixels, batch.posterior_noise, batch.noise, batch.signal, batch.noise_level, batch.timesteps))
        return diffusion_loss(self, pixels, posterior_noise, self.training_prompt_states(batch.prompts), noise, signal,
                              noise_level, timesteps)

    @property
    def _memory_tries(self) -> str:
        """What to try first when the GPU runs out of memory."""
        half = "" if self.dtype == "float16" else "engine.mixed_precision=fp16, "
        return half + "JDIFF_CUDNN_WORKSPACE_GIB=0.5 (a smaller cuDNN search workspace than the default 2 GiB)"

    def train_step(self, batch: TrainBatch, lr: float) -> np.ndarray:
        with out_of_memory_hint("training", self._memory_tries):
            if self.replay:
                return self._replayed_step(batch, lr)
            return self._eager_step(batch, lr)

    def _eager_step(self, batch: TrainBatch, lr: float) -> np.ndarray:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_ratio"]
        per_sample = self.loss_terms(batch)
        loss = weighted_loss(per_sample, jt.array(batch.weights))
        if self.loss_scale is None:
            self.optimizer.backward(loss)
        elif not self.loss_scale.backward(self.optimizer, loss):
            return per_sample.numpy()  # overflow: no step this time, a smaller scale next time
        if self.settings.max_grad_norm > 0:
            self.optimizer.clip_grad_norm(self.settings.max_grad_norm)
        self.optimizer.step()
        # The update runs now, with the step, not lazily inside whatever reads the adapters next (the next step,
        # or samples taken between steps: compiled into another kernel there, its float rounding would differ)
        jt.sync([per_sample, *self.trainable, *[x for moments in self._moments() for x in moments]])
        return per_sample.numpy()

    def _replayed_step(self, batch: TrainBatch, lr: float) -> np.ndarray:
        """``train_step`` through the recorded step. Jittor's AdamW computes its bias corrections and decays on the
        host in float64 and uses them as float32 constants; here the same numbers go in as one float32 array."""
        s = self.settings
        n = self.steps_taken + 1
        scalars = [1 - s.betas[1] ** n]  # bias correction 2; the graph takes its square root in float32, as Jittor
        for ratio in (1.0, s.text_encoder_lr_ratio):
            scalars += [lr * ratio / (1 - s.betas[0] ** n), 1 - lr * ratio * s.weight_decay]  # step size, decay
        scalars.append(self.loss_scale.scale if self.loss_scale else 1.0)
        if "text_encoder" in self.lora_settings:  # the text states come from the adapted encoder, in the step
            text = self.token_ids(batch.prompts)
        else:
            text = self.training_prompt_states(batch.prompts)
        arrays = (np.asarray(scalars, np.float32), batch.pixels, batch.posterior_noise, batch.noise, batch.signal,
                  batch.noise_level, batch.timesteps, batch.weights)
        outputs = self._step_call([*self.trainable, *self.moments, *device_arrays(arrays), text])
        report = outputs[0].numpy()
        # the sum of the gradients is inf or nan if any of them is: then the step is dropped (the adapters and
        # moments it was given are kept) and the scale halved. The check is here, not a jt.where in the step,
        # because Jittor compiles CPU kernels with -Ofast, under which a kernel cannot see inf or nan.
        if not self.loss_scale or self.loss_scale.update(bool(np.isfinite(report[-1]))):
            k = len(self.trainable)
            for linear, weight in zip(self._adapter_linears(), outputs[1:k + 1]):
                linear.weight = weight
            self.trainable, self.moments = outputs[1:k + 1], outputs[k + 1:]
            self.steps_taken += 1
        return report[:-1]

    def _step_graph(self, inputs: list) -> list:
        """One training step as a function: (adapters, moments, scalars, batch) -> (report, adapters, moments).
        The report is the per-sample losses and, last, the sum of the unscaled gradients."""
        k = len(self.trainable)
        params, exp_avg, exp_avg_sq = inputs[:k], inputs[k:2 * k], inputs[2 * k:3 * k]
        scalars, pixels, posterior_noise, noise, signal, noise_level, timesteps, weights, text = inputs[3 * k:]
        linears = self._adapter_linears()
        with self._adapters_bound(linears, params):
            states = self.text_encoder(text) if "text_encoder" in self.lora_settings else text
            per_sample = diffusion_loss(self, pixels, posterior_noise, states, noise, signal, noise_level, timesteps)
            loss = weighted_loss(per_sample, weights)
            if self.loss_scale:
                grads = [g / scalars[5] for g in jt.grad(loss * scalars[5], params)]
            else:
                grads = jt.grad(loss, params)
        flat = jt.concat([g.flatten() for g in grads])
        s = self.settings
        if s.max_grad_norm > 0:  # Jittor's clip_grad_norm
            clip = jt.minimum(s.max_grad_norm / (jt.norm(flat, 2) + 1e-6), 1.0)
            grads = [g * clip for g in grads]
        (b1, b2), root_correction2 = s.betas, jt.sqrt(scalars[0])
        new_params, new_avg, new_avg_sq = [], [], []
        for p, g, m, v, group in zip(params, grads, exp_avg, exp_avg_sq, self.group_of):  # Jittor's AdamW's order
            step_size, decay = scalars[1 + 2 * group], scalars[2 + 2 * group]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            moved = p * decay - step_size * m / (jt.sqrt(v) / root_correction2 + s.eps)
            new_params.append(moved)
            new_avg.append(m)
            new_avg_sq.append(v)
        report = jt.concat([per_sample, flat.sum().reshape(1)])
        return [report, *new_params, *new_avg, *new_avg_sq]

    # -- sampling -----------------------------------------------------------------------------------------

    def make_sampler(self, sampler: str):
        return make_sampler(self.scheduler_config, sampler, self.prediction_type)

    @contextlib.contextmanager
    def sampling(self):
        with out_of_memory_hint("generating images", self._memory_tries), jt.no_grad():
            yield

    def latents(self, array: np.ndarray) -> jt.Var:
        return jt.array(array)

    def concat(self, tensors: list[jt.Var]) -> jt.Var:
        return jt.concat(tensors)

    def step_done(self, latents: jt.Var) -> jt.Var:
        latents.sync()  # run each step as it comes, not as one graph over all steps
        return latents

    def decode(self, latents: jt.Var) -> np.ndarray:
        images = self.vae.decode((latents / self.vae.scaling_factor + self.vae.shift_factor).cast(self.dtype))
        return (images.float32() * 0.5 + 0.5).transpose(0, 2, 3, 1).numpy()

    def sampling_prediction(self, latents: jt.Var, timestep, states: jt.Var) -> jt.Var:
        """With ``compile=replay``, from the recorded call for these shapes."""
        timesteps = jt.array([int(timestep)])
        if not self.replay or self.sampling_eagerly:  # hooked or routed: code a replayed plan would skip
            return self.predict(latents, timesteps, states)
        return self._unet_call([*(w.weight for w in self._adapter_linears(("unet",))), latents.cast(self.dtype),
                                timesteps, states])[0]

    def _hook_attention(self, module, name: str, hook) -> None:
        def hooked(q, k, v):
            # in the model's precision again: Jittor widens a float16 Var times a Python float to float32
            return tuple(x.cast(q.dtype) for x in hook(name, q, k, v))

        module.hook = hooked

    def _unhook_attention(self, module) -> None:
        module.hook = None

    def _unet_graph(self, inputs: list) -> list:
        linears = self._adapter_linears(("unet",))
        with self._adapters_bound(linears, inputs[:len(linears)]):
            return [self.unet(*inputs[len(linears):]).float32()]
