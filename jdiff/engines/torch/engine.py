"""The PyTorch engine: diffusers models and schedulers, peft LoRA; the primitives of jdiff's method in torch.

Random numbers never come from torch: the core passes every noise tensor in, so this engine and the
Jittor one see the same numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers import schedulers as diffusers_schedulers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextModel, CLIPTokenizer

from jdiff.devices import DeviceError, torch_device
from jdiff.engines.base import Engine, EngineError, OptimizerSettings, TrainBatch, out_of_memory
from jdiff.engines.options import TorchOptions, triton_interpreting
from jdiff.engines.torch.graphs import CapturedCall, CapturedCalls, CaptureError
from jdiff.engines.torch.pack import TorchPacking
from jdiff.lora_file import Adapter, save_adapters
from jdiff.schedule import read_scheduler_config
from jdiff.train import diffusion_loss, weighted_loss

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str) -> torch.device:
    try:
        return torch_device(device, "engine.device")
    except DeviceError as err:
        raise EngineError(str(err)) from err


def configure_torch(threads: Optional[int], deterministic: bool) -> None:
    """Process-wide settings that decide whether two runs give the same numbers.

    CPU results depend on the thread count (reductions are split per thread), so it is set explicitly
    rather than left to whatever OMP_NUM_THREADS a launcher put in the environment. ``deterministic``
    picks deterministic CUDA kernels where they exist (ops without one warn), disables cuDNN's
    benchmark-based algorithm choice, and gives cuBLAS a fixed workspace (read when its first handle is
    made, so before any model moves to the GPU).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads or cores or 1)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextlib.contextmanager
def out_of_memory_hint(what: str):
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        raise out_of_memory(what, "engine.mixed_precision=bf16", str(err)) from err
    except CaptureError as err:
        raise EngineError(
            f"engine.compile=cuda-graphs could not record a CUDA graph while {what} ({err}). Run with "
            f"engine.compile=no, or reduce-overhead (torch.compile records what it can and runs the rest eagerly)"
        ) from err


def float_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a recorded call's output, which the next replay overwrites."""
    return tensor.clone() if tensor.dtype == torch.float32 else tensor.float()


class WeightCastingLinear(torch.nn.Linear):
    """A linear layer that keeps fp32 weights and computes in its input's precision: the weights are cast on
    each call (gradients flow back to the fp32 copy, as under autocast). LoRA's A and B in bf16 models
    become this, so no activation is widened to fp32 around each adapted layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


class HookedSelfAttention:
    """A diffusers attention processor for a self-attention whose query, key and value pass through a hook
    (:meth:`jdiff.engines.base.Engine.self_attention_hook`) before the attention, as AttnProcessor2_0 computes
    it otherwise (scaled dot-product attention in the model's precision, then ``to_out``)."""

    def __init__(self, name: str, hook, original):
        self.name, self.hook, self.original = name, hook, original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if (encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3
                or attn.spatial_norm is not None or attn.group_norm is not None
                or getattr(attn, "norm_q", None) is not None):
            raise EngineError(f"the self-attention {self.name} is not Stable Diffusion's plain one (a mask, norms "
                              f"or a 4-D input); style injection cannot hook it: choose other inject.layers.")
        residual = hidden_states
        batch = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = self.hook(self.name, heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)),
                            heads(attn.to_v(hidden_states)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class DiffusersSampler:
    """A diffusers scheduler behind the interface of jdiff's samplers (:mod:`jdiff.samplers`)."""

    def __init__(self, scheduler, device: torch.device):
        self.scheduler, self.device = scheduler, device
        self.order = scheduler.order

    @property
    def init_noise_sigma(self):
        return self.scheduler.init_noise_sigma

    def set_timesteps(self, steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=self.device)
        return self.scheduler.timesteps

    def skip(self, steps: int) -> torch.Tensor:
        start = steps * self.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return self.scheduler.timesteps[start:]

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(clean, noise, timestep.reshape(1).repeat(len(clean)))

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.scheduler.scale_model_input(sample, timestep)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(model_output, timestep, sample).prev_sample


class TorchEngine(TorchPacking, Engine):
    name = "torch"
    fallback_precisions = ("bf16", "no")

    def __init__(self, model_dir: Path, options: TorchOptions, *, prediction_type: Optional[str] = None,
                 deterministic: bool = False):
        # The option values are checked by TorchOptions.problem (create_engine and jdiff.validate call it). Here and
        # in _convolution_layout only what needs the runtime: fp16 and cuda-graphs on the device that device=auto
        # picked, and whether Triton is installed for group_norm=triton.
        device, mixed_precision, allow_pickle, compile = (options.device, options.mixed_precision,
                                                          options.allow_pickle, options.compile)
        group_norm, channels_last = options.group_norm, options.channels_last
        configure_torch(options.threads, deterministic)
        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        self.dtype = DTYPES[mixed_precision]
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise EngineError("engine.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no.")
        self.scheduler_config = read_scheduler_config(self.model_dir)
        self._prediction_type = prediction_type or self.scheduler_config.get("prediction_type", "epsilon")
        self.mixed_precision = mixed_precision
        # allow_pickle: .bin weights too, where a component has no .safetensors (None: diffusers and transformers
        # take the .safetensors file when there is one, else the .bin); without it, .safetensors only
        kwargs = {"use_safetensors": None if allow_pickle else True, "torch_dtype": self.dtype}
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.model_dir, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(self.model_dir, subfolder="text_encoder", **kwargs)
            self.vae = AutoencoderKL.from_pretrained(self.model_dir, subfolder="vae", **kwargs)
            self.unet = UNet2DConditionModel.from_pretrained(self.model_dir, subfolder="unet", **kwargs)
        except (OSError, EnvironmentError) as err:
            hint = "" if allow_pickle else (
                " If the folder only has pickle .bin weights, convert them to .safetensors or set "
                "engine.allow_pickle=true (pickle files can run arbitrary code)."
            )
            raise EngineError(f"cannot load the model from {self.model_dir}: {err}.{hint}") from err
        for model in (self.text_encoder, self.vae, self.unet):
            model.requires_grad_(False)
            model.eval()
            model.to(self.device)
        self._convolution_layout(group_norm, channels_last)
        # Compiled at the first call, after the LoRA layers are in; module names stay the same. The VAE encoder
        # runs every training step (the augmented images change), so it is compiled too.
        self.graphs = compile in ("reduce-overhead", "max-autotune")  # these modes replay CUDA graphs
        if compile not in ("no", "cuda-graphs"):
            self.unet.compile(mode=compile)
            self.vae.encoder.compile(mode=compile)
        # cuda-graphs: the whole training step and each sampling UNet call recorded as CUDA graphs, no compiler
        if compile == "cuda-graphs" and self.device.type != "cuda":
            raise EngineError("engine.compile=cuda-graphs records CUDA graphs and needs a CUDA GPU; on the CPU use "
                              "engine.compile=no.")
        self.capture: Optional[bool] = True if compile == "cuda-graphs" else None
        self._train_call: Optional[CapturedCall] = None
        self._unet_calls: Optional[CapturedCalls] = None
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.vae_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.lora_settings: dict[str, tuple[int, float]] = {}  # prefix -> (rank, alpha) of attached adapters

    def _convolution_layout(self, group_norm: str, channels_last: bool) -> None:
        """GroupNorm by jdiff's Triton kernels (``group_norm=triton``) and the convolution networks in channels-last
        memory format. cuDNN runs half-precision convolutions in NHWC and converts NCHW tensors around each one;
        PyTorch's CUDA GroupNorm returns NCHW, so channels-last alone mostly moves the conversions to the norms.
        The Triton GroupNorm keeps its input's memory format."""
        if group_norm == "triton":
            if importlib.util.find_spec("triton") is None:
                raise EngineError("engine.group_norm=triton needs Triton (pip install triton; PyTorch's CUDA builds "
                                  "for Linux bring it). Use engine.group_norm=native.")
            if self.device.type != "cuda" and not triton_interpreting():
                raise EngineError("engine.group_norm=triton runs on CUDA GPUs; on the CPU use "
                                  "engine.group_norm=native.")
            from jdiff.engines.torch.group_norm import use_triton_group_norm

            use_triton_group_norm(self.vae, self.unet)
        if channels_last:
            for model in (self.vae, self.unet):
                model.to(memory_format=torch.channels_last)

    # -- shapes and settings ------------------------------------------------------------------------------

    @property
    def prediction_type(self) -> str:
        return self._prediction_type

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, resolution // factor, resolution // factor)

    def _tensor(self, array: np.ndarray, dtype=None) -> torch.Tensor:
        """A host array on the engine's device. On CUDA it goes through pinned memory without waiting, so the
        host can queue the next step while the GPU still runs this one (a plain copy would wait for the GPU)."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, dtype=dtype or self.dtype, non_blocking=True)

    def use_static_calls(self, capture: bool) -> None:
        """Run training steps and sampling UNet calls through static input buffers, recorded as CUDA graphs
        (``capture``; what engine.compile=cuda-graphs does) or run eagerly on those buffers (the same code
        path without a GPU, for tests). Call before setup_training."""
        self.capture = capture

    # -- LoRA --------------------------------------------------------------------------------------------

    def _lora_layers(self, prefix: str) -> dict[str, LoraLayer]:
        """Adapted layers by their file name: text-encoder names always carry ``text_model.``, as in real SD
        checkpoints, although transformers 5's CLIPTextModel has no such submodule."""
        model = self._models()[prefix]
        extra = "text_model." if prefix == "text_encoder" and not hasattr(model, "text_model") else ""
        return {extra + name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}

    def _attach(self, prefix: str, targets, rank: int, alpha: float) -> dict[str, LoraLayer]:
        model = self._models()[prefix]
        if prefix == "text_encoder" and not hasattr(model, "text_model"):
            targets = [t.removeprefix("text_model.") for t in targets]
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), model)
        self._unet_calls = None  # recorded sampling calls do not have the new layers
        layers = self._lora_layers(prefix)
        for layer in layers.values():  # the adapter trains in fp32 even when the base model is half precision
            for part in (layer.lora_A["default"], layer.lora_B["default"]):
                part.to(self.device, dtype=torch.float32)
                if self.dtype == torch.bfloat16:
                    part.__class__ = WeightCastingLinear
            # peft would cast the layer's (large) input to fp32 and run the adapter in fp32; in bf16 the (small)
            # adapter weights are cast to the input's precision instead. fp16 keeps fp32 adapters: this engine
            # has no loss scaling, and fp16 adapter gradients would underflow.
            layer.cast_input_dtype_enabled = self.dtype != torch.bfloat16
        return layers

    @torch.no_grad()
    def _set_adapter(self, layer: LoraLayer, down: np.ndarray, up: np.ndarray) -> None:
        layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(down)))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(up)))

    def save_lora(self, path: Path, extra_metadata: Optional[dict] = None) -> None:
        out = {}
        for prefix, (rank, alpha) in self.lora_settings.items():
            layers = self._lora_layers(prefix)
            out[prefix] = Adapter(rank, alpha, {
                name: (
                    layer.lora_A["default"].weight.detach().float().cpu().numpy(),
                    layer.lora_B["default"].weight.detach().float().cpu().numpy(),
                )
                for name, layer in layers.items()
            })
        save_adapters(path, out, extra_metadata)

    def _adapted_layers(self, prefix: str) -> dict[str, LoraLayer]:
        return self._lora_layers(prefix)

    def _trainable_by_name(self) -> dict[str, torch.nn.Parameter]:
        """The adapter parameters by :meth:`trainable_names`."""
        out = {}
        for prefix in ("unet", "text_encoder"):
            if prefix in self.lora_settings:
                for name, layer in self._lora_layers(prefix).items():
                    out[f"{prefix}.{name}.lora_A.weight"] = layer.lora_A["default"].weight
                    out[f"{prefix}.{name}.lora_B.weight"] = layer.lora_B["default"].weight
        return out

    # -- training -----------------------------------------------------------------------------------------

    def setup_training(self, settings: OptimizerSettings) -> None:
        self.settings = settings
        groups = []
        for prefix, ratio in (("unet", 1.0), ("text_encoder", settings.text_encoder_lr_ratio)):
            params = [p for n, p in self._models()[prefix].named_parameters() if ".lora_" in n]
            for p in params:
                p.requires_grad_(True)
            if params:
                groups.append({"params": params, "lr": settings.lr * ratio, "lr_ratio": ratio})
        self.trainable = [p for g in groups for p in g["params"]]
        recorded = bool(self.capture)
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                           weight_decay=settings.weight_decay, fused=self.device.type == "cuda",
                                           capturable=recorded)
        if recorded:  # a recorded step reads the learning rate from the GPU; each step fills it in
            for group in self.optimizer.param_groups:
                group["lr"] = torch.tensor(group["lr"], dtype=torch.float32, device=self.device)
        self._drop_train_call()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = {"step": np.zeros((), np.int64)}
        for key, p in self._trainable_by_name().items():
            kept = self.optimizer.state.get(p) or {}
            for moment in ("exp_avg", "exp_avg_sq"):
                value = kept.get(moment)
                state[f"{key}.{moment}"] = (np.zeros(tuple(p.shape), np.float32) if value is None
                                            else value.detach().float().cpu().numpy())
            if "step" in kept:
                state["step"] = np.asarray(int(kept["step"]), np.int64)
        return state

    @torch.no_grad()
    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        steps = int(state["step"])
        self._drop_train_call()
        names = {id(p): key for key, p in self._trainable_by_name().items()}
        for group in self.optimizer.param_groups:
            on_device = group["capturable"] or group["fused"]  # where torch's AdamW keeps its step count
            for p in group["params"]:
                key = names[id(p)]
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(steps), dtype=torch.float32, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.from_numpy(np.array(state[f"{key}.exp_avg"])).to(p.device, p.dtype),
                    "exp_avg_sq": torch.from_numpy(np.array(state[f"{key}.exp_avg_sq"])).to(p.device, p.dtype),
                }

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self._tensor(self.token_array(prompts), torch.int64)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(prompts))[0]

    @torch.no_grad()
    def _states_without_gradients(self, prompts: list[str]) -> list[torch.Tensor]:
        return list(self.encode_prompts(prompts))

    def _stack(self, states: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(states)

    @torch.no_grad()
    def encode_images(self, pixels, posterior_noise) -> torch.Tensor:
        pixels, posterior_noise = (self._tensor(a) if isinstance(a, np.ndarray) else a.to(self.device, self.dtype)
                                   for a in (pixels, posterior_noise))
        dist = self.vae.encode(pixels).latent_dist
        return ((dist.mean + dist.std * posterior_noise - self.vae_shift) * self.vae_scale).float()

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Under torch.compile's CUDA graphs the UNet's output lives in the graph's memory pool, where the next
        replay overwrites it: each call starts a new graph step, and the output is copied out."""
        latents = latents.to(self.dtype)
        if not self.graphs:
            return self.unet(latents, timesteps, encoder_hidden_states=states).sample.float()
        torch.compiler.cudagraph_mark_step_begin()
        return float_copy(self.unet(latents, timesteps, encoder_hidden_states=states).sample)

    def step_inputs(self, batch: TrainBatch) -> list[torch.Tensor]:
        """A batch as the tensors of :meth:`_step_on_tensors`. The text goes in as token ids when the text
        encoder trains (its states change every step), else as its kept states."""
        if "text_encoder" in self.lora_settings:
            text = self.tokenize(batch.prompts)
        else:
            text = self.training_prompt_states(batch.prompts)
        f32 = torch.float32
        return [self._tensor(batch.pixels), self._tensor(batch.posterior_noise), text,
                self._tensor(batch.noise, f32), self._tensor(batch.signal, f32), self._tensor(batch.noise_level, f32),
                self._tensor(batch.timesteps, torch.int64), self._tensor(batch.weights, f32)]

    def loss_terms(self, batch: TrainBatch) -> torch.Tensor:
        """The per-sample losses of a batch (:func:`jdiff.train.diffusion_loss`)."""
        return self._loss_on_tensors(*self.step_inputs(batch)[:-1])

    def _loss_on_tensors(self, pixels, posterior_noise, text, noise, signal, noise_level, timesteps) -> torch.Tensor:
        states = self.text_encoder(text)[0] if text.dtype == torch.int64 else text
        return diffusion_loss(self, pixels, posterior_noise, states, noise, signal, noise_level, timesteps)

    def _step_on_tensors(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        """Forward, backward, clipping and the AdamW update: everything of a step that runs on the device."""
        *terms, weights = inputs
        per_sample = self._loss_on_tensors(*terms)
        weighted_loss(per_sample, weights).backward()
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
        self.optimizer.step()
        # A recorded step keeps its gradient buffers: each replay overwrites them.
        if not (self.capture and torch.cuda.is_current_stream_capturing()):
            self.optimizer.zero_grad(set_to_none=True)
        return (per_sample.detach(),)

    def start_train_step(self, batch: TrainBatch, lr: float):
        for group in self.optimizer.param_groups:
            value = lr * group["lr_ratio"]
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(value)
            else:
                group["lr"] = value
        if self.capture is not None and self._train_call is None:
            self._train_call = CapturedCall(self._step_on_tensors, warmup=2, capture=self.capture)
        with out_of_memory_hint("training"):
            inputs = self.step_inputs(batch)
            (per_sample,) = (self._train_call or self._step_on_tensors)(*inputs)
            return self._to_host_later(per_sample)

    def train_step(self, batch: TrainBatch, lr: float) -> np.ndarray:
        return self.start_train_step(batch, lr)()

    def _drop_train_call(self) -> None:
        """Forget the recorded step and its gradient buffers (the graph's memory), which a recorded step keeps
        in each adapter's ``.grad``; a plain step would add to them."""
        if self._train_call is not None:
            self._train_call = None
            for p in self.trainable:
                p.grad = None

    def _to_host_later(self, values: torch.Tensor):
        """Start copying ``values`` to the host; the returned function waits for the copy and gives numpy."""
        if self.device.type != "cuda":
            result = values.detach().cpu().numpy().copy()
            return lambda: result
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait() -> np.ndarray:
            done.synchronize()
            return host.numpy().copy()
        return wait

    # -- sampling -----------------------------------------------------------------------------------------

    def make_sampler(self, sampler: str) -> DiffusersSampler:
        config = dict(self.scheduler_config, prediction_type=self.prediction_type)
        if sampler == "ddim":
            return DiffusersSampler(DDIMScheduler.from_config(config), self.device)
        cls = getattr(diffusers_schedulers, config.get("_class_name", "DDIMScheduler"), None)
        if cls is None:
            raise EngineError(f"the model's scheduler {config.get('_class_name')!r} is unknown to diffusers")
        return DiffusersSampler(cls.from_config(config), self.device)

    @contextlib.contextmanager
    def sampling(self):
        self._drop_train_call()  # a recorded step's memory goes back before sampling records its own
        with torch.no_grad(), out_of_memory_hint("generating images"):
            yield

    def latents(self, array: np.ndarray) -> torch.Tensor:
        return self._tensor(array, torch.float32)

    def concat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors)

    def _hook_attention(self, module, name: str, hook) -> None:
        module.set_processor(HookedSelfAttention(name, hook, module.processor))

    def _unhook_attention(self, module) -> None:
        module.set_processor(module.processor.original)

    def sampling_prediction(self, latents: torch.Tensor, t, states: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):  # a timestep of jdiff's own samplers (style injection)
            t = torch.tensor(int(t), device=self.device)
        if self.capture is None or self.sampling_eagerly:  # hooked or routed: code a recorded graph would skip
            return self.predict(latents, t, states)
        if self._unet_calls is None:
            self._unet_calls = CapturedCalls(lambda x, step, s: (self.unet(x, step, encoder_hidden_states=s).sample,),
                                             warmup=1, capture=self.capture)
        # a copy: some samplers keep past predictions, and the next replay overwrites the recorded output
        return float_copy(self._unet_calls(latents.to(self.dtype), t.reshape(()), states)[0])

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        images = self.vae.decode((latents / self.vae_scale + self.vae_shift).to(self.dtype)).sample
        return (images * 0.5 + 0.5).permute(0, 2, 3, 1).float().cpu().numpy()
