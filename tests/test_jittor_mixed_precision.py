"""The Jittor engine in float16 (engine.mixed_precision=fp16) against itself in float32 on the tiny model (CPU):
half-precision base weights and activations, float32 LoRA weights, dynamic loss scaling."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import QUICK, compose_config
from jdiff.engines.base import EngineError, GenerateRequest, create_engine
from jdiff.engines.jittor.env import import_jittor
from jdiff.engines.options import JittorOptions, TorchOptions
from jdiff.noise import SAMPLE, gaussian, stream
from jdiff.validate import ConfigError, validate_config
from test_jittor_engine import PROMPTS, SETTINGS, read_lora, training_batch, write_live_lora

jt = import_jittor("cpu")

from jdiff.engines.jittor.engine import JittorEngine  # noqa: E402
from jdiff.engines.jittor.lora import lora_parameters  # noqa: E402
from jdiff.engines.torch.engine import TorchEngine  # noqa: E402


def trained(model_dir, lora, mixed_precision: str):
    """An engine with ``lora`` loaded, after three training steps on the same batch; their losses; and how far
    the steps moved the adapters."""
    engine = JittorEngine(model_dir, JittorOptions(device="cpu", mixed_precision=mixed_precision))
    engine.load_lora(lora)
    engine.setup_training(SETTINGS)
    batch = training_batch(model_dir)
    start = np.concatenate([p.numpy().ravel() for p in adapters(engine)])
    losses = [engine.train_step(batch, lr) for lr in (1e-3, 1e-3, 5e-4)]
    return engine, losses, np.concatenate([p.numpy().ravel() for p in adapters(engine)]) - start


def adapters(engine: JittorEngine) -> list:
    return lora_parameters(engine.unet) + lora_parameters(engine.text_encoder)


@pytest.fixture(scope="module")
def live_lora(tiny_model_dir, tmp_path_factory):
    return write_live_lora(tiny_model_dir, tmp_path_factory.mktemp("live_lora") / "live.safetensors")


@pytest.fixture(scope="module")
def pair(tiny_model_dir, live_lora):
    return {precision: trained(tiny_model_dir, live_lora, precision) for precision in ("no", "fp16")}


def test_fp16_training_follows_fp32(pair):
    (_, full_losses, full_update), (half, half_losses, half_update) = pair["no"], pair["fp16"]
    np.testing.assert_allclose(half_losses, full_losses, rtol=2e-2)
    assert half.loss_scale.scale == 2.0 ** 15  # no step overflowed, so none was skipped
    weights = adapters(half)
    assert weights and all(str(p.dtype) == "float32" for p in weights)
    assert all(np.isfinite(p.numpy()).all() for p in weights)
    # The steps moved the adapters alike. Adam scales each weight's step by its gradient's size, so a weight
    # whose gradient is near zero may step differently; the update as a whole must agree.
    assert np.linalg.norm(half_update - full_update) <= 0.1 * np.linalg.norm(full_update), \
        np.linalg.norm(half_update - full_update) / np.linalg.norm(full_update)


def test_fp16_runs_the_networks_in_half(pair, tiny_model_dir):
    half = pair["fp16"][0]
    assert str(half.unet.conv_in.weight.dtype) == "float16"
    assert str(half.vae.decoder.conv_in.weight.dtype) == "float16"
    assert str(half.text_encoder.text_model.final_layer_norm.weight.dtype) == "float16"
    batch = training_batch(tiny_model_dir)
    with jt.no_grad():
        states = half.encode_prompts(PROMPTS)
        pred = half.unet(jt.array(batch.noise).cast(half.dtype), jt.array(batch.timesteps), states)
    assert str(states.dtype) == "float16" and str(pred.dtype) == "float16"


def test_fp16_images_match_fp32(pair):
    shape = pair["no"][0].latent_shape(64)
    noise = np.stack([gaussian(stream(9, SAMPLE, k), shape) for k in range(2)])
    request = GenerateRequest(prompts=PROMPTS, noise=noise, steps=5, guidance_scale=7.5, negative_prompt="blurry")
    full, half = (pair[p][0].generate(request) for p in ("no", "fp16"))
    for got, want in zip(half, full):
        assert got.shape == want.shape == (64, 64, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 4


def test_an_fp16_lora_file_loads_in_the_torch_engine(pair, tiny_model_dir, tmp_path):
    path = tmp_path / "fp16.safetensors"
    pair["fp16"][0].save_lora(path)
    saved = read_lora(path)
    assert all(value.dtype == np.float32 for value in saved.values())
    torch_engine = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
    torch_engine.load_lora(path)
    loaded = {f"{prefix}.{name}": layer for prefix in ("unet", "text_encoder")
              for name, layer in torch_engine._lora_layers(prefix).items()}
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    np.testing.assert_array_equal(loaded[key].lora_A["default"].weight.detach().numpy(),
                                  saved[f"{key}.lora_A.weight"])


def test_an_overflow_skips_the_step_and_halves_the_scale(tiny_model_dir, live_lora):
    engine = JittorEngine(tiny_model_dir, JittorOptions(device="cpu", mixed_precision="fp16"))
    engine.load_lora(live_lora)
    engine.setup_training(SETTINGS)
    batch = training_batch(tiny_model_dir)
    engine.loss_scale.scale = 2.0 ** 40  # far past float16's range (65504): the gradients come out inf
    before = [p.numpy().copy() for p in adapters(engine)]
    losses = engine.train_step(batch, 1e-3)
    assert np.isfinite(losses).all()
    assert engine.loss_scale.scale == 2.0 ** 39
    for p, was in zip(adapters(engine), before):
        np.testing.assert_array_equal(p.numpy(), was)
    assert engine.optimizer.n_step == 0  # a skipped step does not count for AdamW's bias correction

    engine.loss_scale.scale = 2.0 ** 10
    engine.train_step(batch, 1e-3)
    assert engine.loss_scale.scale == 2.0 ** 10 and engine.loss_scale.good_steps == 1
    assert engine.optimizer.n_step == 1
    after = [p.numpy() for p in adapters(engine)]
    assert all(np.isfinite(p).all() for p in after)
    assert all(np.abs(p - was).max() > 0 for p, was in zip(after, before))


def test_the_loss_scale_doubles_after_enough_good_steps(tiny_model_dir, live_lora):
    engine = JittorEngine(tiny_model_dir, JittorOptions(device="cpu", mixed_precision="fp16"))
    engine.load_lora(live_lora)
    engine.setup_training(SETTINGS)
    engine.loss_scale.growth_interval = 2
    batch = training_batch(tiny_model_dir)
    start = engine.loss_scale.scale
    engine.train_step(batch, 1e-3)
    assert engine.loss_scale.scale == start
    engine.train_step(batch, 1e-3)
    assert engine.loss_scale.scale == 2 * start and engine.loss_scale.good_steps == 0


def test_config_allows_fp16_for_jittor_and_refuses_bf16(jdiff_root, tiny_model_dir):
    validate_config(compose_config(QUICK + ["engine=jittor", "engine.mixed_precision=fp16"], jdiff_root))
    with pytest.raises(ConfigError, match="engine.mixed_precision='bf16'.*fp16.*engine=torch"):
        validate_config(compose_config(QUICK + ["engine=jittor", "engine.mixed_precision=bf16"], jdiff_root))
    with pytest.raises(EngineError, match="mixed_precision='bf16'.*fp16"):
        create_engine("jittor", tiny_model_dir, device="cpu", mixed_precision="bf16")
    assert create_engine("jittor", tiny_model_dir, device="cpu", mixed_precision="fp16").dtype == "float16"
