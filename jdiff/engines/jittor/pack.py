"""Packed adapters for the Jittor engine: K runs' LoRA adapters on one model, each sample through its own (the
torch engine's jdiff/engines/torch/pack.py, in Jittor; the layout and formulas are the same).

The training step is one function of its inputs, (adapters, moments, per-run numbers, batch) -> (report,
adapters, moments), run eagerly or, with ``engine.compile=replay``, from a recorded plan. Each run has its own
AdamW settings and, in float16, its own loss scale: run k's loss is multiplied by its scale, so only its own
gradients are, and a run whose gradients overflow skips its step alone.
"""

from __future__ import annotations

from typing import Optional

import jittor as jt
import numpy as np
from jittor import nn

from jdiff.engines.base import EngineError, LoraSpec, OptimizerSettings, pack_plan
from jdiff.engines.jittor.fast.replay import Replay, device_arrays
from jdiff.engines.jittor.lora import matches
from jdiff.lora_file import Adapter, initial_down_weights
from jdiff.train import diffusion_loss, weighted_loss


class Router:
    """Which adapter each row of the next call goes through (see the torch engine's Router)."""

    def __init__(self):
        self.ids: Optional[jt.Var] = None

    def groups(self, rows: int, k: int) -> Optional[jt.Var]:
        if self.ids is None:
            return None
        n = self.ids.shape[0]
        return self.ids if rows == n else jt.concat([self.ids] * (rows // n))


class PackedLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, ranks: list[int], alphas: list[float], router: Router):
        self.base_layer, self.router = base_layer, router
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        k, r = len(ranks), max(ranks)
        self.lora_A = jt.zeros((k, r, self.in_features), "float32")
        self.lora_B = jt.zeros((k, self.out_features, r), "float32")
        self.scale = jt.array(np.array([a / n for a, n in zip(alphas, ranks)], np.float32)).stop_grad()
        self.ranks = list(ranks)

    def execute(self, x):
        base = self.base_layer(x)
        ids = self.router.groups(x.shape[0], self.lora_A.shape[0])
        a, b, scale = (self.lora_A, self.lora_B, self.scale) if ids is None else (
            self.lora_A[ids], self.lora_B[ids], self.scale[ids])
        rows = x.float32().reshape(a.shape[0], -1, self.in_features)
        low = nn.bmm(rows, a.transpose(0, 2, 1))
        out = nn.bmm(low, b.transpose(0, 2, 1)) * scale.reshape(-1, 1, 1)
        return base + out.reshape(base.shape).cast(base.dtype)

    def set_member(self, k: int, down: np.ndarray, up: np.ndarray) -> None:
        a, b = self.lora_A.numpy().copy(), self.lora_B.numpy().copy()
        a[k], b[k] = 0, 0
        a[k, : down.shape[0]], b[k, :, : down.shape[0]] = down, up
        self.lora_A, self.lora_B = jt.array(a), jt.array(b)

    def member(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rank = self.ranks[k]
        return self.lora_A.numpy()[k, :rank].copy(), self.lora_B.numpy()[k, :, :rank].copy()


def attach_packed(model: nn.Module, targets, ranks: list[int], alphas: list[float],
                  router: Router) -> dict[str, PackedLoraLinear]:
    chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and matches(n, targets)]
    parents = dict(model.named_modules())
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(parents[parent], child, PackedLoraLinear(module, ranks, alphas, router))
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLoraLinear)}


class JittorPacking:
    """The pack primitives of :class:`jdiff.engines.base.Engine` for the Jittor engine (a mixin of JittorEngine)."""

    def add_packed_lora(self, specs: list[LoraSpec]) -> None:
        self.router, self.pack_specs, self.packed = Router(), list(specs), {}
        self._unet_call.clear()
        self._step_call.clear()
        for prefix, targets, ranks, alphas in pack_plan(specs):
            self._refuse_second_adapter(prefix)
            layers = attach_packed(self._models()[prefix], targets, ranks, alphas, self.router)
            if not layers:
                raise EngineError(f"lora targets {list(targets)} match no layer of the {prefix}")
            self.packed[prefix] = layers
            for k, spec in enumerate(specs):
                for name, layer in layers.items():
                    down = initial_down_weights(name, ranks[k], layer.in_features, spec.seed)
                    layer.set_member(k, down, np.zeros((layer.out_features, ranks[k]), np.float32))
            self.lora_settings[prefix] = (max(ranks), 1.0)

    def _packed_layers(self) -> list[PackedLoraLinear]:
        return [layer for layers in self.packed.values() for layer in layers.values()]

    def setup_packed_training(self, settings: list[OptimizerSettings]) -> None:
        from jdiff.engines.jittor.engine import DynamicLossScale

        self.pack_settings = list(settings)
        self.pack_params = [p for layer in self._packed_layers() for p in (layer.lora_A, layer.lora_B)]
        self.pack_moments = [jt.zeros(p.shape, "float32").stop_grad() for p in self.pack_params * 2]
        # per parameter: 0 for the UNet's adapters, 1 for the text encoder's
        self.pack_group = [int(prefix == "text_encoder") for prefix, layers in self.packed.items()
                           for _ in range(2 * len(layers))]
        self.pack_steps = np.zeros(len(settings), np.int64)  # steps taken, per run
        self.pack_scales = [DynamicLossScale() for _ in settings] if self.dtype == "float16" else None
        self._pack_call = Replay(self._packed_step_graph, "packed training step")

    def _pack_numbers(self, lrs: np.ndarray) -> np.ndarray:
        """The per-run numbers of the next step (rows): root of bias correction 2, step size and decay of the
        UNet's and the text encoder's adapters, b1, b2, eps, the clipping norm, whether to clip, the loss scale."""
        s = self.pack_settings
        n = self.pack_steps + 1
        b1, b2 = np.array([x.betas[0] for x in s]), np.array([x.betas[1] for x in s])
        ratio = np.array([x.text_encoder_lr_ratio for x in s])
        decay = np.array([x.weight_decay for x in s])
        clip = np.array([x.max_grad_norm for x in s])
        scale = np.array([x.scale for x in self.pack_scales]) if self.pack_scales else np.ones(len(s))
        rows = [1 - b2 ** n, lrs / (1 - b1 ** n), 1 - lrs * decay, lrs * ratio / (1 - b1 ** n), 1 - lrs * ratio * decay,
                b1, b2, np.array([x.eps for x in s]), clip, (clip > 0).astype(float), scale]
        return np.stack(rows).astype(np.float32)

    def start_packed_train_step(self, batch, lrs: np.ndarray):
        self.router.ids = None
        if "text_encoder" in self.lora_settings:
            text = self.token_ids(batch.prompts)
        else:
            text = self.training_prompt_states(batch.prompts)
        numbers = self._pack_numbers(np.asarray(lrs, np.float64))
        rows = len(batch.weights) // len(self.pack_settings)
        weights = batch.weights * np.repeat(numbers[10], rows)  # run k's loss times its loss scale
        arrays = (numbers, batch.pixels, batch.posterior_noise, batch.noise, batch.signal, batch.noise_level,
                  batch.timesteps, weights)
        inputs = [*self.pack_params, *self.pack_moments, *device_arrays(arrays), text]
        from jdiff.engines.jittor.engine import out_of_memory_hint

        with out_of_memory_hint("training", self._memory_tries):
            outputs = self._pack_call(inputs) if self.replay else self._packed_step_graph(inputs)
            jt.sync(outputs)  # the step runs whole now: new adapters and moments, not a graph the next step extends
            report = outputs[0].numpy()
        k = len(self.pack_params)
        runs = len(self.pack_settings)
        losses, sums = report[:-runs], report[-runs:]
        take = np.isfinite(sums) if self.pack_scales is None else np.array(
            [scale.update(bool(np.isfinite(total))) for scale, total in zip(self.pack_scales, sums)])
        new = list(outputs[1:])
        if not take.all():  # a run whose fp16 gradients overflowed keeps its adapter and moments this step
            mask = jt.array(take.astype(np.float32))
            old = [*self.pack_params, *self.pack_moments]
            new = [jt.ternary(mask.reshape(-1, *([1] * (o.ndim - 1))) > 0, n_, o) for n_, o in zip(new, old)]
        self.pack_params, self.pack_moments = new[:k], new[k:]
        for layer, (a, b) in zip(self._packed_layers(), zip(new[:k:2], new[1:k:2])):
            layer.lora_A, layer.lora_B = a, b
        self.pack_steps += take
        return lambda: losses

    def _packed_step_graph(self, inputs: list) -> list:
        k = len(self.pack_params)
        params, exp_avg, exp_avg_sq = inputs[:k], inputs[k:2 * k], inputs[2 * k:3 * k]
        numbers, pixels, posterior_noise, noise, signal, noise_level, timesteps, weights, text = inputs[3 * k:]
        runs = numbers.shape[1]
        layers = self._packed_layers()
        kept = [(layer.lora_A, layer.lora_B) for layer in layers]
        for layer, a, b in zip(layers, params[::2], params[1::2]):
            layer.lora_A, layer.lora_B = a, b
        try:
            states = self.text_encoder(text) if "text_encoder" in self.lora_settings else text
            per_sample = diffusion_loss(self, pixels, posterior_noise, states, noise, signal, noise_level, timesteps)
            grads = jt.grad(weighted_loss(per_sample, weights), params)
        finally:
            for layer, (a, b) in zip(layers, kept):
                layer.lora_A, layer.lora_B = a, b
        per_run = lambda v, p: v.reshape(-1, *([1] * (p.ndim - 1)))
        grads = [g / per_run(numbers[10], g) for g in grads]
        squares = sum((g * g).reshape(runs, -1).sum(1) for g in grads)
        norm = jt.sqrt(squares)
        clip = numbers[9] * jt.minimum(numbers[8] / (norm + 1e-6), 1.0) + (1 - numbers[9])
        b1, b2, eps, root_correction2 = numbers[5], numbers[6], numbers[7], jt.sqrt(numbers[0])
        new_params, new_avg, new_avg_sq = [], [], []
        for p, g, m, v, group in zip(params, grads, exp_avg, exp_avg_sq, self.pack_group):
            step_size, decay = numbers[1 + 2 * group], numbers[2 + 2 * group]
            g = g * per_run(clip, g)
            m = per_run(b1, m) * m + per_run(1 - b1, m) * g
            v = per_run(b2, v) * v + per_run(1 - b2, v) * g * g
            moved = p * per_run(decay, p) - per_run(step_size, p) * m / (jt.sqrt(v) / per_run(root_correction2, v)
                                                                         + per_run(eps, v))
            new_params.append(moved)
            new_avg.append(m)
            new_avg_sq.append(v)
        sums = jt.stack([g.reshape(runs, -1).sum(1) for g in grads]).sum(0)
        report = jt.concat([per_sample, sums])
        return [report, *new_params, *new_avg, *new_avg_sq]

    def packed_adapters(self, k: int) -> dict[str, Adapter]:
        spec = self.pack_specs[k]
        alphas = {"unet": spec.unet_alpha, "text_encoder": spec.text_encoder_alpha}
        out = {}
        for prefix, layers in self.packed.items():
            rank = next(iter(layers.values())).ranks[k]
            out[prefix] = Adapter(rank, alphas[prefix], {name: layer.member(k) for name, layer in layers.items()})
        return out

    def keep_packed(self, members: list[int]) -> None:
        index = jt.array(np.asarray(members, np.int32))
        take = lambda v: v[index] if v.ndim else v
        self._pack_call.clear()
        for layer in self._packed_layers():
            layer.lora_A, layer.lora_B = take(layer.lora_A), take(layer.lora_B)
            layer.scale = layer.scale[index]
            layer.ranks = [layer.ranks[m] for m in members]
        self.pack_specs = [self.pack_specs[m] for m in members]
        if getattr(self, "pack_settings", None) is not None:
            self.pack_settings = [self.pack_settings[m] for m in members]
            self.pack_params = [p for layer in self._packed_layers() for p in (layer.lora_A, layer.lora_B)]
            self.pack_moments = [take(m) for m in self.pack_moments]
            self.pack_steps = self.pack_steps[members]
            if self.pack_scales:
                self.pack_scales = [self.pack_scales[m] for m in members]

    def route_ids(self, ids: np.ndarray) -> jt.Var:
        return jt.array(ids.astype(np.int32))
