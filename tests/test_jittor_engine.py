"""The Jittor engine against the torch engine on the tiny model (CPU, float32): the same adapters, training
step, sampling trajectory and images, and LoRA files that load in either engine and in plain diffusers."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import QUICK, compose_config
from jdiff.engines.base import EngineError, GenerateRequest, LoraSpec, OptimizerSettings, TrainBatch, create_engine
from jdiff.engines.jittor.env import import_jittor
from jdiff.engines.options import JittorOptions, TorchOptions
from jdiff.noise import SAMPLE, gaussian, stream
from jdiff.pipeline import LORA_FILE, run
from jdiff.schedule import NoiseSchedule
from jdiff.validate import ConfigError, validate_config

jt = import_jittor("cpu")

import jdiff.engines.jittor.engine as jittor_engine  # noqa: E402
from jdiff.engines.jittor.engine import JittorEngine  # noqa: E402
from jdiff.engines.jittor.lora import lora_layers  # noqa: E402
from jdiff.engines.torch.engine import TorchEngine  # noqa: E402

SPEC = LoraSpec(unet_rank=4, unet_alpha=8.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                text_encoder_rank=2, text_encoder_alpha=2.0,
                text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"), seed=3)
SETTINGS = OptimizerSettings(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0,
                             text_encoder_lr_ratio=0.1)
PROMPTS = ["an image of cat in style_00", "an image of boat in style_00"]


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def read_lora(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def engines(model_dir: Path, lora: Path | None = None) -> tuple[TorchEngine, JittorEngine]:
    pair = TorchEngine(model_dir, TorchOptions(device="cpu")), JittorEngine(model_dir, JittorOptions(device="cpu"))
    if lora is not None:
        for engine in pair:
            engine.load_lora(lora)
    return pair


@pytest.fixture(scope="module")
def live_lora(tiny_model_dir, tmp_path_factory) -> Path:
    return write_live_lora(tiny_model_dir, tmp_path_factory.mktemp("live_lora") / "live.safetensors")


def write_live_lora(model_dir: Path, path: Path) -> Path:
    """Adapters with B != 0 on the UNet and the text encoder: fresh ones (B = 0) give A no gradient and leave
    the model unchanged, so they would hide mistakes."""
    import torch

    engine = TorchEngine(model_dir, TorchOptions(device="cpu"))
    engine.add_lora(SPEC)
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for prefix in ("unet", "text_encoder"):
            for layer in engine._lora_layers(prefix).values():
                up = layer.lora_B["default"].weight
                up.copy_(torch.from_numpy(0.05 * rng.standard_normal(tuple(up.shape)).astype(np.float32)))
    engine.save_lora(path)
    return path


def training_batch(model_dir: Path) -> TrainBatch:
    rng = np.random.default_rng(11)
    t = np.array([50, 620])
    acp = NoiseSchedule.from_model(model_dir).alphas_cumprod[t]
    return TrainBatch(
        pixels=rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32), prompts=PROMPTS,
        weights=np.array([1.0, 0.5], np.float32), timesteps=t, signal=np.sqrt(acp), noise_level=np.sqrt(1 - acp),
        noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        posterior_noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
    )


def test_fresh_adapters_are_the_same_in_both_engines(tiny_model_dir, tmp_path):
    for engine in engines(tiny_model_dir):
        engine.add_lora(SPEC)
        engine.save_lora(tmp_path / f"{engine.name}.safetensors")
    with pytest.raises(EngineError, match="adapters already"):
        engine.load_lora(tmp_path / "torch.safetensors")
    theirs, ours = read_lora(tmp_path / "torch.safetensors"), read_lora(tmp_path / "jittor.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight" in ours
    assert "unet.up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in ours
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_a_training_step_gives_the_same_loss_and_gradients(tiny_model_dir, live_lora, prediction_type):
    import torch

    theirs = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"), prediction_type=prediction_type)
    ours = JittorEngine(tiny_model_dir, JittorOptions(device="cpu"), prediction_type=prediction_type)
    batch = training_batch(tiny_model_dir)
    want_grads, got_grads = {}, {}

    theirs.load_lora(live_lora)
    theirs.setup_training(SETTINGS)
    want_losses = theirs.loss_terms(batch)
    (want_losses * torch.from_numpy(batch.weights)).sum().backward()
    for prefix in ("unet", "text_encoder"):
        for name, layer in theirs._lora_layers(prefix).items():
            want_grads[f"{prefix}.{name}.A"] = layer.lora_A["default"].weight.grad.numpy()
            want_grads[f"{prefix}.{name}.B"] = layer.lora_B["default"].weight.grad.numpy()

    ours.load_lora(live_lora)
    ours.setup_training(SETTINGS)
    got_losses = ours.loss_terms(batch)
    params = {}
    for prefix, model in (("unet", ours.unet), ("text_encoder", ours.text_encoder)):
        for name, layer in lora_layers(model).items():
            params[f"{prefix}.{name}.A"], params[f"{prefix}.{name}.B"] = layer.lora_A.weight, layer.lora_B.weight
    grads = jt.grad((got_losses * jt.array(batch.weights)).sum(), list(params.values()))
    got_grads = {key: g.numpy() for key, g in zip(params, grads)}

    assert relative_difference(got_losses.numpy(), want_losses.detach().numpy()) <= 1e-3
    # A and B x 4 projections x (7 UNet transformer blocks x 2 attentions + 2 text-encoder layers)
    assert sorted(got_grads) == sorted(want_grads) and len(got_grads) == 2 * 4 * (7 * 2 + 2)
    for key, want in want_grads.items():
        assert np.linalg.norm(want) > 0, key
        assert relative_difference(got_grads[key], want) <= 1e-3, key


def test_training_steps_update_the_adapters_alike(tiny_model_dir, live_lora, tmp_path):
    """Two optimizer steps (AdamW, weight decay, clipping to norm 1, the text encoder at 0.1x the lr) give
    the same losses and the same adapters."""
    batch = training_batch(tiny_model_dir)
    losses = {}
    for engine in engines(tiny_model_dir, live_lora):
        engine.setup_training(SETTINGS)
        losses[engine.name] = [engine.train_step(batch, lr) for lr in (1e-3, 5e-4)]
        engine.save_lora(tmp_path / f"{engine.name}.safetensors")
    np.testing.assert_allclose(losses["jittor"], losses["torch"], rtol=1e-4)
    before = read_lora(live_lora)
    theirs, ours = read_lora(tmp_path / "torch.safetensors"), read_lora(tmp_path / "jittor.safetensors")
    assert all(np.abs(theirs[key] - before[key]).max() > 1e-5 for key in theirs)  # every adapter trained
    # A step moves each weight by about lr (1e-3) and weight decay by lr * 0.01 * weight (~1e-6), so 1e-7
    # tells any slip in the optimizer. Adam's step lr * m / (sqrt(v) + eps) hangs on float noise only for the
    # rare weight whose gradient is as small as eps (1e-8), or whose two gradients cancel: those may differ more
    # (0.13% of them on one 2-core VM, up to 4e-5). A slip in the optimizer moves nearly every weight.
    diff = np.concatenate([np.abs(ours[key] - theirs[key]).ravel() for key in theirs])
    assert np.mean(diff <= 1e-7) >= 0.99 and diff.max() <= 1e-4, (np.mean(diff <= 1e-7), diff.max())


def record_trajectory(sampler, trail: list):
    """Wrap a sampler's step so each step's new latents are kept (torch's step returns an output object)."""
    step = sampler.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        trail.append(np.array(getattr(out, "prev_sample", out).numpy()))
        return out

    sampler.step = recording
    return sampler


@pytest.mark.parametrize("strength", [1.0, 0.7], ids=["noise", "img2img"])
def test_sampling_trajectories_match(tiny_model_dir, live_lora, monkeypatch, strength):
    theirs, ours = engines(tiny_model_dir, live_lora)
    trails = {"torch": [], "jittor": []}
    make_torch_sampler = theirs.make_sampler
    monkeypatch.setattr(theirs, "make_sampler",
                        lambda name: record_trajectory(make_torch_sampler(name), trails["torch"]))
    make_jittor_sampler = jittor_engine.make_sampler
    monkeypatch.setattr(jittor_engine, "make_sampler",
                        lambda *args: record_trajectory(make_jittor_sampler(*args), trails["jittor"]))
    shape = ours.latent_shape(64)
    assert shape == theirs.latent_shape(64) == (4, 8, 8)
    img2img = strength < 1.0
    posterior_noise = np.stack([gaussian(stream(9, SAMPLE, k, 1), shape) for k in range(2)])
    request = GenerateRequest(
        prompts=PROMPTS, noise=np.stack([gaussian(stream(9, SAMPLE, k), shape) for k in range(2)]), steps=10,
        guidance_scale=7.5, negative_prompt="blurry", origin_prompts=["an image of cat", "an image of boat"],
        origin_scale=0.25, strength=strength,
        init_image=np.random.default_rng(2).uniform(-1, 1, (3, 64, 64)).astype(np.float32) if img2img else None,
        init_posterior_noise=posterior_noise if img2img else None,
    )
    images = {engine.name: engine.generate(request) for engine in (theirs, ours)}
    assert len(trails["jittor"]) == len(trails["torch"]) == int(10 * strength)
    for k, (got, want) in enumerate(zip(trails["jittor"], trails["torch"])):
        assert np.abs(got - want).max() <= 1e-4, f"step {k}: {np.abs(got - want).max()}"
    for got, want in zip(images["jittor"], images["torch"]):
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


# -- end to end through the pipeline --------------------------------------------------------------------------

# The demo, shortened, with a text-encoder adapter too: prior preservation, average-image init, v-prediction,
# clipping, the text encoder's own learning rate, all on.
END_TO_END = QUICK + ["lora=unet_te", "lora.text_encoder_rank=2"]


def images_of(run_dir: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)).astype(int) for p in sorted((run_dir / "images").glob("*.png"))}


def mean_pixel_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b) and a
    return float(np.mean([np.abs(a[k] - b[k]).mean() for k in a]))


@pytest.fixture(scope="module")
def jittor_root(tmp_path_factory) -> Path:
    """A project root of the Jittor run's own, so it generates its class images instead of reusing the torch
    run's cached ones."""
    return tmp_path_factory.mktemp("jittor_root")


@pytest.fixture(scope="module")
def runs(jdiff_root, jittor_root, tmp_path_factory) -> dict[str, Path]:
    """The same run with each engine."""
    out = {}
    for name, root in (("torch", jdiff_root), ("jittor", jittor_root)):
        out[name] = tmp_path_factory.mktemp(f"{name}_run")
        run(compose_config(END_TO_END + [f"engine={name}"], root), out[name])
    return out


def test_both_engines_train_and_generate_the_same_images(runs):
    assert mean_pixel_difference(images_of(runs["jittor"]), images_of(runs["torch"])) < 1.0  # below 1/255
    losses = {name: [float(row["loss"]) for row in csv.DictReader(open(d / "loss.csv"))] for name, d in runs.items()}
    np.testing.assert_allclose(losses["jittor"], losses["torch"], rtol=1e-3)
    theirs, ours = read_lora(runs["torch"] / LORA_FILE), read_lora(runs["jittor"] / LORA_FILE)
    assert sorted(ours) == sorted(theirs)
    # Adam scales each weight's step by its gradient's size, so float noise in tiny gradients reaches the
    # weights at about 1e-3 after a few steps (the optimizer itself is checked strictly above).
    for key in theirs:
        assert relative_difference(ours[key], theirs[key]) <= 1e-2, key


def test_the_jittor_run_made_its_own_class_images(runs, jdiff_root, jittor_root):
    cache = Path("data", "cache", "prior")
    ours = sorted((jittor_root / cache).glob("*/*/*.png"))
    assert ours, "the Jittor run generated no class images"
    for path in ours:
        theirs = jdiff_root / cache / path.relative_to(jittor_root / cache)
        diff = np.abs(np.asarray(Image.open(path)).astype(int) - np.asarray(Image.open(theirs)).astype(int))
        assert diff.mean() < 1.0, path


@pytest.mark.parametrize(("trained_by", "loaded_by"), [("jittor", "torch"), ("torch", "jittor")])
def test_a_lora_file_loads_in_the_other_engine(runs, jdiff_root, tmp_path, trained_by, loaded_by):
    reuse = tmp_path / "reuse"
    run(compose_config(END_TO_END + [f"engine={loaded_by}", "stages=[generate,score]",
                                     f"lora.path={runs[trained_by]}"], jdiff_root), reuse)
    assert mean_pixel_difference(images_of(reuse), images_of(runs[trained_by])) < 1.0


def test_plain_diffusers_loads_a_jittor_lora(runs, tiny_model_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(runs["jittor"]), weight_name=LORA_FILE)
    latents = np.stack([gaussian(stream(4, SAMPLE, k), (4, 8, 8)) for k in range(2)])
    theirs = pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=7.5, latents=torch.from_numpy(latents),
                  output_type="np", height=64, width=64).images
    engine = JittorEngine(tiny_model_dir, JittorOptions(device="cpu"))
    engine.load_lora(runs["jittor"] / LORA_FILE)
    ours = engine.generate(GenerateRequest(prompts=PROMPTS, noise=latents, steps=3, guidance_scale=7.5))
    for got, want in zip(ours, theirs):
        assert np.abs(got.astype(int) - (want * 255).round().astype(int)).max() <= 1


# -- configuration -------------------------------------------------------------------------------------------

def test_engine_jittor_is_a_valid_choice_without_bf16(jdiff_root, tiny_model_dir):
    validate_config(compose_config(QUICK + ["engine=jittor"], jdiff_root))
    with pytest.raises(ConfigError, match="engine.mixed_precision='bf16'.*float32"):
        validate_config(compose_config(QUICK + ["engine=jittor", "engine.mixed_precision=bf16"], jdiff_root))
    with pytest.raises(EngineError, match="float32"):
        create_engine("jittor", tiny_model_dir, mixed_precision="bf16")
    assert isinstance(create_engine("jittor", tiny_model_dir, device="cpu"), JittorEngine)


JITTOR_OOM = ("[f 1128 02:10:11.42 00:w0 cuda_device_allocator.cc:31] Unable to alloc cuda device memory for size "
              "4294967296\n=== display_memory_info ===\n total_cpu_ram: 125.8GB total_device_ram: 79.1GB\n"
              " hold_vars: 3412 lived_vars: 3530 lived_ops: 2950")


def test_running_out_of_gpu_memory_says_what_to_try_and_keeps_other_errors(tiny_model_dir, monkeypatch):
    """Jittor's out-of-memory error (its allocator's line and memory report, as it raises it) becomes an
    EngineError naming what ran out, what to try (fp16 first, for a float32 engine), and the failing line alone;
    any other RuntimeError passes through as it was."""
    engine = JittorEngine(tiny_model_dir, JittorOptions(device="cpu"))
    engine.add_lora(SPEC)
    engine.setup_training(SETTINGS)

    def fail(error):
        def raising(*args, **kwargs):
            raise error
        return raising

    monkeypatch.setattr(engine, "loss_terms", fail(RuntimeError(JITTOR_OOM)))
    with pytest.raises(EngineError) as caught:
        engine.train_step(training_batch(tiny_model_dir), 1e-4)
    message = str(caught.value)
    assert message.startswith("out of GPU memory while training. Try engine.mixed_precision=fp16, ")
    assert "JDIFF_CUDNN_WORKSPACE_GIB" in message and "infer.batch_size" in message
    assert "Unable to alloc cuda device memory for size 4294967296" in message and "hold_vars" not in message
    monkeypatch.setattr(engine, "make_sampler", fail(RuntimeError("CUDNN_STATUS_ALLOC_FAILED in cudnn_conv_op.cc")))
    with pytest.raises(EngineError, match="while generating images.*CUDNN_STATUS_ALLOC_FAILED"):
        engine.generate(GenerateRequest(prompts=["a cat"], noise=np.zeros((1, 4, 8, 8), np.float32), steps=1,
                                        guidance_scale=1.0))
    monkeypatch.setattr(engine, "loss_terms", fail(RuntimeError("Wrong inputs arguments")))
    with pytest.raises(RuntimeError, match="^Wrong inputs arguments$") as caught:
        engine.train_step(training_batch(tiny_model_dir), 1e-4)
    assert not isinstance(caught.value, EngineError)
    engine.dtype = "float16"  # an fp16 engine is not told to use fp16
    monkeypatch.setattr(engine, "loss_terms", fail(RuntimeError(JITTOR_OOM)))
    with pytest.raises(EngineError, match=r"training\. Try JDIFF_CUDNN_WORKSPACE_GIB"):
        engine.train_step(training_batch(tiny_model_dir), 1e-4)
