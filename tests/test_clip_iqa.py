"""CLIP-IQA with the checker's model: OpenAI's CLIP RN50 as torchmetrics' default ``clip_iqa`` loads it
through piq. jdiff's towers and scores are checked against piq's and torchmetrics' outputs on the tiny
random-weight TorchScript archive, stored in tests/oracles/clip_iqa_reference.json by
tests/oracles/make_clip_iqa_reference.py (which needs piq; the test does not)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jdiff.config import ScoreConfig
from jdiff.scoring import final_score
from jdiff.scoring.clip import QUALITY_PROMPTS
from jdiff.scoring.clip_resnet import RN50_SHAPE, ClipResNet, ClipResNetEmbedder, ClipResNetShape, load_clip_resnet
from jdiff.scoring.models import MetricUnavailable
from jdiff.scoring.scorer import Scorer, StyleImages
from conftest import settings_for
from oracles import make_clip_iqa_reference as oracle
from oracles.make_clip_iqa_reference import images_of, token_rows

CPU = torch.device("cpu")
REFERENCE = json.loads(oracle.REFERENCE.read_text())


@pytest.fixture(scope="module")
def model(tiny_metrics):
    """jdiff's model of the tiny archive, once the stored reference is known to be for it and for these inputs."""
    made_for = oracle.input_fingerprints(tiny_metrics)
    assert made_for == REFERENCE["fingerprints"], (
        "the tiny CLIP archive or the test inputs changed since clip_iqa_reference.json was made: "
        "pip install --no-deps piq==0.8.0 && python tests/oracles/make_clip_iqa_reference.py")
    return load_clip_resnet("clip_iqa", tiny_metrics / "clip_rn50.pt")


def assert_close_to_reference(got: torch.Tensor, expected: list) -> None:
    expected = torch.tensor(expected, dtype=got.dtype)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# -- the towers ----------------------------------------------------------------------------------------------

def test_the_rn50_layout_matches_piqs_name_by_name_and_shape_by_shape():
    with torch.device("meta"):  # shapes only: nothing allocated
        ours = {k: list(v.shape) for k, v in ClipResNet(RN50_SHAPE).state_dict().items()}
        theirs = {k: torch.empty(shape) for k, shape in REFERENCE["rn50_layout"].items()}
    assert ours == REFERENCE["rn50_layout"]
    assert ClipResNetShape.from_state_dict(theirs) == RN50_SHAPE


def test_image_tower_matches_piq_with_and_without_the_positional_embedding(model):
    pixels = oracle.tower_inputs()
    assert [(case["input"], case["pos_embedding"]) for case in REFERENCE["image_tower"]] == list(oracle.TOWER_CASES)
    with torch.no_grad():
        for case in REFERENCE["image_tower"]:
            got = model.encode_image(pixels[case["input"]], pos_embedding=case["pos_embedding"])
            assert got.shape == (len(pixels[case["input"]]), 16)
            assert_close_to_reference(got, case["expected"])
        # the positional embedding changes the result, so both paths were really exercised
        native = pixels["native"]
        assert not torch.allclose(model.encode_image(native, True), model.encode_image(native, False))
        with pytest.raises(ValueError, match="pos_embedding=False"):
            model.encode_image(pixels["other"], pos_embedding=True)


def test_text_tower_matches_piq(model, tiny_metrics):
    assert REFERENCE["text_tower"]["texts"] == list(oracle.TEXTS) and oracle.TEXTS[:2] == QUALITY_PROMPTS
    with torch.no_grad():
        got = model.encode_text(token_rows(tiny_metrics / "clip", oracle.TEXTS))
    assert_close_to_reference(got, REFERENCE["text_tower"]["expected"])
    assert not torch.allclose(got[0], got[1])


# -- the metric ----------------------------------------------------------------------------------------------

def clip_iqa_settings(folder, **changes) -> ScoreConfig:
    return settings_for(folder, **{"batch_size": 2, "metrics": ["clip_iqa"], **changes})


def test_clip_iqa_equals_torchmetrics_on_piqs_model(tiny_metrics, model):
    from torchmetrics.functional.multimodal.clip_iqa import (
        _clip_iqa_compute, _clip_iqa_format_prompts, _clip_iqa_get_anchor_vectors, _clip_iqa_update)
    from transformers import CLIPProcessor

    expected = REFERENCE["clip_iqa"]
    assert tuple(expected["prompts"]) == QUALITY_PROMPTS
    inputs = oracle.style_images()
    styles = [StyleImages(sid, [(f"o{i}", im) for i, im in enumerate(generated)], references)
              for sid, (generated, references) in inputs.items()]
    result = Scorer(clip_iqa_settings(tiny_metrics)).score(styles)  # batch size 2: batches split the sizes

    # torchmetrics' functions today, on jdiff's model: image by image, as the stored values were made on piq's
    prompts, names = _clip_iqa_format_prompts(("quality",))
    assert tuple(prompts) == QUALITY_PROMPTS
    processor = CLIPProcessor.from_pretrained(tiny_metrics / "clip")
    with torch.no_grad():
        anchors = _clip_iqa_get_anchor_vectors("clip_iqa", model, processor, prompts, "cpu")
    assert set(result.per_style) == set(expected["styles"]) == set(inputs)
    for style in styles:
        stored = expected["styles"][style.style_id]
        probs = []
        for _, image in style.generated:  # a 0-255 tensor with data_range=255, one image at a time
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            with torch.no_grad():
                features = _clip_iqa_update("clip_iqa", pixels, model, processor, 255.0, "cpu")
            probs.append(_clip_iqa_compute(features, anchors, names).item())
        assert probs == pytest.approx(stored["probs"], abs=5e-6)
        # torchmetrics takes the softmax in float32, jdiff in float64: they differ by about 1e-6
        assert result.per_style[style.style_id]["clip_iqa"] == pytest.approx(stored["mean"], abs=5e-6)
        assert np.ptp(stored["probs"]) > 1e-4  # the images score differently: a mix-up of their order would show
    assert result.metrics["clip_iqa"] == pytest.approx(expected["mean"], abs=5e-6)


def test_state_dict_files_load_like_the_archive(tiny_metrics, tmp_path):
    from safetensors.torch import save_file

    state = dict(torch.jit.load(str(tiny_metrics / "clip_rn50.pt"), map_location="cpu").state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "rn50.safetensors")
    torch.save(state, tmp_path / "rn50_state.pt")
    images = images_of(5, [(40, 40), (48, 36)])
    embed = {}
    for path in (tiny_metrics / "clip_rn50.pt", tmp_path / "rn50.safetensors", tmp_path / "rn50_state.pt"):
        embedder = ClipResNetEmbedder("clip_iqa", path, tiny_metrics / "clip", CPU, 4)
        embed[path.name] = (embedder.images(images), embedder.texts(QUALITY_PROMPTS))
    for name in ("rn50.safetensors", "rn50_state.pt"):
        for ours, reference in zip(embed[name], embed["clip_rn50.pt"]):
            np.testing.assert_array_equal(ours, reference)


def test_weights_of_another_layout_are_refused_with_the_reason(tiny_metrics, tmp_path):
    state = dict(torch.jit.load(str(tiny_metrics / "clip_rn50.pt"), map_location="cpu").state_dict())
    torch.save({k: v for k, v in state.items() if k != "visual.attnpool.c_proj.bias"}, tmp_path / "partial.pt")
    with pytest.raises(MetricUnavailable, match="visual.attnpool.c_proj.bias"):
        load_clip_resnet("clip_iqa", tmp_path / "partial.pt")
    torch.save({**state, "visual.proj": torch.zeros(4, 4)}, tmp_path / "vit.pt")
    with pytest.raises(MetricUnavailable, match="holds a CLIP ViT"):
        load_clip_resnet("clip_iqa", tmp_path / "vit.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = Scorer(clip_iqa_settings(tiny_metrics, clip_iqa_model=str(tmp_path / "junk.pt"))).score(
        [StyleImages("00", [("o", images_of(6, [(40, 40)])[0])], images_of(7, [(40, 40)]))])
    assert "clip_iqa" not in result.metrics and "cannot read" in result.skipped["clip_iqa"]


def test_missing_rn50_offline_says_where_to_put_it_and_the_rest_is_scored(tiny_metrics, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = clip_iqa_settings(tiny_metrics, clip_iqa_model="RN50.pt", metrics=["hist", "lpips", "clip_iqa", "clip_r"])
    styles = [StyleImages("00", [(o, im) for o, im in zip(["Dolphin", "Lion"], images_of(8, [(40, 40)] * 2))],
                          images_of(9, [(40, 40)] * 2))]
    result = Scorer(settings).score(styles)
    why = result.skipped["clip_iqa"]
    assert str(tmp_path / "home" / ".cache" / "clip") in why and "RN50.pt" in why
    assert "score.clip_iqa_model=/path/to/RN50.pt" in why and "score.allow_download=true" in why
    assert set(result.metrics) == {"hist", "lpips", "clip_r"}
    final = final_score(result.metrics)
    assert final.partial and "clip_iqa" in final.missing

    # with RN50.pt in place, a tokenizer that is not in the cache is named the same way
    (tmp_path / "home" / ".cache" / "clip").mkdir(parents=True)
    (tmp_path / "home" / ".cache" / "clip" / "RN50.pt").write_bytes((tiny_metrics / "clip_rn50.pt").read_bytes())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = Scorer(clip_iqa_settings(tiny_metrics, clip_iqa_model="RN50.pt",
                                 clip_iqa_tokenizer="openai/clip-vit-base-patch16")).score(styles)
    assert "score.clip_iqa_tokenizer=openai/clip-vit-base-patch16" in result.skipped["clip_iqa"]
    assert "huggingface-cli download openai/clip-vit-base-patch16" in result.skipped["clip_iqa"]
    result = Scorer(clip_iqa_settings(tiny_metrics, clip_iqa_model="RN50.pt")).score(styles)
    assert result.skipped == {} and 0 < result.metrics["clip_iqa"] < 1
