"""Tests for jdiff.tiny_model: the tiny SD 2.1-shaped diffusers folder (model=tiny)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from jdiff.tiny_model import (  # noqa: E402
    MARKER_FILE,
    REQUIRED_FILES,
    TINY_VERSION,
    build_tiny_model,
    ensure_tiny_model,
    is_complete_tiny_model,
    tiny_model_dirname,
)

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def components(tiny):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    p = str(tiny)
    return {
        "unet": UNet2DConditionModel.from_pretrained(p, subfolder="unet").eval(),
        "vae": AutoencoderKL.from_pretrained(p, subfolder="vae").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(p, subfolder="text_encoder").eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(p, subfolder="tokenizer"),
        "scheduler": DDIMScheduler.from_pretrained(p, subfolder="scheduler"),
    }


# --------------------------------------------------------------------------- layout
def test_layout_and_model_index(tiny):
    for rel in REQUIRED_FILES:
        assert (tiny / rel).is_file(), rel
    assert not list(tiny.rglob("*.bin")), "weights must be safetensors only"
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert is_complete_tiny_model(tiny)


def test_configs_are_sd21_shaped(components):
    u = components["unet"].config
    assert tuple(u.down_block_types) == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert u.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert tuple(u.up_block_types) == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert isinstance(u.attention_head_dim, (list, tuple)) and len(u.attention_head_dim) == 3
    assert u.use_linear_projection is True and u.upcast_attention is True
    assert u.in_channels == u.out_channels == 4 and u.sample_size == 8
    assert u.cross_attention_dim == components["text_encoder"].config.hidden_size == 32

    v = components["vae"].config
    assert len(v.block_out_channels) == 4 and v.latent_channels == 4
    assert v.scaling_factor == pytest.approx(0.18215) and v.sample_size == 64

    t = components["text_encoder"].config
    tok = components["tokenizer"]
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (32, 2, 4, 64)
    assert t.hidden_act == "gelu" and t.max_position_embeddings == 77 and t.projection_dim == 32
    assert t.vocab_size == len(tok)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_scheduler_config(tmp_path, tiny, prediction_type):
    from diffusers import DDIMScheduler

    # the module fixture is v_prediction; "epsilon" needs its own build
    path = tiny if prediction_type == "v_prediction" else build_tiny_model(tmp_path / "m", 0, prediction_type)
    s = DDIMScheduler.from_pretrained(str(path), subfolder="scheduler")
    assert s.config.prediction_type == prediction_type
    assert s.config.beta_schedule == "scaled_linear"
    assert s.config.beta_start == pytest.approx(0.00085) and s.config.beta_end == pytest.approx(0.012)
    assert s.config.num_train_timesteps == 1000
    assert s.config.clip_sample is False and s.config.set_alpha_to_one is False
    assert s.config.steps_offset == 1
    raw = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert raw["skip_prk_steps"] is True and raw["_class_name"] == "DDIMScheduler"


def test_bad_prediction_type(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "x", prediction_type="sample_x0")


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer(components):
    tok = components["tokenizer"]
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == "!"  # like SD 2.1
    enc = tok("an image of cat in style_03", padding="max_length", max_length=77, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    n = ids.index(tok.eos_token_id)
    assert all(i == tok.pad_token_id for i in ids[n + 1 :])
    # every listed word is a single token; "_" and each digit are split off (CLIP pre-tokenizer)
    tokens = tok.convert_ids_to_tokens(tok("an image of sunflower in style_03").input_ids)
    assert tokens == [
        "<|startoftext|>",
        "an</w>",
        "image</w>",
        "of</w>",
        "sunflower</w>",
        "in</w>",
        "style</w>",
        "_</w>",
        "0</w>",
        "3</w>",
        "<|endoftext|>",
    ]
    # round trips (unknown words fall back to byte-level pieces, never to UNK)
    for text in ["a watercolor painting of a red fox", "zebra quokka", "Bridge"]:
        ids = tok(text).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == text.lower()
        assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids)) == ids
    assert tok.unk_token_id not in tok("zebra quokka 42 é €").input_ids[1:-1]


# --------------------------------------------------------------------------- shapes / behaviour
def test_shapes(components):
    vae, unet, te, tok = components["vae"], components["unet"], components["text_encoder"], components["tokenizer"]
    with torch.no_grad():
        img = torch.rand(1, 3, 64, 64) * 2 - 1
        lat = vae.encode(img).latent_dist.sample() * vae.config.scaling_factor
        assert lat.shape == (1, 4, 8, 8)
        ids = tok("an image of cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = te(ids)[0]
        assert hidden.shape == (1, 77, 32)
        out = unet(lat, torch.tensor([500]), hidden).sample
        assert out.shape == lat.shape
        dec = vae.decode(lat / vae.config.scaling_factor).sample
        assert dec.shape == (1, 3, 64, 64)


def test_unet_not_degenerate(components):
    unet, te, tok = components["unet"], components["text_encoder"], components["tokenizer"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids = tok(["an image of cat", "a photo of a red car"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        c = te(ids.input_ids)[0]
        base = unet(x, torch.tensor([500, 500]), c).sample
        assert base.std() > 1e-3
        # conditioning matters
        assert (unet(x, torch.tensor([500, 500]), c[[1, 0]]).sample[0] - base[0]).abs().max() > 1e-4
        # timestep matters
        assert (unet(x, torch.tensor([10, 10]), c).sample - base).abs().max() > 1e-4
        # input matters
        assert (unet(x + 0.5, torch.tensor([500, 500]), c).sample - base).abs().max() > 1e-4


def test_all_unet_and_vae_params_get_gradients(components):
    unet, vae = components["unet"], components["vae"]
    x = torch.randn(2, 4, 8, 8)
    c = torch.randn(2, 77, 32)
    unet.zero_grad(set_to_none=True)
    unet(x, torch.tensor([10, 700]), c).sample.square().mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not torch.any(p.grad)]
    assert not missing, missing
    unet.zero_grad(set_to_none=True)

    vae.zero_grad(set_to_none=True)
    post = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist
    vae.decode(post.sample()).sample.square().mean().backward()
    missing = [n for n, p in vae.named_parameters() if p.grad is None or not torch.any(p.grad)]
    assert not missing, missing
    vae.zero_grad(set_to_none=True)


def test_pipeline_call(tiny):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny), safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae_scale_factor == 8
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "an image of sunflower in style_03",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    img = out.images[0]
    assert img.size == (64, 64)
    # default resolution is unet.sample_size * 8 == 64, like SD 2.1's 96 * 8 == 768
    out = pipe("a cat", num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


# --------------------------------------------------------------------------- determinism
def test_determinism(tmp_path, tiny):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert _hashes(again) == _hashes(tiny)
    other = build_tiny_model(tmp_path / "other", seed=1)
    h0, h1 = _hashes(tiny), _hashes(other)
    for rel in WEIGHT_FILES:
        assert h0[rel] != h1[rel], rel
    # configs / tokenizer do not depend on the seed
    assert h0["tokenizer/vocab.json"] == h1["tokenizer/vocab.json"]
    assert h0["unet/config.json"] == h1["unet/config.json"]


def test_build_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- cache
def test_ensure_reuses_and_rebuilds(tmp_path):
    root = tmp_path / "cache"
    p = ensure_tiny_model(root, seed=0)
    assert p == root / f"tiny-v{TINY_VERSION}-seed0-v_prediction" == root / tiny_model_dirname(0, "v_prediction")
    assert is_complete_tiny_model(p)
    weights = p / "unet" / "diffusion_pytorch_model.safetensors"
    past = 1_000_000_000
    os.utime(weights, (past, past))

    # complete: reused as is
    assert ensure_tiny_model(root, seed=0) == p
    assert weights.stat().st_mtime == past

    # incomplete (a file missing): rebuilt
    (p / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert not is_complete_tiny_model(p)
    assert ensure_tiny_model(root, seed=0) == p
    assert is_complete_tiny_model(p)
    assert weights.stat().st_mtime != past

    # incomplete (truncated file / no marker): rebuilt too
    os.utime(weights, (past, past))
    with open(p / "text_encoder" / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert ensure_tiny_model(root, seed=0) == p
    assert weights.stat().st_mtime != past
    (p / MARKER_FILE).unlink()
    assert ensure_tiny_model(root, seed=0) == p and is_complete_tiny_model(p)

    # no temporary folders left behind; other variants are separate folders
    assert sorted(x.name for x in root.iterdir() if x.is_dir()) == [p.name]
    q = ensure_tiny_model(root, seed=0, prediction_type="epsilon")
    assert q == root / f"tiny-v{TINY_VERSION}-seed0-epsilon"
    assert json.loads((q / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


def test_ensure_concurrent(tmp_path):
    root = tmp_path / "cache"
    results, errors = [], []

    def work():
        try:
            results.append(ensure_tiny_model(root, seed=3))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1 and is_complete_tiny_model(results[0])
    assert sorted(x.name for x in root.iterdir() if x.is_dir()) == [results[0].name]


def test_zero_init_guard_reinitialises_deterministically():
    from jdiff.tiny_model import _fix_zero_init

    def make():
        m = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.GroupNorm(2, 4))
        torch.nn.init.zeros_(m[0].weight)
        fixed = _fix_zero_init(m, torch.Generator().manual_seed(7))
        return m, fixed

    a, fixed = make()
    b, _ = make()
    assert fixed == ["0.weight"]  # norm weights/biases are left alone
    assert torch.any(a[0].weight) and 0.005 < a[0].weight.std() < 0.05
    assert torch.equal(a[0].weight, b[0].weight)
    assert not torch.any(a[1].bias)


def test_marker_records_build(tiny):
    meta = json.loads((tiny / MARKER_FILE).read_text())
    assert meta["tiny_version"] == TINY_VERSION and meta["seed"] == 0
    assert meta["prediction_type"] == "v_prediction"
    assert set(meta["num_parameters"]) == {"unet", "vae", "text_encoder"}
    for rel, info in meta["files"].items():
        assert hashlib.sha256((tiny / rel).read_bytes()).hexdigest() == info["sha256"], rel


def test_sd21_random_has_the_real_sd21_sizes():
    # model=sd21_random (for GPU benchmarks) must cost what SD 2.1 costs: the published checkpoint's
    # parameter counts, built on the meta device (no memory).
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jdiff.tiny_model import ARCHITECTURES

    unet_config, vae_config, text_config = ARCHITECTURES["sd21_random"]
    with torch.device("meta"):
        models = (UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config),
                  CLIPTextModel(CLIPTextConfig(**text_config, max_position_embeddings=77, hidden_act="gelu")))
    assert [sum(p.numel() for p in m.parameters()) for m in models] == [865_910_724, 83_653_863, 340_387_840]
    assert tiny_model_dirname(0, "v_prediction", "sd21_random") == f"sd21_random-v{TINY_VERSION}-seed0-v_prediction"
