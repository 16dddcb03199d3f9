"""Prior preservation, the class-image cache, loss targets and schedules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import QUICK, compose_config
from jdiff.augment import augment, enlarged
from jdiff.data import load_style
from jdiff.demo_data import write_demo_styles
from jdiff.engines.base import OptimizerSettings, TrainBatch
from jdiff.engines.options import TorchOptions
from jdiff.pipeline import Run, run
from jdiff.schedule import NoiseSchedule, betas_to_alphas_cumprod, learning_rate
from jdiff.train import make_batch


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from jdiff.engines.torch.engine import TorchEngine

    return TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))


def quick_cfg(root: Path, *extra: str):
    cfg = compose_config(QUICK + list(extra), root)
    write_demo_styles(Path(cfg.data.root))
    return cfg


def test_a_prior_step_pairs_style_and_class_images(jdiff_root):
    cfg = quick_cfg(jdiff_root, "prior.weight=0.25", "train.batch_size=2")
    style = load_style(Path(cfg.data.root), "00")
    class_views = [np.full((64, 64, 3), 7, np.uint8), np.full((64, 64, 3), 200, np.uint8)]
    schedule = NoiseSchedule(np.linspace(0.99, 0.01, 1000).astype(np.float32), "epsilon")
    batch = make_batch(3, cfg, style.images(), ["style prompt"] * 4, class_views, ["class a", "class b"],
                       schedule, (4, 8, 8))
    assert batch.pixels.shape == (4, 3, 64, 64) and batch.noise.shape == (4, 4, 8, 8)
    assert batch.prompts[:2] == ["style prompt"] * 2 and set(batch.prompts[2:]) <= {"class a", "class b"}
    np.testing.assert_allclose(batch.weights, [0.5, 0.5, 0.125, 0.125])  # 1/n each, prior weight / n each
    acp = schedule.alphas_cumprod[batch.timesteps]
    np.testing.assert_allclose(batch.signal ** 2 + batch.noise_level ** 2, 1.0, atol=1e-6)
    np.testing.assert_allclose(batch.signal ** 2, acp, rtol=1e-6)
    again = make_batch(3, cfg, style.images(), ["style prompt"] * 4, class_views, ["class a", "class b"],
                       schedule, (4, 8, 8))
    assert np.array_equal(batch.pixels, again.pixels) and np.array_equal(batch.noise, again.noise)
    without = make_batch(3, quick_cfg(jdiff_root, "prior=off", "train.batch_size=2"), style.images(),
                         ["style prompt"] * 4, [], [], schedule, (4, 8, 8))
    assert len(without.prompts) == 2 and np.allclose(without.weights, 0.5)


def test_views_enlarged_once_give_the_same_batches(jdiff_root):
    """train_lora enlarges each reference once, not at every step: the batches must not change."""
    cfg = quick_cfg(jdiff_root, "data.resolution=48", "augment.crop_scale=1.2", "augment.rotate_degrees=10",
                    "augment.hflip=0.5", "train.batch_size=2")
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 256, (40 + 7 * k, 61 - 5 * k, 3), dtype=np.uint8) for k in range(3)]
    made = [enlarged(v, 48, 1.2) for v in views]
    schedule = NoiseSchedule(np.linspace(0.99, 0.01, 1000).astype(np.float32), "epsilon")
    for step in range(4):
        raw = make_batch(step, cfg, views, ["s"] * 3, views[:2], ["c"] * 2, schedule, (4, 6, 6))
        once = make_batch(step, cfg, made, ["s"] * 3, made[:2], ["c"] * 2, schedule, (4, 6, 6))
        assert np.array_equal(raw.pixels, once.pixels) and np.array_equal(raw.noise, once.noise)
    with pytest.raises(ValueError, match=r"shorter side must be 58: make it with enlarged\(\)"):
        augment(enlarged(views[0], 48, 1.0), 48, rng, crop_scale=1.2)


def _batch(engine, rng) -> TrainBatch:
    t = np.array([100, 700])
    acp = NoiseSchedule.from_model(engine.model_dir).alphas_cumprod[t]
    return TrainBatch(
        pixels=rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32), prompts=["a style image", "an image of cat"],
        weights=np.ones(2, np.float32), timesteps=t, signal=np.sqrt(acp), noise_level=np.sqrt(1 - acp),
        noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        posterior_noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
    )


def test_the_class_loss_is_weighted_by_the_prior_weight(tiny_model_dir):
    """The gradient the optimizer sees is grad(style loss) + weight * grad(class loss)."""
    from jdiff.engines.base import LoraSpec
    from jdiff.engines.torch.engine import TorchEngine

    eng = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
    eng.add_lora(LoraSpec(unet_rank=4, unet_alpha=4.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0")))
    eng.setup_training(OptimizerSettings(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                         max_grad_norm=0.0, text_encoder_lr_ratio=0.1))
    captured = []
    eng.optimizer.step = lambda: captured.append([p.grad.clone() for p in eng.trainable])
    batch = _batch(eng, np.random.default_rng(0))
    # B = 0 at the start gives A no gradient; put a little weight in B so every adapter parameter is live
    for p in eng.trainable:
        p.data.add_(0.01)
    for weights in ([1.0, 0.0], [0.0, 1.0], [1.0, 2.5]):
        batch.weights = np.asarray(weights, np.float32)
        eng.train_step(batch, lr=1e-3)
    style, prior, combined = captured
    assert any(g.abs().sum() > 0 for g in prior)
    for s, p, c in zip(style, prior, combined):
        np.testing.assert_allclose(c.numpy(), (s + 2.5 * p).numpy(), rtol=1e-4, atol=1e-7)


def test_loss_targets_follow_the_prediction_type(tiny_model_dir):
    import torch

    from jdiff.engines.torch.engine import TorchEngine

    rng = np.random.default_rng(1)
    for kind in ("epsilon", "v_prediction"):
        eng = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"), prediction_type=kind)
        assert eng.prediction_type == kind
        batch = _batch(eng, rng)
        with torch.no_grad():
            got = eng.loss_terms(batch).numpy()
            latents = eng.encode_images(torch.from_numpy(batch.pixels), torch.from_numpy(batch.posterior_noise))
            a = torch.from_numpy(batch.signal).view(-1, 1, 1, 1)
            s = torch.from_numpy(batch.noise_level).view(-1, 1, 1, 1)
            noise = torch.from_numpy(batch.noise)
            states = eng.encode_prompts(batch.prompts)
            pred = eng.unet(a * latents + s * noise, torch.from_numpy(batch.timesteps), encoder_hidden_states=states).sample
            target = noise if kind == "epsilon" else a * noise - s * latents
            want = ((pred - target) ** 2).mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert NoiseSchedule.from_model(tiny_model_dir).prediction_type == "v_prediction"  # SD 2.1's, from the config


def test_class_images_are_cached_and_reused(jdiff_root, tmp_path, monkeypatch):
    import jdiff.pipeline

    first = Run(quick_cfg(jdiff_root, "prior.images_per_object=2"), tmp_path / "a")
    first.prior()
    paths = [item.path for item in first.class_items]
    objects = set(first.style.objects) | set(first.style.prompt_objects)
    assert len(paths) == 2 * len(objects) and all(p.is_file() for p in paths)
    assert {item.prompt for item in first.class_items} == {f"an image of {o}" for o in objects}
    stamps = [p.stat().st_mtime_ns for p in paths]

    def no_engine(*args, **kwargs):
        raise AssertionError("a cached class image was generated again")

    monkeypatch.setattr(jdiff.pipeline, "create_engine", no_engine)
    second = Run(quick_cfg(jdiff_root, "prior.images_per_object=2"), tmp_path / "b")
    second.prior()
    assert [item.path for item in second.class_items] == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    # fewer images per object is a subset of the cache, also without generating anything
    third = Run(quick_cfg(jdiff_root, "prior.images_per_object=1"), tmp_path / "c")
    third.prior()
    assert {item.path for item in third.class_items} < set(paths)


def test_a_changed_sampling_setting_gets_its_own_cache(jdiff_root, tmp_path):
    a = Run(quick_cfg(jdiff_root), tmp_path / "a")
    a.prior()
    b = Run(quick_cfg(jdiff_root, "infer.steps=2"), tmp_path / "b")
    b.prior()
    assert a.class_items[0].path.parent.parent != b.class_items[0].path.parent.parent


def test_noise_schedule_matches_diffusers(tiny_model_dir):
    import torch
    from diffusers import DDPMScheduler

    ours = NoiseSchedule.from_model(tiny_model_dir).alphas_cumprod
    theirs = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler").alphas_cumprod
    np.testing.assert_allclose(ours, theirs.to(torch.float32).numpy(), rtol=1e-5)
    linear = betas_to_alphas_cumprod({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})
    assert linear.shape == (1000,) and linear[0] == pytest.approx(1 - 1e-4)


def test_learning_rate_schedules():
    assert learning_rate(0, 1e-4, 100) == learning_rate(99, 1e-4, 100) == 1e-4
    assert learning_rate(0, 1.0, 100, "constant", warmup=10) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 100, "constant", warmup=10) == pytest.approx(1.0)
    assert learning_rate(55, 1.0, 100, "linear", warmup=10) == pytest.approx(0.5)
    assert learning_rate(10, 1.0, 100, "cosine", warmup=10) == pytest.approx(1.0)
    assert learning_rate(100, 1.0, 100, "cosine") == pytest.approx(0.0)


def test_a_run_logs_loss_as_style_plus_weighted_prior(jdiff_root, tmp_path, caplog):
    import csv
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="jdiff.train"):
        run(quick_cfg(jdiff_root, "prior.weight=0.5", "init=noise"), tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "loss.csv")))
    for row in rows:
        expected = float(row["style_loss"]) + 0.5 * float(row["prior_loss"])
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)
    # the summary line splits the loop's time: the seconds it waited for the batch worker are part of the total
    found = [re.search(r"trained (\d+) steps in ([\d.]+) s .*; ([\d.]+) s of it waiting for the next batch",
                       r.getMessage()) for r in caplog.records]
    steps, total, waited = next(m.groups() for m in found if m)
    assert int(steps) == len(rows) and 0 <= float(waited) <= float(total)


def test_text_states_are_encoded_once_per_prompt_only_while_the_encoder_is_frozen(tiny_model_dir, monkeypatch):
    import torch

    from jdiff.engines.base import LoraSpec
    from jdiff.engines.torch.engine import TorchEngine

    engine = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
    engine.add_lora(LoraSpec(unet_rank=2, unet_alpha=2, unet_targets=("to_q",)))
    encoded = []
    encode = engine.encode_prompts
    monkeypatch.setattr(engine, "encode_prompts", lambda prompts: encoded.append(list(prompts)) or encode(prompts))
    prompts = ["a style image", "an image of cat", "a style image"]
    first = engine.training_prompt_states(prompts)
    again = engine.training_prompt_states(prompts[::-1])
    assert encoded == [["a style image", "an image of cat"]]  # each prompt once, the second call from memory
    with torch.no_grad():
        torch.testing.assert_close(first, encode(prompts), rtol=0, atol=1e-6)
    assert torch.equal(again, first.flip(0)) and not first.requires_grad

    with_text_lora = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
    with_text_lora.add_lora(LoraSpec(unet_rank=2, unet_alpha=2, unet_targets=("to_q",), text_encoder_rank=2,
                                     text_encoder_alpha=2, text_encoder_targets=("q_proj",)))
    with_text_lora.setup_training(OptimizerSettings(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                                    max_grad_norm=1.0, text_encoder_lr_ratio=1.0))
    states = with_text_lora.training_prompt_states(prompts)
    assert states.requires_grad  # an adapted encoder trains: its states are computed every step, with gradients
