"""The Jittor UNet against diffusers' UNet2DConditionModel: same weights, same inputs, same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jdiff.engines.base import EngineError
from jdiff.engines.jittor.env import import_jittor

jt = import_jittor("cpu")

from jdiff.engines.jittor.unet import UNet2DConditionModel  # noqa: E402

# SD 2.1's UNet config (every block type, per-level head counts, linear projections, upcast attention) at a
# reduced width: 4 levels, 2 layers per block, as the real one has.
SD21_REDUCED = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=(2, 4, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
)
# SD 1.5's differences: 1x1-convolution projections, one head count for every level, no upcast.
SD15_REDUCED = dict(SD21_REDUCED, attention_head_dim=2, use_linear_projection=False, upcast_attention=False)


def torch_unet(folder: Path):
    from diffusers import UNet2DConditionModel as Reference

    return Reference.from_pretrained(folder, use_safetensors=True).eval()


def save_random_unet(config: dict, folder: Path) -> Path:
    import torch
    from diffusers import UNet2DConditionModel as Reference

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Reference(**config).save_pretrained(folder, safe_serialization=True)
    return folder


def assert_same_outputs(folder: Path, batch: int, size: int, tokens: int = 77, timesteps=(3, 981)):
    import torch

    rng = np.random.default_rng(0)
    reference = torch_unet(folder)
    ours = UNet2DConditionModel.from_pretrained(folder)
    config = reference.config
    sample = rng.standard_normal((batch, config.in_channels, size, size)).astype(np.float32)
    states = rng.standard_normal((batch, tokens, config.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(sample), torch.tensor(timesteps),
                         encoder_hidden_states=torch.from_numpy(states))
    with jt.no_grad():
        got = ours(jt.array(sample), jt.array(np.asarray(timesteps)), jt.array(states)).numpy()
    want = want.sample.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    assert want.std() > 0.05  # the outputs carry signal, not a constant a wrong model could also match


def test_tiny_model_unet_matches_diffusers(tiny_model_dir):
    assert_same_outputs(tiny_model_dir / "unet", batch=2, size=8)


@pytest.mark.parametrize("config", [SD21_REDUCED, SD15_REDUCED], ids=["sd21", "sd15"])
def test_sd_shaped_unet_matches_diffusers(config, tmp_path):
    # 12 is not a multiple of the 8x total downsampling: the up path must upsample to the skips' sizes (3 -> 6)
    folder = save_random_unet(config, tmp_path / "unet")
    assert_same_outputs(folder, batch=2, size=12, tokens=5)


def test_parameter_names_are_diffusers_names(tiny_model_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"), framework="numpy") as f:
        stored = set(f.keys())
    ours = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert {name for name, _ in ours.named_parameters()} == stored
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight" in stored
    assert "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2.weight" in stored


def test_unsupported_configs_are_refused_by_name():
    with pytest.raises(EngineError, match="class_embed_type='timestep'.*engine=torch"):
        UNet2DConditionModel(dict(SD21_REDUCED, class_embed_type="timestep"))
    with pytest.raises(EngineError, match="SimpleCrossAttnDownBlock2D"):
        UNet2DConditionModel(dict(SD21_REDUCED, down_block_types=("SimpleCrossAttnDownBlock2D",) * 4))
