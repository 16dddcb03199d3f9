"""The Jittor VAE, text encoder and samplers (DDIM, PNDM) against diffusers/transformers, plus weight loading and
Jittor's environment handling. CPU, float32, the same weight files for both frameworks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jdiff.engines.base import EngineError
from jdiff.engines.jittor import env
from jdiff.engines.jittor.env import import_jittor

jt = import_jittor("cpu")

from jdiff.engines.jittor.blocks import GroupNorm, LayerNorm, ResnetBlock2D, nearest  # noqa: E402
from jdiff.samplers import img2img_skip, make_sampler  # noqa: E402
from jdiff.engines.jittor.text_encoder import CLIPTextModel  # noqa: E402
from jdiff.engines.jittor.vae import AutoencoderKL  # noqa: E402
from jdiff.engines.jittor.weights import load_weights  # noqa: E402
from jdiff.tiny_model import SCHEDULER_CONFIG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # max abs difference between the engines' outputs

# SD 2.1's VAE config (4 levels, 2 ResNets per level, attention in the mid block, its scaling factor) at a
# reduced width.
SD21_VAE_REDUCED = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 32, 32],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)


def saved(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, jt.Var) else x


@pytest.fixture(scope="module")
def sd21_vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL as Reference

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return saved(Reference(**SD21_VAE_REDUCED), tmp_path_factory.mktemp("sd21_vae"))


@pytest.fixture(scope="module")
def sd15_text_encoder_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny text encoder's shape with SD 1.x's quick_gelu activation and fresh random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel as Reference

    config = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    config["hidden_act"] = "quick_gelu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return saved(Reference(CLIPTextConfig(**config)), tmp_path_factory.mktemp("sd15_text"))


def max_diff(ours: jt.Var, theirs: torch.Tensor) -> float:
    return float(np.abs(ours.numpy() - theirs.detach().numpy()).max())


# -- VAE and text encoder against the references ---------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "sd21_reduced"])
def test_vae_encode_and_decode_match_diffusers(which, tiny_model_dir, request):
    from diffusers import AutoencoderKL as Reference

    folder = tiny_model_dir / "vae" if which == "tiny" else request.getfixturevalue("sd21_vae_dir")
    ours, reference = AutoencoderKL.from_pretrained(folder), Reference.from_pretrained(folder).eval()
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)  # not square: catches swapped axes
    latents = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
    with jt.no_grad(), torch.no_grad():
        mean, std = ours.encode(jt.array(pixels))
        posterior = reference.encode(torch.from_numpy(pixels)).latent_dist
        decoded, reference_decoded = ours.decode(jt.array(latents)), reference.decode(torch.from_numpy(latents)).sample
    assert max_diff(mean, posterior.mean) <= TOLERANCE
    assert max_diff(std, posterior.std) <= TOLERANCE
    assert max_diff(decoded, reference_decoded) <= TOLERANCE
    assert decoded.shape == (2, 3, 32, 48)
    assert ours.scaling_factor == reference.config.scaling_factor
    assert (ours.latent_channels, ours.downsampling_factor) == (4, 8)


@pytest.mark.parametrize("variant", ["sd2_gelu", "sd1_quick_gelu"])
def test_text_encoder_matches_transformers(variant, tiny_model_dir, request):
    from transformers import CLIPTextModel as Reference

    if variant == "sd2_gelu":
        folder = tiny_model_dir / "text_encoder"
    else:
        folder = request.getfixturevalue("sd15_text_encoder_dir")
    ours, reference = CLIPTextModel.from_pretrained(folder), Reference.from_pretrained(folder).eval()
    assert ours.config["hidden_act"] == variant.split("_", 1)[1]
    rng = np.random.default_rng(1)
    for length in (77, 12):  # the padded length SD uses, and a short one
        ids = rng.integers(0, ours.config["vocab_size"], (2, length))
        with jt.no_grad(), torch.no_grad():
            states = ours(jt.array(ids))
            expected = reference(torch.from_numpy(ids)).last_hidden_state
        assert states.shape == (2, length, ours.config["hidden_size"])
        assert max_diff(states, expected) <= TOLERANCE


def test_norms_stay_accurate_when_the_mean_dwarfs_the_spread():
    """Jittor's own norms compute E[x^2] - E[x]^2, which loses digits when the mean is large; ours match torch."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 8, 6, 6)) + 30).astype(np.float32)  # Jittor's nn norms: 1e-3 off here
    group_norm = GroupNorm(4, 8, eps=1e-6)(jt.array(x))
    assert max_diff(group_norm, torch.nn.GroupNorm(4, 8, eps=1e-6)(torch.from_numpy(x))) <= TOLERANCE
    assert max_diff(LayerNorm(6)(jt.array(x)), torch.nn.LayerNorm(6)(torch.from_numpy(x))) <= TOLERANCE


@pytest.mark.parametrize("size, output_size", [((4, 6), (8, 12)), ((5, 3), (10, 7)), ((5, 3), (9, 6))])
def test_nearest_upsampling_picks_the_pixels_torch_picks(size, output_size):
    """2x, and the odd sizes the UNet asks for when its input is not a multiple of its downsampling."""
    x = np.random.default_rng(5).standard_normal((1, 2, *size)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=output_size, mode="nearest")
    assert np.array_equal(nearest(jt.array(x), output_size).numpy(), expected.numpy())


# -- the samplers against diffusers' DDIMScheduler and PNDMScheduler -------------------------------------


def schedulers(name: str, prediction_type: str, **extra):
    """Ours and diffusers' sampler for SD 2.1's scheduler config under the class ``name``."""
    from diffusers import DDIMScheduler, PNDMScheduler

    config = dict(SCHEDULER_CONFIG, _class_name=name, prediction_type=prediction_type, **extra)
    reference = {"DDIMScheduler": DDIMScheduler, "PNDMScheduler": PNDMScheduler}[name]
    return make_sampler(config), reference.from_config(config)


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("extra", [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"},
                                   {"set_alpha_to_one": True, "steps_offset": 0}])
def test_sampler_timesteps_match_diffusers(name, extra):
    ours, reference = schedulers(name, "epsilon", **extra)
    for steps in (1, 7, 10, 40, 50):
        reference.set_timesteps(steps)
        assert np.array_equal(ours.set_timesteps(steps), reference.timesteps.numpy())


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("strength", [1.0, 0.9, 0.35])
def test_sampler_trajectory_matches_diffusers(name, prediction_type, strength):
    """10 steps fed the same model outputs, from pure noise or (strength < 1) from a noised clean latent,
    with the torch engine's img2img rule on the diffusers side. Also run on Jittor Vars, as the engine does."""
    ours, reference = schedulers(name, prediction_type)
    rng = np.random.default_rng(3)
    noise, clean = rng.standard_normal((2, 2, 4, 8, 8), dtype=np.float32)
    outputs = rng.standard_normal((11, 2, 4, 8, 8), dtype=np.float32)
    reference.set_timesteps(10)
    expected_timesteps = reference.timesteps
    if strength < 1:
        start = 10 - min(int(10 * strength), 10)
        expected_timesteps = expected_timesteps[start:]
        sample = reference.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), expected_timesteps[:1].repeat(2))
        ours.set_timesteps(10)
        timesteps = ours.skip(img2img_skip(10, strength))
        start_latents = ours.add_noise(clean, noise, timesteps[0])
    else:
        sample = torch.from_numpy(noise) * reference.init_noise_sigma
        timesteps = ours.set_timesteps(10)
        start_latents = noise * ours.init_noise_sigma
    assert np.array_equal(timesteps, expected_timesteps.numpy())
    expected = [sample]
    for t, out in zip(expected_timesteps, outputs):
        expected.append(reference.step(torch.from_numpy(out), t, expected[-1]).prev_sample)
    for to_array in (np.asarray, jt.array):
        latents = to_array(start_latents)
        ours.set_timesteps(10)  # a fresh run: resets PNDM's history
        for i, (t, out) in enumerate(zip(timesteps, outputs)):
            assert_close_relative(as_numpy(latents), expected[i].numpy())
            latents = ours.step(to_array(out), t, ours.scale_model_input(latents, t))
        assert_close_relative(as_numpy(latents), expected[-1].numpy())


def assert_close_relative(ours: np.ndarray, theirs: np.ndarray, tolerance: float = 1e-5):
    """Float32 rounding grows with the values (an epsilon-prediction step divides by sqrt(alpha_bar))."""
    assert np.abs(ours - theirs).max() <= tolerance * max(1.0, float(np.abs(theirs).max()))


def test_sampler_refuses_what_it_does_not_implement():
    euler = dict(SCHEDULER_CONFIG, _class_name="EulerDiscreteScheduler")
    with pytest.raises(EngineError, match="EulerDiscreteScheduler.*DDIMScheduler or PNDMScheduler.*infer.sampler=ddim"):
        make_sampler(euler)
    assert type(make_sampler(euler, sampler="ddim")).__name__ == "DDIMSampler"
    with pytest.raises(EngineError, match="skip_prk_steps=false"):
        make_sampler(dict(SCHEDULER_CONFIG, _class_name="PNDMScheduler", skip_prk_steps=False))
    with pytest.raises(EngineError, match="clip_sample"):
        make_sampler({k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"})  # diffusers' default: on
    with pytest.raises(EngineError, match="prediction_type='sample'"):
        make_sampler(SCHEDULER_CONFIG, prediction_type="sample")


# -- weight loading --------------------------------------------------------------------------------------


def block_weights() -> tuple[ResnetBlock2D, dict[str, np.ndarray]]:
    block = ResnetBlock2D(4, 8, temb_channels=None, groups=2)
    rng = np.random.default_rng(4)
    return block, {name: rng.standard_normal(p.shape).astype(np.float32) for name, p in block.named_parameters()}


def test_weights_load_by_name_also_from_shards(tmp_path):
    block, weights = block_weights()
    names = sorted(weights)
    shards = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(tmp_path / file))
    index = {"weight_map": {n: file for file, part in shards.items() for n in part}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    load_weights(block, tmp_path)
    for name, param in block.named_parameters():
        assert np.array_equal(param.numpy(), weights[name]), name


@pytest.mark.parametrize("damage, message", [
    (lambda w: w.pop("conv2.bias"), r"1 missing \(conv2.bias\)"),
    (lambda w: w.update({"conv3.weight": np.zeros(3, np.float32)}), r"1 unexpected \(conv3.weight\)"),
    (lambda w: w.update({"conv1.weight": np.zeros((8, 4, 1, 1), np.float32)}),
     r"1 wrong shape \(conv1.weight: file \(8, 4, 1, 1\), model \(8, 4, 3, 3\)\)"),
])
def test_weights_that_do_not_fit_are_refused_with_the_names(tmp_path, damage, message):
    block, weights = block_weights()
    damage(weights)
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(EngineError, match=message):
        load_weights(block, tmp_path)


def test_pickle_weights_need_the_users_consent(tmp_path):
    block, weights = block_weights()
    torch.save({n: torch.from_numpy(w) for n, w in weights.items()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(EngineError, match="arbitrary code.*safetensors.*engine.allow_pickle=true"):
        load_weights(block, tmp_path)
    load_weights(block, tmp_path, allow_pickle=True)
    assert all(np.array_equal(p.numpy(), weights[n]) for n, p in block.named_parameters())


def test_other_spellings_of_the_same_names_load(tmp_path, tiny_model_dir):
    """Text-encoder weights without the ``text_model.`` prefix, and a VAE with the old attention names."""
    folders = {}
    for component, file, rename in (
        ("text_encoder", "model.safetensors", lambda n: n.removeprefix("text_model.")),
        ("vae", "diffusion_pytorch_model.safetensors",
         lambda n: n.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn.")),
    ):
        folders[component] = tmp_path / component
        folders[component].mkdir()
        shutil.copy(tiny_model_dir / component / "config.json", folders[component])
        weights = load_file(str(tiny_model_dir / component / file))
        renamed = {rename(n): w for n, w in weights.items()}
        assert set(renamed) != set(weights)
        save_file(renamed, str(folders[component] / file))
    for cls, component in ((CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae")):
        canonical = dict(cls.from_pretrained(tiny_model_dir / component).named_parameters())
        for name, param in cls.from_pretrained(folders[component]).named_parameters():
            assert np.array_equal(param.numpy(), canonical[name].numpy()), name


# -- Jittor's environment --------------------------------------------------------------------------------


def fake_nvidia_smi(folder: Path, exit_code: int, output: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {exit_code}\n")
    script.chmod(0o755)
    return folder


def test_gpu_driver_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(env, "DRIVER_GPUS", tmp_path / "no-driver")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    failing = fake_nvidia_smi(tmp_path / "failing", 9, "NVIDIA-SMI has failed: could not communicate with the driver")
    monkeypatch.setenv("PATH", f"{failing}{os.pathsep}{os.environ['PATH']}")
    assert not env.gpu_driver_present()
    listing = fake_nvidia_smi(tmp_path / "listing", 0, "GPU 0: NVIDIA H100 (UUID: GPU-0)")
    monkeypatch.setenv("PATH", f"{listing}{os.pathsep}{os.environ['PATH']}")
    assert env.gpu_driver_present()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not env.gpu_driver_present()


def test_environment_defaults_leave_the_users_settings_alone(monkeypatch, tmp_path):
    for key in (*env.NO_DOWNLOAD_SETTINGS, "nvcc_path"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("use_cutt", "1")
    monkeypatch.setattr(env, "gpu_driver_present", lambda: True)
    env.prepare_environment("auto")
    assert os.environ["use_cutt"] == "1" and os.environ["use_mkl"] == "0" and os.environ["FIX_TORCH_ERROR"] == "0"
    assert "nvcc_path" not in os.environ  # a GPU is there: Jittor finds nvcc itself
    env.prepare_environment("cpu")
    assert os.environ["nvcc_path"] == ""


def test_jittors_start_up_lines_are_off_unless_jdiff_logs_verbosely(monkeypatch):
    """log_silent=1 for the import unless jdiff's logger is at DEBUG (hydra.verbose); a user's log_silent or log_v
    stands."""
    import logging

    monkeypatch.setattr(env, "gpu_driver_present", lambda: False)
    monkeypatch.setattr(env, "_quieted", set())
    for verbose, expected in ((False, "1"), (True, None)):
        monkeypatch.setattr(os, "environ", {})
        env.prepare_environment("cpu", verbose=verbose)
        assert os.environ.get("log_silent") == expected and "log_v" not in os.environ
    for user in ({"log_silent": "0"}, {"log_v": "1"}):  # the user asked for Jittor's lines
        monkeypatch.setattr(os, "environ", dict(user))
        env.prepare_environment("cpu", verbose=False)
        assert os.environ.get("log_silent") == user.get("log_silent")
    logger, before = logging.getLogger("jdiff"), logging.getLogger("jdiff").level
    try:
        for level, expected in ((logging.INFO, "1"), (logging.DEBUG, None)):  # hydra.verbose=true or =jdiff
            logger.setLevel(level)
            monkeypatch.setattr(os, "environ", {})
            env.prepare_environment("cpu")
            assert os.environ.get("log_silent") == expected, logging.getLevelName(level)
    finally:
        logger.setLevel(before)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_jittor_imports_quietly_and_then_logs_as_usual(level):
    """A fresh process: Jittor's [i ...] start-up lines only at DEBUG; afterwards its logs are on again (its later
    warnings and errors show) and the environment holds no log_silent for child processes."""
    code = (
        f"import json, logging, os\nlogging.basicConfig(level=logging.{level})\n"
        "from jdiff.engines.jittor.env import import_jittor\njt = import_jittor('cpu')\nimport jittor_utils\n"
        "print(json.dumps([int(jt.flags.log_silent), jittor_utils.LOG.log_silent, os.environ.get('log_silent')]))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("log_silent", "log_v")}
    done = run_python(code, pythonpath=[ROOT], extra_env={}, base=clean)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 0, None]
    start_up = [line for line in (done.stdout + done.stderr).splitlines() if "[i " in line]
    assert bool(start_up) == (level == "DEBUG"), start_up
    if level == "DEBUG":
        assert any("cache_path" in line for line in start_up), start_up


def test_first_compile_is_announced_only_when_jittors_core_is_not_built(monkeypatch, tmp_path):
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "jittor_utils", SimpleNamespace(cache_path=str(tmp_path)))
    assert env.first_compile_ahead()
    (tmp_path / "jittor_core.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert not env.first_compile_ahead()


def test_cudnn_workspace_cap_is_a_fraction_of_the_card_never_above_jittors_quarter(monkeypatch):
    """JDIFF_CUDNN_WORKSPACE_GIB reaches Jittor as its ratio of the card; unset, the cap is 2 GiB (Jittor's own
    quarter of the card held 43.7 GiB of an H200); a bad value is refused by name; without cuDNN nothing is set."""
    from types import SimpleNamespace

    ratios = []
    card = SimpleNamespace(get_mem_info=lambda: SimpleNamespace(total_cuda_ram=80 * 2**30),
                           cudnn=SimpleNamespace(set_max_workspace_ratio=ratios.append))
    monkeypatch.delenv("JDIFF_CUDNN_WORKSPACE_GIB", raising=False)
    assert env.limit_cudnn_workspace(card) == 2 and ratios == [2 / 80]
    monkeypatch.setenv("JDIFF_CUDNN_WORKSPACE_GIB", "0.5")
    assert env.limit_cudnn_workspace(card) == 0.5 and ratios[-1] == 0.5 / 80
    monkeypatch.setenv("JDIFF_CUDNN_WORKSPACE_GIB", "1000")
    assert env.limit_cudnn_workspace(card) == 20 and ratios[-1] == 0.25
    for bad in ("lots", "0", "-2"):
        monkeypatch.setenv("JDIFF_CUDNN_WORKSPACE_GIB", bad)
        with pytest.raises(EngineError, match="JDIFF_CUDNN_WORKSPACE_GIB.*GiB"):
            env.limit_cudnn_workspace(card)
    monkeypatch.setenv("JDIFF_CUDNN_WORKSPACE_GIB", "4")
    assert env.limit_cudnn_workspace(SimpleNamespace(get_mem_info=card.get_mem_info, cudnn=None)) is None
    assert len(ratios) == 3


def run_python(code: str, *, pythonpath: list[Path], extra_env: dict[str, str],
               base: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = os.environ if base is None else base
    clean = {k: v for k, v in base.items() if k not in (*env.NO_DOWNLOAD_SETTINGS, "nvcc_path")}
    clean.update(extra_env, PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, timeout=600)


def test_machine_with_nvcc_but_no_driver_imports_jittor_on_the_cpu(tmp_path):
    fake_bin = fake_nvidia_smi(tmp_path / "bin", 9, "NVIDIA-SMI has failed: could not communicate with the driver")
    code = (
        "import json, os, pathlib\n"
        "from jdiff.engines.jittor import env\n"
        f"env.DRIVER_GPUS = pathlib.Path({str(tmp_path / 'no-driver')!r})\n"
        "jt = env.import_jittor()\n"
        "print(json.dumps({'device': env.jittor_device(jt), 'has_cuda': bool(jt.has_cuda),\n"
        "                  'nvcc_path': os.environ['nvcc_path'], 'use_nccl': os.environ['use_nccl']}))\n"
    )
    done = run_python(code, pythonpath=[ROOT], extra_env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"device": "cpu", "has_cuda": False, "nvcc_path": "", "use_nccl": "0"}


@pytest.mark.parametrize("failure, message", [
    ("ImportError('simulated: no module')", "Jittor is not installed.*pip install jittor"),
    ("RuntimeError('simulated: g++ failed')",
     "Jittor failed to compile.*simulated: g\\+\\+ failed.*delete it to retry"),
])
def test_clear_message_when_jittor_is_missing_or_broken(tmp_path, failure, message):
    shadow = tmp_path / "shadow" / "jittor"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise {failure}\n")
    code = "from jdiff.engines.jittor.env import import_jittor\nimport_jittor('cpu')\n"
    done = run_python(code, pythonpath=[shadow.parent, ROOT], extra_env={})
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("jdiff.engines.base.EngineError"), done.stderr[-2000:]
    assert re.search(message, last_line), last_line


def test_numpy_2_is_refused_before_jittor_loads(monkeypatch):
    import numpy

    monkeypatch.setattr(numpy, "__version__", "2.1.0")
    monkeypatch.delitem(sys.modules, "jittor")  # as in a fresh process; monkeypatch puts it back
    with pytest.raises(EngineError, match="numpy 2.1.0.*numpy < 2"):
        import_jittor("cpu")


def test_device_names_jittor_cannot_honour_are_refused():
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES"):
        import_jittor("cuda:1")
    if not jt.has_cuda:
        with pytest.raises(EngineError, match="no CUDA here.*engine.device=cpu"):
            env.use_device(jt, "cuda")
    env.use_device(jt, "cpu")
    assert env.jittor_device(jt) == "cpu"


def test_importing_jittor_leaves_the_process_signals_and_children_alone():
    # Jittor's own handlers would exit at once, silently: on a child killed by a signal (SIGCHLD), and on
    # Ctrl-C (SIGINT, skipping clean-up); its import also leaves a pool of forked compile workers behind.
    code = (
        "import os, signal, subprocess, time\n"
        "from jdiff.engines.jittor.env import import_jittor\n"
        "import_jittor('cpu')\n"
        "children = open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split()\n"
        "victim = subprocess.Popen(['sleep', '60'])\n"
        "victim.kill(); victim.wait(); time.sleep(0.2)\n"
        "print('survived a killed child; children after import:', len(children), flush=True)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt', flush=True)\n"
    )
    done = run_python(code, pythonpath=[ROOT], extra_env={})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["survived a killed child; children after import: 0", "KeyboardInterrupt"]


# -- CUDA 13 / cuDNN 9: the patch command ---------------------------------------------------------------


def fake_cuda13_machine(tmp_path: Path):
    """A copy of the installed Jittor's files the patch touches, a CUDA folder and a pip-style cuDNN 9."""
    from jdiff.engines.jittor.fast import cuda13

    real = cuda13.jittor_package()
    package = tmp_path / "jittor"
    for relative in {e.path for e in cuda13.EDITS} | set(cuda13.RNN_SOURCES):
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real / relative, package / relative)
    cuda = tmp_path / "cuda"
    (cuda / "include").mkdir(parents=True)
    (cuda / "lib64").mkdir()
    (cuda / "include" / "cudnn_version.h").write_text("// the toolkit's own, not ours to touch\n")
    cudnn = tmp_path / "site" / "nvidia" / "cudnn"
    (cudnn / "include").mkdir(parents=True)
    (cudnn / "lib").mkdir()
    for header in ("cudnn.h", "cudnn_version.h", "cudnn_cnn.h"):
        (cudnn / "include" / header).write_text(f"// {header}\n")
    for library in ("libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9"):
        (cudnn / "lib" / library).write_bytes(b"\x7fELF")
    return package, cuda, cudnn


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cuda13_patch_applies_once_and_reverts_to_the_same_bytes(tmp_path):
    from jdiff.engines.jittor.fast import cuda13

    package, cuda, cudnn = fake_cuda13_machine(tmp_path)
    before = snapshot(package)
    changed = cuda13.apply(package, cuda, cudnn, say=lambda line: None)
    assert len(changed) == len(cuda13.EDITS) + len(cuda13.RNN_SOURCES) + 2 + len(cuda13.CUDNN_LIBRARIES)
    header = (package / "extern/cuda/inc/helper_cuda.h").read_text()
    assert "deviceProp.computeMode" not in header and "deviceProp.clockRate" not in header
    assert "-std=c++17 -fPIC" in (package / "compiler.py").read_text()
    assert "cub::Max" not in (package / "other/code_softmax.py").read_text()
    assert "cub::LaneId" not in (package / "depthwise_conv.py").read_text()
    where = (package / "extern/cuda/cub/ops/cub_where_op.cc").read_text()
    assert "cub::CountingInputIterator" not in where and where.count("thrust/iterator/counting_iterator.h") == 1
    assert not any((package / relative).exists() for relative in cuda13.RNN_SOURCES)
    assert os.readlink(cuda / "include" / "cudnn.h") == str(cudnn / "include" / "cudnn.h")
    assert os.readlink(cuda / "lib64" / "libcudnn_cnn_train.so") == str(cudnn / "lib" / "libcudnn_cnn.so.9")
    assert not (cuda / "include" / "cudnn_version.h").is_symlink()  # what was there stays

    patched = snapshot(package)
    assert cuda13.apply(package, cuda, cudnn, say=lambda line: None) == []  # idempotent
    assert snapshot(package) == patched

    cuda13.revert(package)
    assert snapshot(package) == before
    assert sorted(p.name for p in (cuda / "include").iterdir()) == ["cudnn_version.h"]
    assert list((cuda / "lib64").iterdir()) == []


def test_jittor_on_unpatched_cuda13_says_which_command_fixes_it(tmp_path):
    fake_bin = fake_nvidia_smi(tmp_path / "bin", 0, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)")
    nvcc = fake_bin / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    code = "from jdiff.engines.jittor.env import import_jittor\nimport_jittor()\n"
    done = run_python(code, pythonpath=[ROOT], extra_env={"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert "CUDA 13.0" in last_line and "python -m jdiff.engines.jittor.fast.cuda13 apply" in last_line, last_line


def test_cuda13_need_is_read_from_the_sources(tmp_path, monkeypatch):
    from jdiff.engines.jittor.fast import cuda13

    package, cuda, cudnn = fake_cuda13_machine(tmp_path)
    monkeypatch.setattr(cuda13, "cuda_version", lambda home: (13, 0))
    assert cuda13.needs_patch(package) and len(cuda13.unpatched(package)) == len(cuda13.EDITS)
    cuda13.apply(package, cuda, cudnn, say=lambda line: None)
    assert not cuda13.needs_patch(package)  # patched by us, or a Jittor that no longer has that code
    monkeypatch.setattr(cuda13, "cuda_version", lambda home: (12, 4))
    cuda13.revert(package)
    assert not cuda13.needs_patch(package)  # CUDA 12 builds the original sources
