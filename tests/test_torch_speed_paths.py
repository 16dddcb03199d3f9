"""The torch engine's static-buffer path (what engine.compile=cuda-graphs records) and the queued training loop.

CUDA graphs cannot be recorded without a GPU; here the same code runs eagerly on the static buffers, which
must give exactly the plain path's numbers. The GPU check of the recorded graphs is
``python -m jdiff.bench --sections check --variants torch,torch-cudagraphs,torch-bf16-cudagraphs``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QUICK, compose_config
from jdiff.data import load_style
from jdiff.demo_data import write_demo_styles
from jdiff.engines.base import EngineError, GenerateRequest, LoraSpec, OptimizerSettings, TrainBatch
from jdiff.engines.options import TorchOptions
from jdiff.engines.torch.engine import TorchEngine
from jdiff.engines.torch.graphs import CapturedCall, CapturedCalls
from jdiff.schedule import NoiseSchedule
from jdiff.train import train_lora

SETTINGS = OptimizerSettings(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0,
                             text_encoder_lr_ratio=0.5)


def batches(model_dir: Path, count: int) -> list[TrainBatch]:
    rng = np.random.default_rng(3)
    schedule = NoiseSchedule.from_model(model_dir)
    out = []
    for _ in range(count):
        t = rng.integers(0, 1000, size=2)
        signal, noise_level = schedule.coefficients(t)
        out.append(TrainBatch(
            pixels=rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32), prompts=["a style image", "a cat"],
            weights=np.array([1.0, 0.5], np.float32), timesteps=t, signal=signal, noise_level=noise_level,
            noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
            posterior_noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32)))
    return out


def trained(model_dir: Path, static: bool, text_encoder: bool):
    engine = TorchEngine(model_dir, TorchOptions(device="cpu"))
    if static:
        engine.use_static_calls(capture=False)
    engine.add_lora(LoraSpec(unet_rank=4, unet_alpha=4.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                             text_encoder_rank=2 if text_encoder else 0, text_encoder_alpha=2.0,
                             text_encoder_targets=("q_proj", "v_proj"), seed=1))
    engine.setup_training(SETTINGS)
    losses = [engine.train_step(batch, lr) for batch, lr in zip(batches(model_dir, 4), (1e-3, 1e-3, 5e-4, 2e-4))]
    return engine, np.stack(losses)


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet-lora", "unet-and-text-encoder-lora"])
def test_static_buffer_steps_train_exactly_like_plain_steps(tiny_model_dir, tmp_path, text_encoder):
    plain, plain_losses = trained(tiny_model_dir, static=False, text_encoder=text_encoder)
    static, static_losses = trained(tiny_model_dir, static=True, text_encoder=text_encoder)
    assert static._train_call is not None and static._train_call.calls == 4  # the steps went through it
    np.testing.assert_array_equal(static_losses, plain_losses)
    assert not np.allclose(plain_losses[0], plain_losses[-1])  # the adapters moved between steps
    plain.save_lora(tmp_path / "plain.safetensors")
    static.save_lora(tmp_path / "static.safetensors")
    from safetensors.numpy import load_file

    want, got = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "static.safetensors")
    assert sorted(got) == sorted(want) and any("text_encoder" in k for k in got) == text_encoder
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_static_buffer_sampling_matches_plain_sampling(tiny_model_dir):
    rng = np.random.default_rng(5)
    request = GenerateRequest(prompts=["a dog", "a boat"], noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                              steps=4, guidance_scale=5.0, init_image=rng.uniform(-1, 1, (3, 64, 64)).astype(np.float32),
                              init_posterior_noise=rng.standard_normal((2, 4, 8, 8)).astype(np.float32), strength=0.8)
    images = {}
    for static in (False, True):
        engine, _ = trained(tiny_model_dir, static=static, text_encoder=False)
        images[static] = [engine.generate(request), engine.generate(request)]
        if static:
            assert engine._train_call is None  # the recorded step's buffers went back before sampling
            (call,) = engine._unet_calls.calls.values()  # one input signature: both requests share it
            assert call.calls == 2 * 3  # 3 of the 4 steps at strength 0.8, twice
    for plain, static in zip(images[False], images[True]):
        for a, b in zip(plain, static):
            np.testing.assert_array_equal(a, b)


def test_a_captured_call_copies_inputs_and_refuses_a_new_shape():
    seen = []

    def double(x):
        seen.append(x)
        return (x * 2,)

    call = CapturedCall(double, capture=False)
    (out,) = call(torch.ones(3))
    (out,) = call(torch.full((3,), 4.0))
    assert torch.equal(out, torch.full((3,), 8.0)) and seen[0] is seen[1]  # the same static buffer, new values
    with pytest.raises(ValueError, match=r"\(4,\) torch.float32 input where it was recorded with \(3,\)"):
        call(torch.ones(4))
    calls = CapturedCalls(double, capture=False)
    calls(torch.ones(3))
    calls(torch.ones(4))
    calls(torch.ones(4, dtype=torch.float64))
    assert len(calls.calls) == 3


def test_cuda_graphs_need_a_gpu(tiny_model_dir, jdiff_root):
    with pytest.raises(EngineError, match="engine.compile=cuda-graphs records CUDA graphs and needs a CUDA GPU"):
        TorchEngine(tiny_model_dir, TorchOptions(device="cpu", compile="cuda-graphs"))
    from jdiff.validate import ConfigError, validate_config

    cfg = compose_config(QUICK + ["engine=torch", "engine.device=cpu", "engine.compile=cuda-graphs"], jdiff_root)
    with pytest.raises(ConfigError, match="engine.compile.*CUDA graphs need a GPU"):
        validate_config(cfg)


class QueueWatcher:
    """An engine wrapper that logs when each step is queued and when its losses are read."""

    def __init__(self, engine):
        self.engine, self.events = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def start_train_step(self, batch, lr):
        step = sum(1 for e in self.events if e[0] == "queued")
        self.events.append(("queued", step))
        losses = self.engine.start_train_step(batch, lr)
        return lambda: self.events.append(("read", step)) or losses()


def test_the_loop_queues_the_next_step_before_reading_losses(tiny_model_dir, jdiff_root, tmp_path):
    cfg = compose_config(QUICK + ["engine=torch", "engine.device=cpu", "prior=off", "train.steps=3"], jdiff_root)
    write_demo_styles(Path(cfg.data.root))
    style = load_style(Path(cfg.data.root), "00")
    schedule = NoiseSchedule.from_model(tiny_model_dir)
    rows = {}
    for name, static in (("plain", False), ("static", True)):
        engine = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
        if static:
            engine.use_static_calls(capture=False)
        engine.add_lora(LoraSpec(unet_rank=4, unet_alpha=4.0, unet_targets=("to_q", "to_v"), seed=2))
        watched = QueueWatcher(engine)
        rows[name] = train_lora(watched, cfg, style, [], [], schedule, tmp_path / f"{name}.csv")
        assert watched.events == [("queued", 0), ("queued", 1), ("read", 0), ("queued", 2), ("read", 1), ("read", 2)]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(rows["static"]) == strip(rows["plain"]) and [r["step"] for r in rows["plain"]] == [1, 2, 3]
    logged = (tmp_path / "plain.csv").read_text().splitlines()
    assert len(logged) == 4 and logged[0].startswith("step,lr,loss")


def test_half_precision_adapters_keep_fp32_weights_but_compute_in_half(tiny_model_dir):
    engine = TorchEngine(tiny_model_dir, TorchOptions(device="cpu", mixed_precision="bf16"))
    engine.add_lora(LoraSpec(unet_rank=4, unet_alpha=8.0, unet_targets=("to_q", "to_v"), seed=4))
    engine.setup_training(SETTINGS)
    name, layer = next(iter(engine._lora_layers("unet").items()))
    down, up = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        up.weight.normal_(0, 0.1)
    seen = []
    down.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randn(2, 5, down.in_features).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x).float() + 2.0 * (x.float() @ down.weight.T @ up.weight.T)
    assert seen == [torch.bfloat16] and got.dtype == torch.bfloat16  # no fp32 copy of the activations
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    engine.train_step(batches(tiny_model_dir, 1)[0], 1e-3)
    assert all(p.dtype == torch.float32 for p in engine.trainable)  # the master weights stay fp32
    ups = [layer.lora_B["default"].weight for layer in engine._lora_layers("unet").values()]
    assert all(bool(b.abs().sum() > 0) for b in ups[1:])  # B started at 0: gradients reached every adapter


def test_a_failed_recording_names_the_setting_to_change(tiny_model_dir, monkeypatch):
    """Without a GPU the recording itself cannot run; a stand-in graph fails the way an unrecordable op does."""
    import jdiff.engines.torch.graphs as graphs

    class Unrecordable:
        def __init__(self, graph):
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(graphs.torch.cuda, "graph", Unrecordable)
    engine = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
    engine.use_static_calls(capture=True)
    engine.add_lora(LoraSpec(unet_rank=2, unet_alpha=2.0, unet_targets=("to_q",)))
    engine.setup_training(SETTINGS)
    engine._train_call = CapturedCall(engine._step_on_tensors, warmup=0, capture=True)
    with pytest.raises(EngineError, match=r"could not record a CUDA graph while training \(operation not permitted "
                                          r"when stream is capturing\)\. Run with engine.compile=no"):
        engine.train_step(batches(tiny_model_dir, 1)[0], 1e-3)


def test_the_fast_engine_preset_is_the_documented_setting(jdiff_root):
    preset = compose_config(QUICK + ["engine=torch_fast"], jdiff_root).engine
    spelled = compose_config(QUICK + ["engine=torch", "engine.device=cuda", "engine.mixed_precision=bf16",
                                      "engine.compile=cuda-graphs", "engine.group_norm=triton",
                                      "engine.channels_last=true"], jdiff_root).engine
    assert preset == spelled


def test_a_failed_step_keeps_the_losses_of_the_steps_before_it(tiny_model_dir, jdiff_root, tmp_path):
    cfg = compose_config(QUICK + ["engine=torch", "engine.device=cpu", "prior=off", "train.steps=5"], jdiff_root)
    write_demo_styles(Path(cfg.data.root))
    engine = TorchEngine(tiny_model_dir, TorchOptions(device="cpu"))
    engine.add_lora(LoraSpec(unet_rank=2, unet_alpha=2.0, unet_targets=("to_q",)))
    watched = QueueWatcher(engine)
    start = watched.start_train_step

    def fail_at_step_3(batch, lr):
        if sum(1 for e in watched.events if e[0] == "queued") == 3:
            raise EngineError("out of GPU memory while training (simulated)")
        return start(batch, lr)

    watched.start_train_step = fail_at_step_3
    with pytest.raises(EngineError, match="simulated"):
        train_lora(watched, cfg, load_style(Path(cfg.data.root), "00"), [], [], NoiseSchedule.from_model(tiny_model_dir),
                   tmp_path / "loss.csv")
    logged = (tmp_path / "loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in logged] == ["step", "1", "2", "3"]  # step 3 was queued before the failure


def test_a_recording_error_reports_the_op_that_failed_not_the_aftermath():
    from jdiff.engines.torch.graphs import first_cause

    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\ndetail")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as err:
        assert first_cause(err) == "CUDA error: operation not permitted when stream is capturing"


def test_running_out_of_memory_while_recording_stays_an_out_of_memory_error(monkeypatch):
    import jdiff.engines.torch.graphs as graphs

    class OutOfMemory:
        def __init__(self, graph):
            pass

        def __enter__(self):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(graphs.torch.cuda, "graph", OutOfMemory)
    call = CapturedCall(lambda x: (x,), warmup=0, capture=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the engine turns this into its out-of-memory advice
        call(torch.ones(2))
    from jdiff.engines.torch.engine import out_of_memory_hint

    with pytest.raises(EngineError, match=r"^out of GPU memory while training\. Try engine.mixed_precision=bf16, a "
                                          r"smaller train.batch_size or infer.batch_size.*Tried to allocate 2.00 GiB"):
        with out_of_memory_hint("training"):
            call(torch.ones(2))
