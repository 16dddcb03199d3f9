"""StyleID style injection (jdiff/inject.py, inject=styleid) on the tiny model, CPU: the DDIM inversion, the
hook that records and injects the self-attention's q, k, v, the two engines alike, and the config group."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import QUICK, compose_config
from jdiff.engines.base import GenerateRequest
from jdiff.engines.jittor.env import import_jittor
from jdiff.engines.options import JittorOptions, TorchOptions
from jdiff.inject import InjectSettings, StyleID, adain, default_layers, inversion_step, resolve_layers
from jdiff.noise import SAMPLE, gaussian, stream
from jdiff.samplers import DDIMSampler
from jdiff.schedule import read_scheduler_config
from jdiff.validate import ConfigError, validate_config

jt = import_jittor("cpu")

import jdiff.engines.jittor.blocks as jittor_blocks  # noqa: E402
import jdiff.engines.jittor.unet as jittor_unet  # noqa: E402
from jdiff.engines.jittor.engine import JittorEngine  # noqa: E402
from jdiff.engines.torch.engine import TorchEngine  # noqa: E402

RES = 32  # 4 x 4 latents: the tiny UNet's smallest input, so the tests stay fast
SD21_ATTENTIONS = [f"{part}.attentions.{i}" for part, n in (("down_blocks.0", 2), ("down_blocks.1", 2),
                                                            ("down_blocks.2", 2), ("up_blocks.1", 3),
                                                            ("up_blocks.2", 3), ("up_blocks.3", 3)) for i in range(n)]


def relative(a, b) -> float:
    a, b = (np.asarray(x.numpy() if hasattr(x, "numpy") else x, np.float64) for x in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x.numpy()


def image(seed: int) -> np.ndarray:
    """A smooth random image (3, RES, RES) in [-1, 1]."""
    coarse = np.random.default_rng(seed).uniform(-1, 1, (3, 4, 4)).astype(np.float32)
    return np.repeat(np.repeat(coarse, RES // 4, axis=1), RES // 4, axis=2)


@pytest.fixture(scope="module")
def torch_engine(tiny_model_dir) -> TorchEngine:
    return TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))


def clean_latents(engine, pixels: np.ndarray):
    return engine.encode_images(pixels[None], np.zeros((1, *engine.latent_shape(RES)), np.float32))


# -- the arithmetic -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_inversion_step_undoes_the_ddim_step(tiny_model_dir, prediction_type):
    sampler = DDIMSampler(read_scheduler_config(tiny_model_dir), prediction_type)
    rng = np.random.default_rng(0)
    x, prediction = rng.standard_normal((2, 4, 4, 4))
    for t in sampler.set_timesteps(20):
        noisier = inversion_step(sampler, prediction, t, x)
        assert np.abs(noisier - x).max() > 1e-3  # it moves
        np.testing.assert_allclose(sampler.step(prediction, t, noisier), x, atol=1e-5)
    import torch

    for tensor, to_host in ((jt.array, lambda y: y.numpy()), (torch.from_numpy, lambda y: y.numpy())):
        x32, prediction32 = x.astype(np.float32), prediction.astype(np.float32)
        on_engine = inversion_step(sampler, tensor(prediction32), 501, tensor(x32))  # each engine's tensors
        np.testing.assert_allclose(to_host(on_engine), inversion_step(sampler, prediction, 501, x), atol=1e-5)


def test_adain_gives_the_content_the_style_s_channel_statistics():
    rng = np.random.default_rng(1)
    content = rng.normal(3.0, 2.0, (2, 4, 8, 8))
    style = rng.normal(-1.0, 0.5, (1, 4, 8, 8)) * np.arange(1, 5)[None, :, None, None]
    out = adain(content, style)
    np.testing.assert_allclose(out.mean(axis=(2, 3)), np.broadcast_to(style.mean(axis=(2, 3)), (2, 4)), atol=1e-6)
    np.testing.assert_allclose(out.std(axis=(2, 3), ddof=1), np.broadcast_to(style.std(axis=(2, 3), ddof=1), (2, 4)),
                               rtol=1e-3)
    # the shape of each channel is the content's
    np.testing.assert_allclose(np.corrcoef(out[0, 2].ravel(), content[0, 2].ravel())[0, 1], 1.0, atol=1e-9)


def test_the_layers_are_styleid_s_choice_or_checked_against_the_model(torch_engine):
    assert default_layers(SD21_ATTENTIONS) == ["up_blocks.2.attentions.1", "up_blocks.2.attentions.2",
                                               "up_blocks.3.attentions.0", "up_blocks.3.attentions.1",
                                               "up_blocks.3.attentions.2"]
    available = torch_engine.attention_layers()
    assert "up_blocks.2.attentions.1" in available and "mid_block.attentions.0" in available
    assert resolve_layers(available, None) == ["up_blocks.1.attentions.1", "up_blocks.2.attentions.0",
                                               "up_blocks.2.attentions.1"]
    assert resolve_layers(available, ["mid_block.attentions.0"]) == ["mid_block.attentions.0"]
    with pytest.raises(ConfigError, match=r"up_blocks\.3\.attentions\.0, which this model's UNet does not have.*"
                                          r"up_blocks\.2\.attentions\.1"):
        resolve_layers(available, ["up_blocks.2.attentions.1", "up_blocks.3.attentions.0"])


# -- the method on the tiny model -----------------------------------------------------------------------------

def round_trip_error(engine, pixels: np.ndarray, steps: int) -> float:
    styleid = StyleID(engine, InjectSettings(inversion_steps=steps), pixels)
    with engine.sampling():
        clean = clean_latents(engine, pixels)
        noisy, _ = styleid.invert(clean, ())
        return relative(host(styleid.sample(noisy)), host(clean))


def test_inversion_then_reconstruction_returns_the_image(torch_engine):
    """DDIM inversion is first order in the step: the round trip's error falls with the step size. (On real
    weights 20 steps give the image back nearly exactly; the tiny model's random UNet is far less smooth, so
    here the tolerance is the convergence, and a bound at 32 steps.)"""
    pixels = image(0)
    coarse, fine = round_trip_error(torch_engine, pixels, 8), round_trip_error(torch_engine, pixels, 32)
    assert fine < 0.5 * coarse, (coarse, fine)
    assert fine < 0.6, fine


@pytest.fixture(scope="module")
def inverted(torch_engine):
    """A content image inverted (q, k, v kept), its reconstruction (q, k, v kept along it), and a style image's
    inversion, with gamma 1, T 1 and no AdaIN."""
    styleid = StyleID(torch_engine, InjectSettings(gamma=1.0, temperature=1.0, adain_init=False, inversion_steps=6),
                      image(2))
    with torch_engine.sampling():
        noisy, content = styleid.invert(clean_latents(torch_engine, image(1)), (0, 1, 2))
        along = {}
        reconstruction = styleid.sample(noisy, keep=along)
        _, style = styleid.style_features()
    return styleid, noisy, content, along, reconstruction, style


def test_with_gamma_1_and_t_1_the_content_s_own_keys_and_values_give_the_reconstruction(torch_engine, inverted):
    styleid, noisy, content, along, reconstruction, style = inverted
    assert sorted({layer for _, layer in along}) == [f"{name}.transformer_blocks.0.attn1" for name in styleid.layers]
    with torch_engine.sampling():
        # the q, k, v the reconstruction itself attended with: the same images, to float rounding
        own = styleid.sample(noisy, along, along)
        # the method's: the content's q, k, v from its inversion (timestep t's from the latents one step less
        # noisy), close to the reconstruction; the style's keys and values move it much further
        inverted_own = styleid.sample(noisy, content, content)
        styled = styleid.sample(noisy, content, style)
    np.testing.assert_allclose(host(own), host(reconstruction), atol=1e-5)
    near, far = relative(host(inverted_own), host(reconstruction)), relative(host(styled), host(reconstruction))
    assert near < 0.3 and far > 2 * near, (near, far)


def test_the_injected_keys_and_values_are_the_style_image_s(torch_engine, inverted, monkeypatch):
    styleid, noisy, content, along, reconstruction, style = inverted
    seen = []
    hook = StyleID.__call__

    def spy(self, name, q, k, v):
        out = hook(self, name, q, k, v)
        seen.append(((self.step, name), out))
        return out

    monkeypatch.setattr(StyleID, "__call__", spy)
    with torch_engine.sampling():
        styled = styleid.sample(noisy, along, style)
    assert len(seen) == len(styleid.timesteps) * len(styleid.layers)
    for key, (q, k, v) in seen:
        assert k is style[key][0] and v is style[key][1], key
        assert not np.allclose(host(k), host(along[key][1]), atol=1e-3), key  # not the content's
        np.testing.assert_allclose(host(q), host(along[key][0]), atol=1e-6)  # gamma 1: the content's query
    # gamma 1 and T 1 with the reconstruction's own queries: only the keys and values differ from it
    assert relative(host(styled), host(reconstruction)) > 0.05


def test_temperature_and_gamma_shape_the_query(torch_engine, inverted, monkeypatch):
    styleid, noisy, content, along, reconstruction, style = inverted
    styleid.settings = InjectSettings(gamma=0.25, temperature=1.5, adain_init=False, inversion_steps=6)
    key = (int(styleid.timesteps[0]), f"{styleid.layers[0]}.transformer_blocks.0.attn1")
    styleid.step, styleid.injecting = key[0], (content, style)
    try:
        q_now = 0 * content[key][0] + 1.0
        q, k, v = styleid(key[1], q_now, None, None)
    finally:
        styleid.injecting = None
    np.testing.assert_allclose(host(q), host(1.5 * (0.25 * content[key][0] + 0.75 * q_now)), atol=1e-6)
    assert k is style[key][0] and v is style[key][1]


def request(engine, n: int = 2) -> GenerateRequest:
    shape = engine.latent_shape(RES)
    return GenerateRequest(
        prompts=["an image of cat in style_00", "an image of boat in style_00"][:n],
        noise=np.stack([gaussian(stream(4, SAMPLE, k), shape) for k in range(n)]), steps=3, guidance_scale=7.5,
        init_image=image(5), init_posterior_noise=np.stack([gaussian(stream(4, SAMPLE, k, 1), shape)
                                                              for k in range(n)]), strength=0.7)


@pytest.fixture(scope="module")
def speed_path_engines(tiny_model_dir) -> tuple[TorchEngine, JittorEngine]:
    """The engines on their speed paths' code: torch's static-buffer sampling calls (engine.compile=cuda-graphs
    without recording), Jittor's replayed sampling calls (engine.compile=replay)."""
    torch_engine = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
    torch_engine.use_static_calls(False)
    return torch_engine, JittorEngine(tiny_model_dir, JittorOptions(device="cpu", compile="replay"))


def test_the_two_engines_stylise_alike(torch_engine, speed_path_engines):
    settings = InjectSettings(gamma=0.5, temperature=1.5, adain_init=True, inversion_steps=4)
    images = {}
    for engine in speed_path_engines:
        images[engine.name] = engine_images = StyleID(engine, settings, image(3)).generate(request(engine))
        assert len(engine_images) == 2 and engine_images[0].shape == (RES, RES, 3)
    plain = torch_engine.generate(request(torch_engine))
    eager = StyleID(torch_engine, settings, image(3)).generate(request(torch_engine))
    for got, want, before, same in zip(images["jittor"], images["torch"], plain, eager):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
        assert np.abs(want.astype(int) - same.astype(int)).max() <= 1  # the static calls change nothing
        assert np.abs(want.astype(int) - before.astype(int)).mean() > 1  # injection changed the image


def test_jittor_fast_s_precision_stylises_like_float32(tiny_model_dir, speed_path_engines, monkeypatch):
    """engine=jittor_fast's settings bar the device (fp16, replay): the injected q, k, v stay float16."""
    fp16 = JittorEngine(tiny_model_dir, JittorOptions(device="cpu", mixed_precision="fp16", compile="replay"))
    settings = InjectSettings(gamma=0.5, temperature=1.5, adain_init=True, inversion_steps=4)
    dtypes = set()
    attend = jittor_blocks.attention
    monkeypatch.setattr(jittor_unet, "attention", lambda q, k, v, **kw: (dtypes.add((str(q.dtype), str(k.dtype))),
                                                                          attend(q, k, v, **kw))[1])
    half = StyleID(fp16, settings, image(3)).generate(request(fp16))
    monkeypatch.undo()
    assert dtypes == {("float16", "float16")}, dtypes
    full = StyleID(speed_path_engines[1], settings, image(3)).generate(request(speed_path_engines[1]))
    for got, want in zip(half, full):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 2


def test_the_hook_is_removed_and_the_recorded_calls_resume(speed_path_engines):
    for engine in speed_path_engines:
        before = engine.generate(request(engine, 1))
        StyleID(engine, InjectSettings(inversion_steps=2), image(3)).generate(request(engine, 1))
        assert not engine.hooked
        np.testing.assert_array_equal(engine.generate(request(engine, 1))[0], before[0])
    torch_engine, jittor_engine = speed_path_engines
    assert all(type(m.processor).__name__ != "HookedSelfAttention" for _, _, m in torch_engine._self_attentions())
    assert all(m.hook is None for _, _, m in jittor_engine._self_attentions())


# -- the config group and the pipeline ------------------------------------------------------------------------

def test_bad_inject_settings_are_refused_by_name(jdiff_root):
    for override, words in (("inject.gamma=1.5", "inject.gamma"), ("inject.temperature=0", "inject.temperature"),
                            ("inject.inversion_steps=0", "inject.inversion_steps"),
                            ("inject.style_image=first", "inject.style_image"), ("inject.layers=[]", "inject.layers")):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            validate_config(compose_config(QUICK + ["inject=styleid", override], jdiff_root))
    with pytest.raises(ConfigError, match="engine.compile"):
        validate_config(compose_config(QUICK + ["inject=styleid", "engine=torch", "engine.compile=reduce-overhead"],
                                       jdiff_root))
    validate_config(compose_config(QUICK + ["inject=styleid", "inject.gamma=0.3", "inject.style_image=1"], jdiff_root))
    validate_config(compose_config(QUICK + ["inject.gamma=7"], jdiff_root))  # inject=none: its keys are unused


def test_a_run_with_inject_styleid_writes_stylised_images(jdiff_root, tmp_path):
    from jdiff.pipeline import run

    base = QUICK + ["engine=torch", "prior=off", "stages=[train,generate]", "data.resolution=32", "train.steps=2"]
    out = {}
    for name, extra in (("plain", []), ("styleid", ["inject=styleid", "inject.inversion_steps=3",
                                                    "inject.style_image=0"])):
        out[name] = tmp_path / name
        run(compose_config(base + extra, jdiff_root), out[name])
    plain, styled = (sorted((out[n] / "images").glob("*.png")) for n in ("plain", "styleid"))
    assert [p.name for p in plain] == [p.name for p in styled] and plain
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(plain, styled))
    assert "name: styleid" in (out["styleid"] / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"inject\.style_image=99 .* reference images"):
        run(compose_config(base + ["inject=styleid", "inject.style_image=99"], jdiff_root), tmp_path / "bad")
