"""engine.compile=replay: the Jittor engine's training step and sampling UNet calls recorded once and replayed
from Jittor's execution plan (jdiff/engines/jittor/fast/replay.py), against the same engine run eagerly (tiny model,
CPU, where the same recorder is built against cpu_headers/)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import QUICK, compose_config
from jdiff.engines.base import EngineError, GenerateRequest, create_engine
from jdiff.engines.jittor.env import import_jittor
from jdiff.engines.options import JittorOptions
from jdiff.noise import SAMPLE, gaussian, stream
from jdiff.validate import ConfigError, validate_config
from test_jittor_engine import PROMPTS, SETTINGS, training_batch, write_live_lora

jt = import_jittor("cpu")

from jdiff.engines.jittor.engine import JittorEngine  # noqa: E402
from jdiff.engines.jittor.lora import lora_parameters  # noqa: E402
from jdiff.engines.jittor.fast.replay import Replay, extension  # noqa: E402


@pytest.fixture(scope="module")
def live_lora(tiny_model_dir, tmp_path_factory):
    return write_live_lora(tiny_model_dir, tmp_path_factory.mktemp("live_lora") / "live.safetensors")


def engine_with(model_dir, lora, compile: str, mixed_precision: str = "no") -> JittorEngine:
    engine = JittorEngine(model_dir, JittorOptions(device="cpu", mixed_precision=mixed_precision, compile=compile))
    engine.load_lora(lora)
    return engine


def adapters(engine: JittorEngine) -> list[np.ndarray]:
    return [p.numpy().copy() for p in lora_parameters(engine.unet) + lora_parameters(engine.text_encoder)]


def batches(model_dir, count: int):
    """Batches that differ in every input the step takes, so a replay that kept any of them fixed would show."""
    base = training_batch(model_dir)
    rng = np.random.default_rng(5)
    out = []
    for k in range(count):
        t = np.array([40 + 300 * k, 900 - 200 * k])
        out.append(dataclasses.replace(
            base, pixels=rng.uniform(-1, 1, base.pixels.shape).astype(np.float32),
            prompts=PROMPTS[::-1] if k % 2 else PROMPTS, weights=np.array([1.0, 0.25 * (k + 1)], np.float32),
            timesteps=t, signal=np.cos(t / 1000 * 1.4).astype(np.float32),
            noise_level=np.sin(t / 1000 * 1.4).astype(np.float32),
            noise=rng.standard_normal(base.noise.shape).astype(np.float32),
            posterior_noise=rng.standard_normal(base.noise.shape).astype(np.float32)))
    return out


def train(engine: JittorEngine, model_dir, lrs=(1e-3, 5e-4, 2e-3)) -> list[np.ndarray]:
    engine.setup_training(SETTINGS)
    return [engine.train_step(batch, lr) for batch, lr in zip(batches(model_dir, len(lrs)), lrs)]


@pytest.fixture(params=["auto", "fused"], ids=["jittor-ops", "jdiff-kernels"])
def kernel_mode(request, monkeypatch):
    """On the CPU jdiff's own kernels (GroupNorm, transposes) run only when forced; on CUDA they always do."""
    import jdiff.engines.jittor.fast.kernels as kernels

    monkeypatch.setattr(kernels, "MODE", request.param)
    return request.param


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_replayed_training_steps_equal_eager_ones(tiny_model_dir, live_lora, mixed_precision, kernel_mode):
    """Three steps with changing batches, prompts, loss weights and learning rates, adapters on the UNet and
    the text encoder, clipping, weight decay and (fp16) loss scaling: the same losses and adapters as eager
    steps, and one recorded plan replayed."""
    eager = engine_with(tiny_model_dir, live_lora, "no", mixed_precision)
    replayed = engine_with(tiny_model_dir, live_lora, "replay", mixed_precision)
    before = adapters(eager)
    want, got = train(eager, tiny_model_dir), train(replayed, tiny_model_dir)
    assert len(replayed._step_call.plans) == 1
    assert not np.allclose(got[0], got[1])  # the steps saw different batches
    ours, theirs = adapters(replayed), adapters(eager)
    assert all(np.abs(t - b).max() > 1e-5 for t, b in zip(theirs, before))  # every adapter trained
    if mixed_precision == "no":  # the same float32 arithmetic, fused alike
        np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-7)
        for o, t in zip(ours, theirs):
            np.testing.assert_allclose(o, t, rtol=1e-4, atol=1e-6)
    else:  # one graph for the whole step fuses the float16 backward differently: float16 rounding apart
        np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=2e-3)
        update = np.concatenate([(t - b).ravel() for t, b in zip(theirs, before)])
        apart = np.concatenate([(o - t).ravel() for o, t in zip(ours, theirs)])
        assert np.linalg.norm(apart) <= 2e-2 * np.linalg.norm(update), np.linalg.norm(apart) / np.linalg.norm(update)
    assert replayed.steps_taken == 3


def test_a_replayed_overflow_skips_the_step_and_halves_the_scale(tiny_model_dir, live_lora):
    engine = engine_with(tiny_model_dir, live_lora, "replay", "fp16")
    engine.setup_training(SETTINGS)
    batch = training_batch(tiny_model_dir)
    engine.loss_scale.scale = 2.0 ** 40  # far past float16's range: the gradients come out inf
    before = adapters(engine)
    moments = [m.numpy().copy() for m in engine.moments]
    assert np.isfinite(engine.train_step(batch, 1e-3)).all()
    assert engine.loss_scale.scale == 2.0 ** 39 and engine.steps_taken == 0
    for now, was in zip(adapters(engine) + [m.numpy() for m in engine.moments], before + moments):
        np.testing.assert_array_equal(now, was)
    engine.loss_scale.scale = 2.0 ** 10  # the scale is an input of the recorded step, not a constant in it
    engine.train_step(batch, 1e-3)
    assert engine.steps_taken == 1 and engine.loss_scale.good_steps == 1
    assert all(np.abs(now - was).max() > 0 for now, was in zip(adapters(engine), before))


def requests(model_dir, n: int, seed: int) -> GenerateRequest:
    rng = np.random.default_rng(seed)
    return GenerateRequest(prompts=[f"an image of owl {k} in style_00" for k in range(n)],
                           noise=gaussian(stream(seed, SAMPLE, 0), (n, 4, 8, 8)), steps=4, guidance_scale=7.5,
                           init_image=rng.uniform(-1, 1, (3, 64, 64)).astype(np.float32), strength=0.9,
                           init_posterior_noise=gaussian(stream(seed, SAMPLE, 1), (n, 4, 8, 8)))


def test_replayed_sampling_follows_the_adapters_as_they_train(tiny_model_dir, live_lora):
    """Images from the replayed UNet call equal eager ones, before and after training changed the adapters
    (the adapters are inputs of the recorded call), and a new batch size records a second plan."""
    eager = engine_with(tiny_model_dir, live_lora, "no")
    replayed = engine_with(tiny_model_dir, live_lora, "replay")
    images = {}
    for name, engine in (("eager", eager), ("replayed", replayed)):
        first = engine.generate(requests(tiny_model_dir, 2, 0))
        train(engine, tiny_model_dir, lrs=(5e-2,))
        images[name] = first, engine.generate(requests(tiny_model_dir, 2, 0)), \
            engine.generate(requests(tiny_model_dir, 1, 1))
    assert len(replayed._unet_call.plans) == 2
    first, after, single = images["replayed"]
    assert np.abs(first[0].astype(int) - after[0].astype(int)).max() > 2  # the training changed the images
    for ours, theirs in zip(sum(map(list, images["replayed"]), []), sum(map(list, images["eager"]), [])):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_a_function_that_runs_while_recorded_is_refused():
    def peeks(inputs):
        return [inputs[0] * float(inputs[0].sum().item())]

    with pytest.raises(EngineError, match="engine.compile=no"):
        Replay(peeks, "test function")([jt.ones(3)])


def test_replay_takes_python_numbers_as_constants_and_inputs_as_inputs():
    """What the module docstring promises a recorded function: inputs change per call, the rest is fixed."""
    factor = [2.0]
    replay = Replay(lambda inputs: [inputs[0] * factor[0] + inputs[1]], "test function")
    first = replay([jt.array(np.arange(3, dtype=np.float32)), jt.ones(3)])[0].numpy()
    factor[0] = 5.0
    second = replay([jt.array(np.ones(3, np.float32)), jt.zeros(3)])[0].numpy()
    np.testing.assert_array_equal(first, [1, 3, 5])
    np.testing.assert_array_equal(second, [2, 2, 2])  # recorded with 2.0: the new factor is not seen


def test_a_jittor_without_the_recorder_gets_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="engine.compile=no"):
        extension(tmp_path)


def test_config_takes_replay_for_jittor_only(jdiff_root):
    validate_config(compose_config(QUICK + ["engine=jittor", "engine.compile=replay"], jdiff_root))
    for overrides, message in ((["engine=torch", "engine.compile=replay"], "use engine=jittor"),
                               (["engine=jittor", "engine.compile=cuda-graphs"], "replay")):
        with pytest.raises(ConfigError, match=message):
            validate_config(compose_config(QUICK + overrides, jdiff_root))
    with pytest.raises(EngineError, match="engine.compile='cuda-graphs'.*replay"):
        create_engine("jittor", "unused", compile="cuda-graphs")


def test_the_fast_jittor_preset_is_the_documented_setting(jdiff_root):
    preset = compose_config(QUICK + ["engine=jittor_fast"], jdiff_root).engine
    spelled = compose_config(QUICK + ["engine=jittor", "engine.device=cuda", "engine.mixed_precision=fp16",
                                      "engine.compile=replay"], jdiff_root).engine
    assert preset == spelled
    validate_config(compose_config(QUICK + ["engine=jittor_fast"], jdiff_root))
