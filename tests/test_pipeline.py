"""End to end on model=tiny with the default engine (Jittor): every stage, every output file, reproducibility, and
LoRA files that plain diffusers loads to the same images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import QUICK, compose_config
from jdiff.contact_sheet import BAND_COLOUR
from jdiff.pipeline import COMPLETE, LORA_FILE, run

NOISE_INIT = ["init=noise"]


def run_quick(root: Path, run_dir: Path, extra: list[str] = ()) -> float:
    return run(compose_config(QUICK + list(extra), root), run_dir)


def images_of(run_dir: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((run_dir / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def full_run(jdiff_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full_run")
    run_quick(jdiff_root, run_dir, NOISE_INIT)
    return run_dir


def test_full_run_writes_every_output(full_run):
    names = {p.name for p in full_run.iterdir()}
    assert {"config.yaml", LORA_FILE, "images", "scores.json", "loss.csv", "contact_sheet.png", COMPLETE} <= names
    assert set(images_of(full_run)) == {"Apple", "Lion", "Boat"}
    for image in images_of(full_run).values():
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    rows = list(csv.DictReader(open(full_run / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) and float(r["prior_loss"]) > 0 for r in rows)
    scores = json.loads((full_run / "scores.json").read_text())
    assert -1.0 <= scores["metrics"]["hist"] <= 1.0
    assert scores["final"]["partial"] and "clip_r" in scores["final"]["missing"]
    assert json.loads((full_run / COMPLETE).read_text())["final_score"] == scores["final"]["value"]
    assert "init:\n  mode: noise" in (full_run / "config.yaml").read_text()
    sheet = Image.open(full_run / "contact_sheet.png")
    assert sheet.width >= 4 * 100 and sheet.height > 2 * 100  # 4 references and 3 images, labelled
    assert sheet.convert("RGB").getpixel((1, 1)) == BAND_COLOUR  # drawn again once scored: the score on top


def test_lora_file_is_diffusers_format(full_run):
    with safe_open(str(full_run / LORA_FILE), framework="numpy") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(".attn2.to_k.lora_A.weight" in k for k in keys)
    assert meta["unet.r"] == 8 and meta["unet.lora_alpha"] == 8


def test_same_seed_same_images_other_seed_other_images(jdiff_root, full_run, tmp_path):
    again = tmp_path / "again"
    run_quick(jdiff_root, again, NOISE_INIT)
    first, second = images_of(full_run), images_of(again)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    other = tmp_path / "other"
    run_quick(jdiff_root, other, NOISE_INIT + ["seed=7"])
    third = images_of(other)
    assert all(np.abs(first[k].astype(int) - third[k].astype(int)).mean() > 1 for k in first)


def test_generate_stage_reuses_a_saved_adapter(jdiff_root, full_run, tmp_path):
    reuse = tmp_path / "reuse"
    final = run_quick(jdiff_root, reuse, NOISE_INIT + ["stages=[generate,score]", f"lora.path={full_run}"])
    assert not (reuse / LORA_FILE).exists() and not (reuse / "loss.csv").exists()
    first, second = images_of(full_run), images_of(reuse)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert final == json.loads((full_run / "scores.json").read_text())["final"]["value"]


def test_a_replayed_run_gives_the_eager_run_s_results(jdiff_root, full_run, tmp_path, monkeypatch):
    """engine.compile=replay through the whole pipeline: the same losses, adapters and images as the eager run."""
    from jdiff.engines.jittor.fast.replay import Replay

    recorded, record = [], Replay.record
    monkeypatch.setattr(Replay, "record", lambda self, inputs: recorded.append(self.name) or record(self, inputs))
    replayed = tmp_path / "replayed"
    run_quick(jdiff_root, replayed, NOISE_INIT + ["engine.compile=replay"])
    assert {"training step", "sampling UNet call"} <= set(recorded)  # the run did replay
    losses = [[float(r["loss"]) for r in csv.DictReader(open(d / "loss.csv"))] for d in (full_run, replayed)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    with safe_open(str(full_run / LORA_FILE), framework="numpy") as eager, \
            safe_open(str(replayed / LORA_FILE), framework="numpy") as replay:
        assert set(eager.keys()) == set(replay.keys())
        for key in eager.keys():
            np.testing.assert_allclose(replay.get_tensor(key), eager.get_tensor(key), atol=1e-4, err_msg=key)
    first, second = images_of(full_run), images_of(replayed)
    assert first.keys() == second.keys()
    assert all(np.abs(first[k].astype(int) - second[k].astype(int)).max() <= 1 for k in first)


def test_plain_diffusers_pipeline_loads_the_lora_and_gives_the_same_images(jdiff_root, full_run, tiny_model_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    from jdiff.noise import SAMPLE, gaussian, stream

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(full_run), weight_name=LORA_FILE)
    objects = ["Apple", "Lion", "Boat"]
    seed = 42 + 0  # seed + style index of style 00
    latents = np.stack([gaussian(stream(seed, SAMPLE, k), (4, 8, 8)) for k in range(len(objects))])
    out = pipe(prompt=[f"an image of {o} in style_00" for o in objects], num_inference_steps=3, guidance_scale=7.5,
               latents=torch.from_numpy(latents), output_type="np", height=64, width=64).images
    ours = images_of(full_run)
    for obj, image in zip(objects, out):
        theirs = (image * 255).round().astype(np.uint8)
        assert np.abs(theirs.astype(int) - ours[obj].astype(int)).max() <= 1, obj
    # and the adapter matters: without it the images differ
    pipe.unload_lora_weights()
    base = pipe(prompt=[f"an image of {o} in style_00" for o in objects], num_inference_steps=3, guidance_scale=7.5,
                latents=torch.from_numpy(latents), output_type="np", height=64, width=64).images
    assert np.abs((base[0] * 255).round() - ours["Apple"]).mean() > 0.5


def test_alpha_other_than_rank_survives_the_round_trip(jdiff_root, tmp_path, tiny_model_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    run_dir = tmp_path / "alpha"
    run_quick(jdiff_root, run_dir, NOISE_INIT + ["lora.unet_rank=4", "lora.unet_alpha=16", "train.steps=2"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(run_dir), weight_name=LORA_FILE)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["default_0"] == pytest.approx(4.0)  # alpha / rank read from the file's metadata
    assert torch.count_nonzero(layer.lora_B["default_0"].weight) > 0


def test_text_encoder_lora_trains_and_loads(jdiff_root, tmp_path, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    run_dir = tmp_path / "te"
    run_quick(jdiff_root, run_dir, NOISE_INIT + ["lora=unet_te", "lora.text_encoder_rank=2", "train.steps=2"])
    with safe_open(str(run_dir / LORA_FILE), framework="numpy") as f:
        te_keys = [k for k in f.keys() if k.startswith("text_encoder.")]
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in te_keys
        assert all(np.any(f.get_tensor(k)) for k in te_keys if "lora_B" in k)  # it was trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(run_dir), weight_name=LORA_FILE)
    adapted = {n: m for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert len(adapted) == 2 * 4  # two layers x q, k, v, out
    q_proj = next(m for n, m in adapted.items() if n.endswith("layers.0.self_attn.q_proj"))
    with safe_open(str(run_dir / LORA_FILE), framework="numpy") as f:
        stored = f.get_tensor("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight")
    np.testing.assert_array_equal(q_proj.lora_B["default_0"].weight.detach().numpy(), stored)
