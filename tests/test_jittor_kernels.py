"""The transpose and GroupNorm kernels (jdiff/engines/jittor/fast/kernels.py) through their CPU builds: the same
arithmetic as the CUDA kernels, checked against float64 numpy and Jittor's unfused ops, forward and gradients,
and the UNet giving the same output either way."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jdiff.engines.jittor.env import import_jittor

jt = import_jittor("cpu")

from jittor import nn  # noqa: E402

from jdiff.engines.jittor import blocks  # noqa: E402
from jdiff.engines.jittor.fast import kernels  # noqa: E402


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "fused")


@pytest.mark.parametrize("shape", [(2, 33, 70), (1, 64, 32), (3, 1, 5)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_swap_last_two_and_its_gradient(fused, shape, dtype):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape).astype(dtype)
    upstream = rng.standard_normal((shape[0], shape[2], shape[1])).astype(dtype)
    x = jt.array(x_np)
    y = kernels.swap_last_two(x)
    assert y.dtype == x.dtype and y.shape == (shape[0], shape[2], shape[1])
    np.testing.assert_array_equal(y.numpy(), x_np.transpose(0, 2, 1))
    (grad,) = jt.grad((y.float32() * jt.array(upstream).float32()).sum(), [x])
    np.testing.assert_array_equal(grad.numpy(), upstream.transpose(0, 2, 1).astype(dtype))


def test_channels_last_and_back(fused):
    x_np = np.arange(2 * 5 * 3 * 4, dtype=np.float32).reshape(2, 5, 3, 4)
    tokens = blocks.channels_last(jt.array(x_np))
    np.testing.assert_array_equal(tokens.numpy(), x_np.transpose(0, 2, 3, 1).reshape(2, 12, 5))
    np.testing.assert_array_equal(blocks.channels_first(tokens, 3, 4).numpy(), x_np)


def group_norm_reference(x, groups, weight, bias, eps, upstream):
    """GroupNorm and its gradients (x, weight, bias) in float64 for the loss sum(y * upstream)."""
    b, c = x.shape[:2]
    xg = x.reshape(b, groups, -1)
    mean = xg.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((xg - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    y = xhat * weight.reshape(per_channel) + bias.reshape(per_channel)
    g = (upstream * weight.reshape(per_channel)).reshape(b, groups, -1)
    xh = xhat.reshape(b, groups, -1)
    dx = rstd * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    axes = (0,) + tuple(range(2, x.ndim))
    return y, dx.reshape(x.shape), (upstream * xhat).sum(axes), upstream.sum(axes)


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 6), 4), ((1, 6, 7), 3), ((3, 32, 4, 4), 32)])
def test_group_norm_forward_and_gradients(fused, shape, groups):
    rng = np.random.default_rng(1)
    # an offset mean much larger than the spread: a one-pass E[x^2] - E[x]^2 would lose the variance
    x_np = 50 + rng.standard_normal(shape)
    weight_np, bias_np = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    upstream = rng.standard_normal(shape)
    expected = group_norm_reference(x_np, groups, weight_np, bias_np, 1e-6, upstream)
    x, weight, bias = (jt.array(a.astype(np.float32)) for a in (x_np, weight_np, bias_np))
    y = kernels.group_norm(x, groups, weight, bias, 1e-6)
    grads = jt.grad((y * jt.array(upstream.astype(np.float32))).sum(), [x, weight, bias])
    for got, want in zip([y] + list(grads), expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=2e-4)


def test_group_norm_module_fused_equals_unfused_in_float16(monkeypatch):
    rng = np.random.default_rng(2)
    norm = blocks.GroupNorm(4, 8, eps=1e-5)
    norm.weight.assign(jt.array(rng.standard_normal(8).astype(np.float32)))
    norm.bias.assign(jt.array(rng.standard_normal(8).astype(np.float32)))
    norm.float16()
    x = jt.array(rng.standard_normal((2, 8, 6, 6)).astype(np.float16))
    monkeypatch.setattr(kernels, "MODE", "unfused")
    unfused = norm(x).numpy()
    monkeypatch.setattr(kernels, "MODE", "fused")
    fused_out = norm(x)
    assert fused_out.dtype == "float16"
    np.testing.assert_allclose(fused_out.numpy().astype(np.float32), unfused.astype(np.float32), atol=4e-3)


@pytest.mark.parametrize("kernel,bias", [(3, True), (1, False), (5, True)])
def test_size_keeping_conv_gradients_equal_jittors_conv(fused, kernel, bias):
    """blocks.Conv2d's input gradient, a forward convolution with the flipped, transposed weights, against
    Jittor's own convolution gradient; the weight and bias gradients too (lazy, unused in LoRA training)."""
    rng = np.random.default_rng(4)
    conv = blocks.Conv2d(5, 7, kernel, padding=kernel // 2, bias=bias)
    x = jt.array(rng.standard_normal((2, 5, 6, 9)).astype(np.float32))
    upstream = jt.array(rng.standard_normal((2, 7, 6, 9)).astype(np.float32))
    wanted = [nn.conv2d(x, conv.weight, conv.bias, padding=kernel // 2)]
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    wanted += jt.grad((wanted[0] * upstream).sum(), params)
    y = conv(x)
    got = [y] + jt.grad((y * upstream).sum(), params)
    assert len(got) == len(wanted)
    for g, w in zip(got, wanted):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-5)


def test_conv_that_changes_the_size_takes_jittors_path(fused, monkeypatch):
    """Stride 2 (the downsamplers) is not a size-keeping convolution: Jittor's own gradient, not the flip."""
    calls = []
    monkeypatch.setattr(blocks.SizeKeepingConv, "grad", lambda self, dy: calls.append(dy))
    conv = blocks.Conv2d(3, 4, 3, stride=2, padding=1)
    x = jt.array(np.ones((1, 3, 8, 8), np.float32))
    (grad,) = jt.grad(conv(x).sum(), [x])
    grad.sync()
    assert not calls and grad.shape == x.shape


def test_group_norm_past_the_kernels_row_limit_takes_jittors_ops(fused, monkeypatch):
    """The CUDA forward puts (sample, group) rows in its grid's y dimension (at most 65,535): beyond that the
    module falls back to Jittor's ops, with the same result."""
    rng = np.random.default_rng(6)
    norm = blocks.GroupNorm(4, 8, eps=1e-5)
    x = jt.array(rng.standard_normal((2, 8, 3, 3)).astype(np.float32))
    within = norm(x).numpy()
    calls = []
    monkeypatch.setattr(kernels, "GN_MAX_ROWS", 7)  # 2 samples x 4 groups = 8 rows: past it
    monkeypatch.setattr(kernels, "group_norm", lambda *args: calls.append(args))
    np.testing.assert_allclose(norm(x).numpy(), within, rtol=1e-5, atol=1e-5)
    assert not calls


def test_unet_output_and_lora_gradients_same_with_and_without_kernels(monkeypatch, tiny_model_dir):
    from jdiff.engines.jittor.lora import attach_lora, lora_parameters
    from jdiff.engines.jittor.unet import UNet2DConditionModel

    config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    attach_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 4)
    rng = np.random.default_rng(3)
    for p in lora_parameters(unet):
        p.assign(jt.array(0.1 * rng.standard_normal(p.shape).astype(np.float32)))
    params = lora_parameters(unet)
    latents = jt.array(rng.standard_normal((2, config["in_channels"], 8, 8)).astype(np.float32))
    states = jt.array(rng.standard_normal((2, 77, config["cross_attention_dim"])).astype(np.float32))
    results = {}
    for mode in ("unfused", "fused"):
        monkeypatch.setattr(kernels, "MODE", mode)
        out = unet(latents, jt.array(np.array([10, 500])), states)
        grads = jt.grad((out * out).mean(), params)
        results[mode] = [out.numpy()] + [g.numpy() for g in grads]
    for fused_value, unfused_value in zip(results["fused"], results["unfused"]):
        np.testing.assert_allclose(fused_value, unfused_value, rtol=1e-4, atol=1e-5)


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "fast")
    with pytest.raises(ValueError, match="kernels.MODE='fast'"):
        kernels.swap_last_two(jt.zeros((1, 2, 3)))
