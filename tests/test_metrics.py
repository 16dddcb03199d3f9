"""The five model-based challenge metrics, on tiny random-weight models of the real classes and file formats.

Each metric's plumbing (preprocessing, weight loading, batching, caching, averaging) is checked against an
independent computation of its definition, mostly written the way the challenge's checker wrote it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import settings_for
from jdiff.scoring import final_score
from jdiff.scoring.clip import QUALITY_PROMPTS, clip_r_hit, load_clip_r_names
from jdiff.scoring.fid import InceptionFeatures, fid_from_features, frechet_distance, load_inception, resize_like_tf1
from jdiff.scoring.lpips import TAPS, load_lpips
from jdiff.scoring.models import MetricUnavailable
from jdiff.scoring.preprocess import ModelImageTransform, lpips_input
from jdiff.scoring.scorer import FeatureCache, Scorer, StyleImages


def random_images(seed: int, n: int, size=(48, 40)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def smooth_images(seed: int, n: int, size: int = 40) -> list[np.ndarray]:
    """Images with structure (gradients and blobs), so that features differ in meaningful ways."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-3, 3, 3)
        base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], axis=-1)
        out.append(np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def two_styles() -> list[StyleImages]:
    objects = ["Dolphin", "Lion", "Apple", "Boat"]
    return [StyleImages("00", list(zip(objects, smooth_images(1, 4))), smooth_images(2, 3, 56)),
            StyleImages("01", list(zip(objects[:3], random_images(3, 3))), random_images(4, 3, (36, 64)))]


@pytest.fixture(scope="module")
def scored(tiny_metrics, two_styles, tmp_path_factory):
    scorer = Scorer(settings_for(tiny_metrics), tmp_path_factory.mktemp("cache"))
    return scorer, scorer.score(two_styles)


# -- preprocessing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, processor", [("clip", "CLIPImageProcessor"), ("dinov2", "BitImageProcessor")])
def test_model_transform_matches_the_transformers_pil_processor(tiny_metrics, model, processor):
    import transformers

    cls = getattr(transformers, processor + "Pil", None) or getattr(transformers, processor)
    theirs = cls.from_pretrained(tiny_metrics / model)
    ours = ModelImageTransform.from_folder(tiny_metrics / model)
    for image in random_images(0, 2, (50, 37)) + random_images(1, 1, (30, 90)):
        expected = theirs(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours(image), expected, atol=1e-5)


def test_lpips_input_is_256_square_in_minus_one_to_one():
    x = lpips_input(random_images(0, 1, (100, 60))[0])
    assert x.shape == (3, 256, 256) and x.min() >= -1 and x.max() <= 1
    flat = lpips_input(np.full((10, 10, 3), 255, np.uint8))
    assert np.all(flat == 1.0)


# -- DINOv2 --------------------------------------------------------------------------------------------------

def test_dinov2_is_the_mean_pairwise_cosine_of_pooled_outputs(tiny_metrics, two_styles, scored):
    from transformers import AutoModel, BitImageProcessorPil

    processor = BitImageProcessorPil.from_pretrained(tiny_metrics / "dinov2")
    model = AutoModel.from_pretrained(tiny_metrics / "dinov2").eval()

    def pooled(image):  # the checker: one image at a time through the processor and the model
        with torch.no_grad():
            return model(**processor(images=image, return_tensors="pt")).pooler_output

    per_style = []
    for style in two_styles:
        pairs = [F.cosine_similarity(pooled(g), pooled(r)).item() for _, g in style.generated for r in style.references]
        per_style.append(np.mean(pairs))
        assert scored[1].per_style[style.style_id]["dinov2"] == pytest.approx(per_style[-1], abs=1e-5)
    assert scored[1].metrics["dinov2"] == pytest.approx(np.mean(per_style), abs=1e-5)


# -- CLIP-IQA ------------------------------------------------------------------------------------------------

def test_clip_iqa_with_a_transformers_clip_is_the_good_photo_probability(tiny_metrics, two_styles):
    """A transformers CLIP as torchmetrics uses one given by hub id (the default, OpenAI's RN50, is checked
    against torchmetrics and piq in test_clip_iqa.py)."""
    from transformers import CLIPModel, CLIPProcessor

    result = Scorer(settings_for(tiny_metrics, clip_iqa_model=str(tiny_metrics / "clip"), metrics=["clip_iqa"])
                    ).score(two_styles)

    processor = CLIPProcessor.from_pretrained(tiny_metrics / "clip")
    model = CLIPModel.from_pretrained(tiny_metrics / "clip").eval()
    with torch.no_grad():
        text = processor(text=list(QUALITY_PROMPTS), return_tensors="pt", padding=True)
        anchors = model.get_text_features(**text)
        anchors = getattr(anchors, "pooler_output", anchors)
        anchors = anchors / anchors.norm(dim=-1, keepdim=True)
    per_style = []
    for style in two_styles:
        with torch.no_grad():
            features = model.get_image_features(**processor(images=[g for _, g in style.generated], return_tensors="pt"))
        features = getattr(features, "pooler_output", features)
        features = features / features.norm(dim=-1, keepdim=True)
        probs = (100 * features @ anchors.T).softmax(dim=-1)[:, 0]  # torchmetrics: P("Good photo.")
        per_style.append(probs.mean().item())
        assert result.per_style[style.style_id]["clip_iqa"] == pytest.approx(per_style[-1], abs=1e-5)
    assert result.metrics["clip_iqa"] == pytest.approx(np.mean(per_style), abs=1e-5)
    assert 0.0 <= result.metrics["clip_iqa"] <= 1.0


# -- CLIP-R --------------------------------------------------------------------------------------------------

def unit(*rows) -> np.ndarray:
    a = np.array(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_clip_r_top5_on_hand_made_embeddings():
    names = [f"n{k}" for k in range(8)]
    # name k is at angle k*10 degrees from the image: similarity falls with k
    angles = np.radians(np.arange(8) * 10.0)
    embeds = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    image = np.array([1.0, 0.0])
    for k in range(8):
        assert clip_r_hit(image, names[k], names, embeds, embeds[k]) == (k < 5), k  # ranks 1..5 hit
    # an own object outside the list competes with all 8 names: between n4 and n5 it ranks 6th
    outside = np.array([np.cos(np.radians(45.0)), np.sin(np.radians(45.0))])
    assert not clip_r_hit(image, "mine", names, embeds, outside)
    assert clip_r_hit(image, "mine", names, embeds, unit([1.0, 0.01])[0])
    # a tie at rank 5 counts for the own object: n6 made identical to n4, both are hits
    tied = embeds.copy()
    tied[6] = tied[4]
    assert clip_r_hit(image, "n4", names, tied, tied[4]) and clip_r_hit(image, "n6", names, tied, tied[6])


def test_clip_r_names_ship_with_the_package():
    names = load_clip_r_names()
    assert len(names) == 215  # 216 lines with "Watch" twice; the checker's set() keeps it once
    assert names[:3] == ["cat", "dog", "elephant"] and all(n == n.lower().strip() for n in names)


def test_clip_r_hits_match_the_checkers_top5(tiny_metrics, two_styles, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    names_file = tmp_path / "names.txt"
    names_file.write_text("Dolphin\nlion\ncat\nsun\nboat\ntree\nhouse\n")
    scorer = Scorer(settings_for(tiny_metrics, clip_r_names=str(names_file), metrics=["clip_r"]))
    result = scorer.score(two_styles)

    processor = CLIPProcessor.from_pretrained(tiny_metrics / "clip")
    model = CLIPModel.from_pretrained(tiny_metrics / "clip").eval()
    prompts = [line.strip().lower() for line in names_file.read_text().splitlines()]
    hits = []
    for style in two_styles:
        style_hits = []
        for obj, image in style.generated:  # the checker's loop, with sorted() for a fixed order
            own = obj.lower()
            candidates = sorted(set(prompts + [own]))
            with torch.no_grad():
                logits = model(**processor(text=candidates, images=image, return_tensors="pt",
                                           padding=True)).logits_per_image[0]
            top5 = [candidates[i] for i in logits.topk(5).indices]
            style_hits.append(own in top5)
        hits += style_hits
        assert result.per_style[style.style_id]["clip_r"] == pytest.approx(np.mean(style_hits))
    assert 0 < sum(hits) < len(hits)  # a list where the top-5 rule decides: some hits, some misses
    assert result.metrics["clip_r"] == pytest.approx(np.mean(hits))


# -- LPIPS ---------------------------------------------------------------------------------------------------

def lpips_by_hand(backbone: dict, heads: dict, rows: list[np.ndarray], columns: list[np.ndarray]) -> np.ndarray:
    """LPIPS of every (row, column) image pair from its definition, with functional ops from the state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def conv(x, name, padding=0, stride=1):
        return F.conv2d(x, backbone[f"{name}.weight"], backbone[f"{name}.bias"], stride=stride, padding=padding)

    def fire(x, i):
        s = torch.relu(conv(x, f"features.{i}.squeeze"))
        return torch.cat([torch.relu(conv(s, f"features.{i}.expand1x1")),
                          torch.relu(conv(s, f"features.{i}.expand3x3", padding=1))], 1)

    def taps(img):
        x = (torch.from_numpy(lpips_input(img))[None] - shift) / scale
        x = torch.relu(conv(x, "features.0", stride=2))
        out = [x]
        for i in range(2, 13):
            if i in (2, 5, 8):
                x = F.max_pool2d(x, 3, 2, ceil_mode=True)
            else:
                x = fire(x, i)
                if i in TAPS:
                    out.append(x)
        return [t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for t in out]

    with torch.no_grad():
        row_acts, column_acts = [taps(im) for im in rows], [taps(im) for im in columns]
        return np.array([[sum(F.conv2d((fa - fb) ** 2, heads[f"lin{k}.model.1.weight"]).mean().item()
                              for k, (fa, fb) in enumerate(zip(a, b))) for b in column_acts] for a in row_acts])


def test_lpips_matches_its_definition_and_is_a_distance(tiny_metrics, two_styles, scored):
    backbone = torch.load(tiny_metrics / "squeezenet1_1.pth")
    heads = torch.load(tiny_metrics / "squeeze.pth")
    style = two_styles[0]  # one style by hand (the slow part); averaging is checked for every metric below
    by_hand = lpips_by_hand(backbone, heads, [g for _, g in style.generated], style.references).mean()
    assert scored[1].per_style[style.style_id]["lpips"] == pytest.approx(by_hand, rel=1e-4)

    net = load_lpips(tiny_metrics / "squeezenet1_1.pth", tiny_metrics / "squeeze.pth", torch.device("cpu"))
    a, b = (torch.from_numpy(lpips_input(im))[None] for im in smooth_images(7, 2))
    acts_a, acts_b = net.activations(a), net.activations(b)
    assert net.distance(acts_a, acts_a).item() == 0.0
    assert net.distance(acts_a, acts_b).item() == pytest.approx(net.distance(acts_b, acts_a).item(), rel=1e-6)
    assert net.distance(acts_a, acts_b).item() > 0


def test_lpips_weights_with_missing_layers_are_refused_by_name(tiny_metrics, tmp_path):
    partial = {k: v for k, v in torch.load(tiny_metrics / "squeeze.pth").items() if not k.startswith("lin6")}
    torch.save(partial, tmp_path / "squeeze.pth")
    with pytest.raises(MetricUnavailable, match="lin6.model.1.weight"):
        load_lpips(tiny_metrics / "squeezenet1_1.pth", tmp_path / "squeeze.pth", torch.device("cpu"))


# -- FID -----------------------------------------------------------------------------------------------------

def test_tf1_bilinear_resize_samples_at_i_times_in_over_out():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = resize_like_tf1(x, 4)[0, 0]
    # rows and columns sample at 0, 0.5, 1, 1.5 -> the last sample clamps to the edge
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    assert torch.equal(out, expected)
    down = resize_like_tf1(torch.arange(16.0).view(1, 1, 4, 4), 2)[0, 0]  # samples 0 and 2: no averaging
    assert torch.equal(down, torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


def sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_against_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # diagonal covariances: sum (mu1-mu2)^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # general covariances: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric square root
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    r1 = sqrtm_psd(c1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(sqrtm_psd(r1 @ c2 @ r1))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_of_gaussians_as_expected():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 8))
    assert abs(fid_from_features(feats, feats)) < 1e-8
    shifted = feats + 3.0  # same covariance, mean moved by 3 in each of 8 dimensions
    assert fid_from_features(shifted, feats) == pytest.approx(8 * 9.0, rel=1e-8)
    with pytest.raises(ValueError, match="at least 2 generated"):
        fid_from_features(feats[:1], feats)


def test_fid_pools_every_style_and_uses_the_inception_features(tiny_metrics, two_styles, scored):
    net = load_inception(tiny_metrics / "inception.pth", 64, torch.device("cpu"))

    def feats(images):
        return np.concatenate([net(torch.from_numpy(im.transpose(2, 0, 1).copy())[None]).numpy() for im in images])

    gen = np.concatenate([feats([g for _, g in s.generated]) for s in two_styles])
    ref = np.concatenate([feats(s.references) for s in two_styles])
    assert gen.shape == (7, 64)
    assert scored[1].metrics["fid"] == pytest.approx(fid_from_features(gen, ref), rel=1e-6)


def test_inception_loads_torch_fidelity_names_and_refuses_other_files(tiny_metrics, tmp_path):
    state = torch.load(tiny_metrics / "inception.pth")
    assert "Conv2d_1a_3x3.conv.weight" in state and "Conv2d_4a_3x3.bn.running_var" in state and "fc.weight" in state
    net192 = load_inception(tiny_metrics / "inception.pth", 192, torch.device("cpu"))
    image = torch.from_numpy(random_images(0, 1, (64, 80))[0].transpose(2, 0, 1).copy())[None]
    assert net192(image).shape == (1, 192)
    with pytest.raises(MetricUnavailable, match="Mixed_5b"):
        load_inception(tiny_metrics / "inception.pth", 768, torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8"):
        net192(image.float())


def test_full_inception_gives_2048_features():
    net = InceptionFeatures(2048).eval()
    image = torch.from_numpy(random_images(0, 1, (40, 40))[0].transpose(2, 0, 1).copy())[None]
    assert net(image).shape == (1, 2048)


# -- the scorer: averaging, caching, missing weights --------------------------------------------------------

def test_every_metric_runs_and_the_final_score_is_complete(scored):
    result = scored[1]
    assert list(result.metrics) == ["dinov2", "hist", "lpips", "fid", "clip_iqa", "clip_r"]
    assert result.skipped == {}
    for metric in ("dinov2", "hist", "lpips", "clip_iqa"):  # averaged over styles
        assert result.metrics[metric] == pytest.approx(np.mean([v[metric] for v in result.per_style.values()]))
    assert not final_score(result.metrics).partial


def test_reference_features_are_cached_on_disk_and_reused(tiny_metrics, two_styles, scored, tmp_path):
    scorer, first = scored
    files = sorted(p.name.split("-")[0] for p in scorer.cache.folder.glob("*.npy"))
    assert files == ["clip_iqa_anchors", "clip_r_names", "dinov2", "dinov2", "fid", "fid"]
    # a fresh scorer on the same cache gets the reference features from disk
    again = Scorer(settings_for(tiny_metrics), scorer.cache.folder.parent)
    calls = []
    original = FeatureCache.get

    def counting_get(self, key, compute, on_disk=True):
        return original(self, key, lambda: calls.append(key) or compute(), on_disk)

    FeatureCache.get = counting_get
    try:
        second = again.score(two_styles)
    finally:
        FeatureCache.get = original
    assert all(k.startswith("lpips") for k in calls), calls  # only LPIPS activations are memory-only
    assert second.metrics == pytest.approx(first.metrics, rel=1e-6)


def test_a_metric_without_weights_is_skipped_with_a_clear_message(tiny_metrics, two_styles, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    settings = settings_for(tiny_metrics, dinov2_model="facebook/dinov2-base",
                            fid_weights="weights-inception-2015-12-05-6726825d.pth")
    result = Scorer(settings).score(two_styles)
    assert set(result.skipped) == {"dinov2", "fid"}
    assert "huggingface-cli download facebook/dinov2-base" in result.skipped["dinov2"]
    assert "score.dinov2_model" in result.skipped["dinov2"]
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in result.skipped["fid"]
    assert "score.allow_download=true" in result.skipped["fid"]
    assert set(result.metrics) == {"hist", "lpips", "clip_iqa", "clip_r"}
    final = final_score(result.metrics)
    assert final.partial and final.missing == ("dinov2", "fid")


def test_only_asked_for_metrics_are_warned_about(tiny_metrics, two_styles, tmp_path, monkeypatch, caplog):
    """score.metrics that cannot run: one warning line each; score.optional ones (the demo's): scored when they
    can, else named in one info line. Neither is ever a number."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    settings = settings_for(tiny_metrics, metrics=["hist", "dinov2"], optional=["lpips", "fid", "clip_r"],
                            dinov2_model="facebook/dinov2-base", clip_r_model="openai/clip-vit-large-patch14",
                            fid_weights="weights-inception-2015-12-05-6726825d.pth")
    with caplog.at_level(logging.INFO, logger="jdiff.scoring.scorer"):
        result = Scorer(settings).score(two_styles)
    assert set(result.metrics) == {"hist", "lpips"} and set(result.skipped) == {"dinov2", "fid", "clip_r"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "skipped dinov2" in warnings[0] and "huggingface-cli download facebook/dinov2-base" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "left out" in r.getMessage()]
    assert len(infos) == 1 and "\n" not in infos[0], infos
    assert "scored with hist, lpips; left out fid, clip_r" in infos[0]
    assert final_score(result.metrics).missing == ("dinov2", "fid", "clip_iqa", "clip_r")


def test_a_folder_that_is_not_a_model_is_skipped(tiny_metrics, two_styles, tmp_path):
    (tmp_path / "empty").mkdir()
    result = Scorer(settings_for(tiny_metrics, clip_r_model=str(tmp_path / "empty"), metrics=["hist", "clip_r"])
                    ).score(two_styles)
    assert list(result.metrics) == ["hist"] and "cannot load the model" in result.skipped["clip_r"]
