"""CLIP-IQA with the checker's model: OpenAI's CLIP RN50 as torchmetrics' default ``clip_iqa`` loads it
through piq. jdiff's own towers are checked against piq's, built from the same tiny random-weight
TorchScript archive, and jdiff's scores against torchmetrics' CLIP-IQA functions run on piq's model."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

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

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def piq_clip():
    """piq 0.8.0's ``feature_extractors/clip.py``, imported without piq's package ``__init__`` (which imports
    torchvision for metrics unrelated to CLIP)."""
    found = importlib.util.find_spec("piq")
    assert found is not None, "piq is a test dependency: pip install --no-deps piq==0.8.0 (see pyproject.toml)"
    root = Path(found.origin).parent
    saved = {name: sys.modules.pop(name, None) for name in ("piq", "piq.utils", "piq.utils.common")}
    bare = types.ModuleType("piq")
    bare.__path__ = [str(root)]
    sys.modules["piq"] = bare
    try:
        spec = importlib.util.spec_from_file_location("piq_clip_under_test", root / "feature_extractors" / "clip.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            sys.modules.pop(name, None)
            if old is not None:
                sys.modules[name] = old
    return module


def piq_load(piq_clip, path: Path):
    """piq's ``clip.load()`` on a given file instead of its download: TorchScript archive -> build_model -> float."""
    with open(path, "rb") as f:
        archive = torch.jit.load(f, map_location="cpu").eval()
    return piq_clip.build_model(archive.state_dict()).float()


@pytest.fixture(scope="module")
def models(tiny_metrics, piq_clip):
    """(jdiff's model, piq's model), both from the tiny archive."""
    archive = tiny_metrics / "clip_rn50.pt"
    return load_clip_resnet("clip_iqa", archive), piq_load(piq_clip, archive)


def images_of(seed: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] / 64
    out = []
    for h, w in shapes:  # gradients plus noise: structure, so that embeddings differ between images
        a, b = rng.uniform(-4, 4, 2)
        base = np.stack([np.sin(a * xx + b * yy + k) for k in range(3)], axis=-1)[:h, :w] * 0.5 + 0.5
        out.append(np.clip(base * 255 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return out


def token_rows(tiny_metrics, texts, length=77) -> torch.Tensor:
    """torchmetrics' anchor tokens: the CLIP tokenizer's ids zero-padded to the context length."""
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(tiny_metrics / "clip")(list(texts))["input_ids"]
    rows = torch.zeros(len(ids), length, dtype=torch.long)
    for i, row in enumerate(ids):
        rows[i, : len(row)] = torch.tensor(row)
    return rows


# -- the towers ----------------------------------------------------------------------------------------------

def test_the_rn50_layout_matches_piqs_name_by_name_and_shape_by_shape(piq_clip):
    with torch.device("meta"):  # shapes only: nothing allocated
        ours = ClipResNet(RN50_SHAPE).state_dict()
        theirs = piq_clip.CLIP(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                               vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                               transformer_heads=8, transformer_layers=12).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ClipResNetShape.from_state_dict(theirs) == RN50_SHAPE


def test_image_tower_matches_piq_with_and_without_the_positional_embedding(models):
    ours, theirs = models
    torch.manual_seed(0)
    native = torch.randn(3, 3, 64, 64)  # grid 2: the positional embedding's own size
    other = torch.randn(2, 3, 56, 88)
    with torch.no_grad():
        for pixels, pos in ((native, True), (native, False), (other, False)):
            expected = theirs.encode_image(pixels, pos_embedding=pos)
            got = ours.encode_image(pixels, pos_embedding=pos)
            assert got.shape == expected.shape == (len(pixels), 16)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        # the positional embedding changes the result, so both paths were really exercised
        assert not torch.allclose(ours.encode_image(native, True), ours.encode_image(native, False))
        with pytest.raises(ValueError, match="pos_embedding=False"):
            ours.encode_image(other, pos_embedding=True)


def test_text_tower_matches_piq(models, tiny_metrics):
    ours, theirs = models
    tokens = token_rows(tiny_metrics, [*QUALITY_PROMPTS, "a watercolor painting of a lighthouse"])
    with torch.no_grad():
        expected, got = theirs.encode_text(tokens), ours.encode_text(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(got[0], got[1])


# -- the metric ----------------------------------------------------------------------------------------------

def clip_iqa_settings(folder, **changes) -> ScoreConfig:
    return settings_for(folder, **{"batch_size": 2, "metrics": ["clip_iqa"], **changes})


def test_clip_iqa_equals_torchmetrics_on_piqs_model(tiny_metrics, models):
    from torchmetrics.functional.multimodal.clip_iqa import (
        _clip_iqa_compute, _clip_iqa_format_prompts, _clip_iqa_get_anchor_vectors, _clip_iqa_update)
    from transformers import CLIPProcessor

    piq_model = models[1]
    # sizes mixed within a style (batches are made per size) and a batch size that splits them
    styles = [StyleImages("00", [(f"o{i}", im) for i, im in enumerate(images_of(1, [(40, 40), (48, 36), (40, 40),
                                                                                    (40, 40), (48, 36)]))],
                          images_of(2, [(40, 40)])),
              StyleImages("01", [(f"o{i}", im) for i, im in enumerate(images_of(3, [(64, 64)] * 3))],
                          images_of(4, [(40, 40)]))]
    result = Scorer(clip_iqa_settings(tiny_metrics)).score(styles)

    prompts, names = _clip_iqa_format_prompts(("quality",))
    assert tuple(prompts) == QUALITY_PROMPTS
    processor = CLIPProcessor.from_pretrained(tiny_metrics / "clip")
    with torch.no_grad():
        anchors = _clip_iqa_get_anchor_vectors("clip_iqa", piq_model, processor, prompts, "cpu")
    per_style = []
    for style in styles:
        probs = []
        for _, image in style.generated:  # a 0-255 tensor with data_range=255, one image at a time
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            with torch.no_grad():
                features = _clip_iqa_update("clip_iqa", pixels, piq_model, processor, 255.0, "cpu")
            probs.append(_clip_iqa_compute(features, anchors, names).item())
        per_style.append(np.mean(probs))
        # torchmetrics takes the softmax in float32, jdiff in float64: they differ by about 1e-6
        assert result.per_style[style.style_id]["clip_iqa"] == pytest.approx(per_style[-1], abs=5e-6)
        assert np.ptp(probs) > 1e-4  # the images score differently: a mix-up of their order would show
    assert result.metrics["clip_iqa"] == pytest.approx(np.mean(per_style), abs=5e-6)


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
