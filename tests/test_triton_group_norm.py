"""The torch engine's Triton GroupNorm (engine.group_norm=triton) and channels-last models.

The kernels run here in Triton's CPU interpreter (TRITON_INTERPRET=1, which conftest.py sets before anything
imports triton): the same kernel code the GPU compiles, checked against PyTorch's GroupNorm. Their GPU check
and speed: ``python -m jdiff.bench --sections check,train --variants torch,torch-bf16-cudagraphs-triton-cl``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException

from conftest import compose_config
from jdiff.engines.base import EngineError, GenerateRequest, LoraSpec
from jdiff.engines.options import TorchOptions
from jdiff.engines.torch import group_norm as gn
from jdiff.engines.torch.engine import TorchEngine
from jdiff.validate import ConfigError, validate_config
from test_torch_speed_paths import SETTINGS, batches


def both(x, groups, weight, bias, dy):
    """(output, dx, dweight, dbias) of the Triton GroupNorm, and of PyTorch's in float64 on NCHW (PyTorch's CPU
    GroupNorm on channels-last float32 loses the variance of inputs with a large mean)."""
    out = []
    for fn, dtype in ((gn.group_norm, x.dtype), (F.group_norm, torch.float64)):
        xi, wi, bi = (t.detach().to(dtype).clone().requires_grad_() for t in (x, weight, bias))
        y = fn(xi if fn is gn.group_norm else xi.contiguous(), groups, wi, bi, 1e-5)
        out.append((y, *torch.autograd.grad(y, (xi, wi, bi), dy.to(dtype))))
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


LAYOUTS = {
    "nchw": lambda t: t,
    "channels-last": lambda t: t.to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", [((2, 40, 6, 10), 4), ((1, 64, 5, 7), 32), ((2, 6, 9, 9), 1)],
                         ids=["10-channels-a-group", "2-channels-a-group", "one-group"])
def test_forward_and_backward_match_pytorch(layout, shape, groups):
    g = torch.Generator().manual_seed(0)
    x = LAYOUTS[layout](torch.randn(shape, generator=g) * 3 + 5)
    weight, bias = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    dy = LAYOUTS[layout](torch.randn(shape, generator=g))
    (y, dx, dw, db), (ry, rdx, rdw, rdb) = both(x, groups, weight, bias, dy)
    for ours, ref in ((y, ry), (dx, rdx), (dw, rdw), (db, rdb)):
        assert rel_error(ours, ref) < 1e-5
    # the output and dx keep the input's memory format: no conversion back to NCHW around the norm
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_split_over_many_programs_and_a_ragged_last_tile(monkeypatch, layout):
    """Small tiles force each (sample, group) into many spans, the last one partly outside the map, and the
    channels-last per-group sums into several chunks of spans; a large mean checks that the shifted sums keep
    the variance."""
    monkeypatch.setattr(gn, "TILE", 64)
    monkeypatch.setattr(gn, "SPAN_CHUNK", 4)
    x = LAYOUTS[layout](torch.randn(1, 4, 19, 21, generator=torch.Generator().manual_seed(1)) * 0.5 + 300.0)
    plan = gn.Plan(x, 2)
    assert plan.by_group == (layout == "nchw")
    assert plan.splits > 10 and plan.positions % plan.block_p != 0
    assert plan.by_group or plan.splits > plan.block_s
    weight, bias, dy = torch.ones(4), torch.zeros(4), torch.randn(x.shape)
    (y, dx, *_), (ry, rdx, *_) = both(x, 2, weight, bias, dy)
    assert rel_error(y, ry) < 1e-4 and rel_error(dx, rdx) < 1e-4


def test_mixed_layouts_and_3d_input():
    """dy may come in another memory format than x (the kernels read each through its own strides); (N, C, L)
    inputs work too."""
    x = torch.randn(2, 12, 4, 4).to(memory_format=torch.channels_last)
    weight, bias, dy = torch.randn(12), torch.randn(12), torch.randn(2, 12, 4, 4)
    (_, dx, dw, _), (_, rdx, rdw, _) = both(x, 3, weight, bias, dy)
    assert rel_error(dx, rdx) < 1e-5 and rel_error(dw, rdw) < 1e-5
    x3 = torch.randn(3, 12, 50)
    assert rel_error(gn.group_norm(x3, 3, eps=1e-6), F.group_norm(x3, 3, eps=1e-6)) < 1e-5
    x1 = torch.randn(2, 12, 1)  # one position: channels are the only stride-1 axis
    (y, dx, *_), (ry, rdx, *_) = both(x1, 3, torch.ones(12), torch.zeros(12), torch.randn(2, 12, 1))
    assert rel_error(y, ry) < 1e-5 and rel_error(dx, rdx) < 1e-5


def test_bfloat16_in_and_out_with_float32_arithmetic():
    x = torch.randn(2, 64, 8, 8).to(torch.bfloat16)
    weight, bias = torch.randn(64).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16)
    y = gn.group_norm(x, 32, weight, bias)
    ref = F.group_norm(x.float(), 32, weight.float(), bias.float())
    assert y.dtype == torch.bfloat16
    assert rel_error(y, ref) < 8e-3  # bf16's rounding of the output, no more


def test_channels_that_do_not_split_into_the_groups_are_refused():
    with pytest.raises(ValueError, match="10 channels do not split into 4 groups"):
        gn.group_norm(torch.randn(1, 10, 4, 4), 4)


def sampled(engine: TorchEngine) -> np.ndarray:
    rng = np.random.default_rng(5)
    request = GenerateRequest(prompts=["a cat"], negative_prompt="", steps=1, guidance_scale=2.0,
                              noise=rng.standard_normal((1, 4, 8, 8)).astype(np.float32), sampler="ddim")
    return np.stack(engine.generate(request)).astype(np.float32)


def trained(model_dir, **layout) -> tuple[TorchEngine, np.ndarray]:
    engine = TorchEngine(model_dir, TorchOptions(device="cpu", **layout))
    engine.add_lora(LoraSpec(unet_rank=4, unet_alpha=4.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                             text_encoder_rank=0, text_encoder_alpha=None, text_encoder_targets=(), seed=1))
    engine.setup_training(SETTINGS)
    return engine, np.stack([engine.train_step(batch, 1e-3) for batch in batches(model_dir, 2)])


def test_engine_with_triton_group_norm_and_channels_last_trains_and_samples_like_the_plain_engine(tiny_model_dir,
                                                                                                    monkeypatch):
    monkeypatch.setattr(gn, "TARGET_PROGRAMS", 1)  # a program per (sample, group): the interpreter runs each one
    plain, plain_losses = trained(tiny_model_dir)
    fast, fast_losses = trained(tiny_model_dir, group_norm="triton", channels_last=True)
    norms = [m for m in (*fast.unet.modules(), *fast.vae.modules()) if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is gn.TritonGroupNorm for m in norms)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert set(fast.unet.state_dict()) == set(plain.unet.state_dict())  # same parameter names: same LoRA files
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-4)
    assert np.abs(sampled(fast) - sampled(plain)).max() <= 1.0  # at most one level of 255 from rounding


def test_triton_group_norm_without_a_gpu_or_triton_is_refused_with_the_fix(tiny_model_dir, tmp_path, monkeypatch):
    cfg = compose_config(["style=00", "engine=torch", "engine.device=cpu", "engine.group_norm=triton"], tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="engine.group_norm=native with engine.device=cpu"):
        validate_config(cfg)
    with pytest.raises(EngineError, match="runs on CUDA GPUs"):
        TorchEngine(tiny_model_dir, TorchOptions(device="cpu", group_norm="triton"))
    with pytest.raises(ConfigCompositionException):  # a torch option: the Jittor engine's options lack it
        compose_config(["style=00", "engine=jittor", "engine.channels_last=true"], tmp_path)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(EngineError, match="needs Triton"):
        TorchEngine(tiny_model_dir, TorchOptions(device="cpu", group_norm="triton"))
