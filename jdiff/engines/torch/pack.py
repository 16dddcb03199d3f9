"""Packed adapters for the torch engine: K runs' LoRA adapters on one model, each sample through its own.

A packed layer holds the K adapters of one linear layer as stacked tensors, A (K, r, in) and B (K, out, r),
r the largest rank of the pack (a smaller rank is zero-padded: its padding has zero gradients and stays
zero, so it trains exactly as its own rank), and each adapter's scale alpha/rank. The rows of a training
batch are the K runs' batches one after the other, so one batched matrix product per layer serves them all.
For sampling, :class:`Router` names the adapter of every row.

The optimiser is AdamW over the stacked tensors with every setting a per-run vector (learning rate, betas,
eps, weight decay, the clipping norm): torch's formula, run by run, so that K packed runs train as K
separate ones would (:mod:`jdiff.pack` checks it against the unpacked engine).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from jdiff.engines.base import EngineError, LoraSpec, OptimizerSettings, pack_plan
from jdiff.engines.torch.graphs import CapturedCall
from jdiff.lora_file import Adapter, initial_down_weights
from jdiff.train import weighted_loss


class Router:
    """Which adapter each row of the next call goes through: ``ids`` (one per row, or per prompt: a batch of
    twice the rows, classifier-free guidance's, repeats them), or None: the K runs' rows in K equal groups."""

    def __init__(self):
        self.ids: Optional[torch.Tensor] = None

    def groups(self, rows: int, k: int) -> Optional[torch.Tensor]:
        if self.ids is None:
            if rows % k:
                raise ValueError(f"a packed batch of {rows} rows cannot hold {k} runs' equal batches")
            return None
        n = len(self.ids)
        return self.ids if rows == n else self.ids.repeat(rows // n)


class PackedLinear(torch.nn.Module):
    """``y = base(x) + scale[k] * B[k] A[k] x`` for each row's adapter k; the base layer stays frozen."""

    def __init__(self, base: torch.nn.Linear, ranks: list[int], alphas: list[float], router: Router):
        super().__init__()
        self.base_layer, self.router = base, router
        self.in_features, self.out_features = base.in_features, base.out_features
        k, r = len(ranks), max(ranks)
        device = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.zeros(k, r, self.in_features, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(k, self.out_features, r, device=device))
        self.register_buffer("scale", torch.tensor([a / n for a, n in zip(alphas, ranks)], dtype=torch.float32,
                                                   device=device))
        self.ranks = list(ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        # bf16 models compute the adapter in bf16 (fp32 weights cast per call); others in fp32
        dtype = x.dtype if x.dtype == torch.bfloat16 else torch.float32
        ids = self.router.groups(x.shape[0], self.lora_A.shape[0])
        a, b, scale = (self.lora_A, self.lora_B, self.scale) if ids is None else (
            self.lora_A[ids], self.lora_B[ids], self.scale[ids])
        rows = x.reshape(a.shape[0], -1, self.in_features).to(dtype)
        low = torch.bmm(rows, a.transpose(1, 2).to(dtype))
        out = torch.bmm(low, b.transpose(1, 2).to(dtype)) * scale.to(dtype)[:, None, None]
        return base + out.reshape(base.shape).to(base.dtype)

    @torch.no_grad()
    def set_member(self, k: int, down: np.ndarray, up: np.ndarray) -> None:
        rank = down.shape[0]
        self.lora_A[k].zero_()
        self.lora_B[k].zero_()
        self.lora_A[k, :rank].copy_(torch.from_numpy(down))
        self.lora_B[k, :, :rank].copy_(torch.from_numpy(up))

    def member(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rank = self.ranks[k]
        return (self.lora_A[k, :rank].detach().float().cpu().numpy().copy(),
                self.lora_B[k, :, :rank].detach().float().cpu().numpy().copy())

    @torch.no_grad()
    def keep(self, members: list[int]) -> None:
        index = torch.tensor(members, device=self.lora_A.device)
        self.lora_A = torch.nn.Parameter(self.lora_A[index].clone())
        self.lora_B = torch.nn.Parameter(self.lora_B[index].clone())
        self.scale = self.scale[index].clone()
        self.ranks = [self.ranks[m] for m in members]


def matches(name: str, targets) -> bool:
    """peft's rule: a module named by a target, or whose name ends with ``.`` + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def attach_packed(model: torch.nn.Module, targets, ranks: list[int], alphas: list[float],
                  router: Router) -> dict[str, PackedLinear]:
    chosen = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and matches(n, targets)]
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PackedLinear(module, ranks, alphas, router))
    return packed_layers(model)


def packed_layers(model: torch.nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


class PackedAdamW:
    """AdamW on stacked (K, ...) parameters, each run with its own settings: torch's AdamW formula (decoupled
    weight decay, bias correction, eps added after the square root) and torch's gradient clipping (the norm
    over all of a run's adapter gradients; coefficient max_norm / (norm + 1e-6), at most 1), run by run.
    Every number that changes per step (learning rates, bias corrections) is a tensor filled in before the
    step, so a recorded step (CUDA graph) replays it."""

    def __init__(self, groups: list[tuple[list[torch.nn.Parameter], list[float]]],
                 settings: list[OptimizerSettings], device: torch.device):
        self.groups = groups  # (parameters, per-run learning-rate ratio)
        vector = lambda values: torch.tensor(values, dtype=torch.float32, device=device)
        self.betas1 = vector([s.betas[0] for s in settings])
        self.betas2 = vector([s.betas[1] for s in settings])
        self.eps = vector([s.eps for s in settings])
        self.decay = vector([s.weight_decay for s in settings])
        self.max_norm = vector([s.max_grad_norm for s in settings])
        self.lr = [torch.zeros(len(settings), device=device) for _ in groups]
        self.correction1 = torch.ones(len(settings), device=device)
        self.correction2 = torch.ones(len(settings), device=device)
        self.settings = settings
        self.params = [p for params, _ in groups for p in params]
        self.moments = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in self.params}
        self.steps = 0

    def prepare(self, lrs: np.ndarray) -> None:
        """The next step's learning rates (one per run) and bias corrections, into the step's tensors."""
        self.steps += 1
        for (_, ratios), lr in zip(self.groups, self.lr):
            lr.copy_(torch.from_numpy(np.asarray(lrs, np.float32) * np.asarray(ratios, np.float32)))
        b1 = np.array([s.betas[0] for s in self.settings], np.float64)
        b2 = np.array([s.betas[1] for s in self.settings], np.float64)
        self.correction1.copy_(torch.from_numpy((1 - b1 ** self.steps).astype(np.float32)))
        self.correction2.copy_(torch.from_numpy(np.sqrt(1 - b2 ** self.steps).astype(np.float32)))

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        per_run = lambda v, p: v.reshape(-1, *([1] * (p.dim() - 1)))
        squares = torch.stack([(g.float() ** 2).reshape(g.shape[0], -1).sum(1) for g in grads]).sum(0)
        norm = squares.sqrt()
        clip = torch.where(self.max_norm > 0, (self.max_norm / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
        index = 0
        for (params, _), lr in zip(self.groups, self.lr):
            for p in params:
                g = grads[index] * per_run(clip, p)
                index += 1
                m, v = self.moments[p]
                p.mul_(1 - per_run(lr * self.decay, p))
                m.lerp_(g, per_run(1 - self.betas1, p).expand_as(m))
                v.mul_(per_run(self.betas2, p)).addcmul_(g, g * per_run(1 - self.betas2, p))
                denom = v.sqrt() / per_run(self.correction2, p) + per_run(self.eps, p)
                p.sub_(per_run(lr / self.correction1, p) * m / denom)

    def keep(self, members: list[int], params: list[torch.nn.Parameter]) -> None:
        """Only runs ``members`` stay (the layers' parameters are new tensors: ``params``, in the same order)."""
        index = torch.tensor(members, device=self.betas1.device)
        old = self.params
        for name in ("betas1", "betas2", "eps", "decay", "max_norm", "correction1", "correction2"):
            setattr(self, name, getattr(self, name)[index].clone())
        self.lr = [lr[index].clone() for lr in self.lr]
        self.settings = [self.settings[m] for m in members]
        self.moments = {new: tuple(t[index].clone() for t in self.moments[p]) for p, new in zip(old, params)}
        count = 0
        groups = []
        for params_, ratios in self.groups:
            groups.append((params[count : count + len(params_)], [ratios[m] for m in members]))
            count += len(params_)
        self.groups, self.params = groups, params


def initial_members(layers: dict[str, PackedLinear], specs: list[LoraSpec], prefix: str) -> None:
    """Each run's fresh adapter (B = 0, A from its seed), as the unpacked engine makes it."""
    for k, spec in enumerate(specs):
        rank = spec.unet_rank if prefix == "unet" else spec.text_encoder_rank
        for name, layer in layers.items():
            down = initial_down_weights(name, rank, layer.in_features, spec.seed)
            layer.set_member(k, down, np.zeros((layer.out_features, rank), np.float32))


def member_adapter(layers: dict[str, PackedLinear], k: int, alpha: float) -> Adapter:
    rank = next(iter(layers.values())).ranks[k]
    return Adapter(rank, alpha, {name: layer.member(k) for name, layer in layers.items()})


class TorchPacking:
    """The pack primitives of :class:`jdiff.engines.base.Engine` for the torch engine (a mixin of TorchEngine)."""

    def add_packed_lora(self, specs: list[LoraSpec]) -> None:
        self.router, self.pack_specs, self.packed = Router(), list(specs), {}
        for prefix, targets, ranks, alphas in pack_plan(specs):
            self._refuse_second_adapter(prefix)
            model = self._models()[prefix]
            extra = ""
            if prefix == "text_encoder" and not hasattr(model, "text_model"):  # names as in _lora_layers
                targets, extra = [t.removeprefix("text_model.") for t in targets], "text_model."
            layers = attach_packed(model, targets, ranks, alphas, self.router)
            if not layers:
                raise EngineError(f"lora targets {list(targets)} match no layer of the {prefix}")
            self.packed[prefix] = {extra + name: layer for name, layer in layers.items()}
            initial_members(self.packed[prefix], specs, prefix)
            self.lora_settings[prefix] = (max(ranks), 1.0)
        self._unet_calls = None

    def _pack_parameters(self) -> list:
        return [[p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
                for layers in self.packed.values()]

    def setup_packed_training(self, settings: list[OptimizerSettings]) -> None:
        params = self._pack_parameters()
        ratios = {"unet": [1.0] * len(settings), "text_encoder": [s.text_encoder_lr_ratio for s in settings]}
        groups = [(ps, ratios[prefix]) for prefix, ps in zip(self.packed, params)]
        self.trainable = [p for ps in params for p in ps]
        for p in self.trainable:
            p.requires_grad_(True)
        self.pack_optimizer = PackedAdamW(groups, settings, self.device)
        self._drop_train_call()

    def start_packed_train_step(self, batch, lrs: np.ndarray):
        """One step of every run of the pack: ``batch`` holds the runs' batches one after the other (equal
        sizes), ``lrs`` their learning rates; the returned function gives the per-sample losses."""
        self.router.ids = None
        self.pack_optimizer.prepare(lrs)
        if self.capture is not None and self._train_call is None:
            self._train_call = CapturedCall(self._packed_step_on_tensors, warmup=2, capture=self.capture)
        from jdiff.engines.torch.engine import out_of_memory_hint

        with out_of_memory_hint("training"):
            (per_sample,) = (self._train_call or self._packed_step_on_tensors)(*self.step_inputs(batch))
            return self._to_host_later(per_sample)

    def _packed_step_on_tensors(self, *inputs):
        *terms, weights = inputs
        per_sample = self._loss_on_tensors(*terms)
        weighted_loss(per_sample, weights).backward()
        self.pack_optimizer.step()
        if not (self.capture and torch.cuda.is_current_stream_capturing()):
            for p in self.trainable:
                p.grad = None
        return (per_sample.detach(),)

    def packed_adapters(self, k: int) -> dict[str, Adapter]:
        spec = self.pack_specs[k]
        alphas = {"unet": spec.unet_alpha, "text_encoder": spec.text_encoder_alpha}
        return {prefix: member_adapter(layers, k, alphas[prefix]) for prefix, layers in self.packed.items()}

    def keep_packed(self, members: list[int]) -> None:
        """Only runs ``members`` (indices into the pack) go on; the others' adapters are dropped."""
        self._drop_train_call()
        for layers in self.packed.values():
            for layer in layers.values():
                layer.keep(members)
        self.pack_specs = [self.pack_specs[m] for m in members]
        params = [p for ps in self._pack_parameters() for p in ps]
        if getattr(self, "pack_optimizer", None) is not None:
            self.pack_optimizer.keep(members, params)
            self.trainable = params

    def route_ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(ids, device=self.device)

