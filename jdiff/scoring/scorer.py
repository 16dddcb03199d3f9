"""All configured metrics for one or more styles, with the checker's averaging.

Per style, the generated images are compared with the style's reference images; the per-style values
are then averaged over the styles, except CLIP-R (hits over all images) and FID (all styles pooled:
every generated image against every reference image). The final score is computed from these averages.

Metric models load on first use, run batched on the GPU when there is one, and a metric whose weights
are missing is skipped with its reason while the others are still computed: a metric the config asks for
(``score.metrics``) gets a warning line of its own, one that is only welcome (``score.optional``, the demo's)
is named in a single info line. Reference
features are computed once per style: kept in memory, and on disk under ``<cache>/score_features/``
keyed by the model and the reference pixels, so later runs on the same style skip them too.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jdiff.files import atomic_write
from jdiff.scoring.final import METRICS
from jdiff.scoring.hist import hist_score
from jdiff.scoring.models import MetricUnavailable

log = logging.getLogger(__name__)

# Download addresses of the single-file weights (used only with score.allow_download=true).
SQUEEZENET_URL = "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"
LPIPS_HEAD_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/squeeze.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


@dataclass
class StyleImages:
    """One style's images: generated ones with their objects (the CLIP-R truth) and the references."""

    style_id: str
    generated: list[tuple[str, np.ndarray]]
    references: list[np.ndarray]


@dataclass
class ScoreResult:
    metrics: dict[str, float]  # averaged over styles (FID pooled); only the metrics that ran
    per_style: dict[str, dict[str, float]]
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it did not run
    seconds: float = 0.0


def pixels_key(images: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(str(im.shape).encode())
        h.update(np.ascontiguousarray(im).data)
    return h.hexdigest()[:20]


class FeatureCache:
    """Features by key: in memory, and as ``.npy`` files in ``folder`` when one is given."""

    def __init__(self, folder: Optional[Path]):
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, Any] = {}

    def get(self, key: str, compute: Callable[[], Any], on_disk: bool = True) -> Any:
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key}.npy" if (self.folder is not None and on_disk) else None
        if path is not None and path.is_file():
            value = np.load(path)
        else:
            value = compute()
            if path is not None:
                atomic_write(path, lambda tmp: np.save(tmp, value))  # tmp ends in .npy
        self.memory[key] = value
        return value


class Scorer:
    """Scores styles with the metrics of a ``score`` config (``jdiff.config.ScoreConfig``)."""

    def __init__(self, settings, cache_dir: Optional[Path] = None):
        unknown = [m for m in settings.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; use some of {list(METRICS)}")
        self.settings = settings
        optional = getattr(settings, "optional", None) or ()
        unknown = [m for m in optional if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown optional metric(s) {unknown}; use some of {list(METRICS)}")
        self.asked = [m for m in METRICS if m in settings.metrics]
        self.metrics = [m for m in METRICS if m in settings.metrics or m in optional]
        self._device = None
        self.cache = FeatureCache(Path(cache_dir) / "score_features" if cache_dir is not None else None)
        self.skipped: dict[str, str] = {}
        self._reported: set[str] = set()
        self._models: dict[str, tuple[Any, str]] = {}
        self._clip_models: dict[str, tuple[Any, str]] = {}

    # -- models ------------------------------------------------------------------------------------------

    @property
    def device(self):
        """The torch device, picked on first use so that weight-free scoring never imports torch."""
        if self._device is None:
            from jdiff.scoring.models import pick_device

            self._device = pick_device(str(self.settings.device))
        return self._device

    def model(self, metric: str) -> Optional[tuple[Any, str]]:
        """``(model, fingerprint)`` for a metric, loaded once; None (and the reason kept) when unavailable."""
        if metric in self.skipped:
            return None
        if metric not in self._models:
            try:
                self._models[metric] = self._load(metric)
            except MetricUnavailable as err:
                self.skipped[metric] = err.reason
                return None
        return self._models[metric]

    def _load(self, metric: str) -> tuple[Any, str]:
        from jdiff.scoring.clip_resnet import is_openai_weights
        from jdiff.scoring.models import fingerprint, hub_folder, weight_file

        s, bs = self.settings, int(self.settings.batch_size)
        if metric == "clip_iqa" and is_openai_weights(s.clip_iqa_model):
            from jdiff.scoring.clip_resnet import OPENAI_CLIP_CACHE, RN50_URL, ClipResNetEmbedder

            weights = weight_file(metric, "score.clip_iqa_model", s.clip_iqa_model, RN50_URL, s.allow_download,
                                  cache=OPENAI_CLIP_CACHE)
            tokenizer = hub_folder(metric, "score.clip_iqa_tokenizer", s.clip_iqa_tokenizer, s.allow_download,
                                   files=("*.json", "*.txt"))
            return self._construct(metric, lambda: ClipResNetEmbedder(metric, weights, tokenizer, self.device, bs),
                                   weights, tokenizer)
        if metric in ("clip_iqa", "clip_r"):
            spec = s.clip_iqa_model if metric == "clip_iqa" else s.clip_r_model
            if spec not in self._clip_models:  # one model serves both metrics when they name the same one
                from jdiff.scoring.clip import ClipEmbedder

                folder = hub_folder(metric, f"score.{metric}_model", spec, s.allow_download)
                self._clip_models[spec] = self._construct(metric, lambda: ClipEmbedder(folder, self.device, bs), folder)
            return self._clip_models[spec]
        if metric == "dinov2":
            from jdiff.scoring.dinov2 import Dinov2Features

            folder = hub_folder(metric, "score.dinov2_model", s.dinov2_model, s.allow_download)
            return self._construct(metric, lambda: Dinov2Features(folder, self.device, bs), folder)
        if metric == "lpips":
            from jdiff.scoring.lpips import load_lpips

            backbone = weight_file(metric, "score.lpips_backbone", s.lpips_backbone, SQUEEZENET_URL, s.allow_download)
            head = weight_file(metric, "score.lpips_head", s.lpips_head, LPIPS_HEAD_URL, s.allow_download)
            return load_lpips(backbone, head, self.device), fingerprint(backbone, head)
        if metric == "fid":
            from jdiff.scoring.fid import load_inception

            weights = weight_file(metric, "score.fid_weights", s.fid_weights, INCEPTION_URL, s.allow_download)
            net = load_inception(weights, int(s.fid_feature), self.device)
            return net, f"{fingerprint(weights)}-{s.fid_feature}"
        raise ValueError(f"{metric} needs no model")

    @staticmethod
    def _construct(metric: str, build: Callable[[], Any], *paths: Path) -> tuple[Any, str]:
        """``(build(), fingerprint of paths)``; a model whose files cannot be read is unavailable."""
        from jdiff.scoring.models import fingerprint

        try:
            return build(), fingerprint(*paths)
        except (OSError, ValueError) as err:  # transformers: missing or unreadable files
            where = ", ".join(str(p) for p in paths)
            raise MetricUnavailable(metric, f"cannot load the model in {where}: {err}") from err

    # -- scoring -----------------------------------------------------------------------------------------

    def score(self, styles: Sequence[StyleImages]) -> ScoreResult:
        started = time.perf_counter()
        if not styles:
            raise ValueError("nothing to score: no styles given")
        per_style: dict[str, dict[str, float]] = {}
        hits: list[bool] = []
        fid_generated, fid_references = [], []
        for style in styles:
            if not style.generated or not style.references:
                raise ValueError(f"style {style.style_id}: needs generated and reference images to score")
            values, style_hits, fid_sets = self._score_style(style)
            per_style[style.style_id] = values
            hits += style_hits
            if fid_sets is not None:
                fid_generated.append(fid_sets[0])
                fid_references.append(fid_sets[1])

        metrics: dict[str, float] = {}
        for metric in self.metrics:
            if metric in self.skipped:
                continue
            if metric == "clip_r":
                metrics[metric] = float(np.mean(hits))
            elif metric == "fid":
                fid = self._pooled_fid(fid_generated, fid_references)
                if fid is not None:
                    metrics[metric] = fid
            else:
                metrics[metric] = float(np.mean([values[metric] for values in per_style.values()]))
        self._report_skipped(metrics)
        return ScoreResult(metrics=metrics, per_style=per_style, skipped=dict(self.skipped),
                           seconds=time.perf_counter() - started)

    def _report_skipped(self, scored: dict[str, float]) -> None:
        """Each asked-for metric that could not run: a warning line with why; the optional ones: one info line.
        Each metric is reported once per scorer."""
        new = {m: why for m, why in self.skipped.items() if m not in self._reported}
        for metric, why in new.items():
            if metric in self.asked:
                log.warning("score: skipped %s, so the final score is partial: %s", metric, why)
        left_out = [m for m in new if m not in self.asked]
        if left_out:
            log.info("score: scored with %s; left out %s, which cannot run here (why: 'skipped' in scores.json; "
                     "their weights: docs/scoring.md)", ", ".join(scored) or "no metric", ", ".join(left_out))
        self._reported.update(new)

    def _pooled_fid(self, generated: list[np.ndarray], references: list[np.ndarray]) -> Optional[float]:
        from jdiff.scoring.fid import fid_from_features

        try:
            return fid_from_features(np.concatenate(generated), np.concatenate(references))
        except ValueError as err:  # fewer than two images on one side: no covariance
            self.skipped["fid"] = str(err)
            return None

    def _score_style(self, style: StyleImages) -> tuple[dict[str, float], list[bool], Optional[tuple]]:
        generated = [im for _, im in style.generated]
        refs, ref_key = style.references, pixels_key(style.references)
        values: dict[str, float] = {}
        hits: list[bool] = []
        fid_sets = None
        for metric in self.metrics:
            if metric == "hist":
                values["hist"] = hist_score(generated, refs)
                continue
            loaded = self.model(metric)
            if loaded is None:
                continue
            model, fp = loaded[0], loaded[1]
            if metric == "dinov2":
                from jdiff.scoring.dinov2 import mean_cosine

                ref_feats = self.cache.get(f"dinov2-{fp}-{ref_key}", lambda: model(refs))
                values["dinov2"] = mean_cosine(model(generated), ref_feats)
            elif metric == "lpips":
                values["lpips"] = self._lpips(model, generated, refs, f"lpips-{fp}-{ref_key}")
            elif metric == "fid":
                ref_feats = self.cache.get(f"fid-{fp}-{ref_key}", lambda: self._inception(model, refs))
                fid_sets = (self._inception(model, generated), ref_feats)
                if len(generated) >= 2 and len(refs) >= 2:
                    from jdiff.scoring.fid import fid_from_features

                    values["fid"] = fid_from_features(*fid_sets)
            elif metric == "clip_iqa":
                from jdiff.scoring.clip import QUALITY_PROMPTS, clip_iqa_scores

                anchors = self.cache.get(f"clip_iqa_anchors-{fp}", lambda: model.texts(QUALITY_PROMPTS))
                values["clip_iqa"] = float(clip_iqa_scores(model.images(generated), anchors).mean())
            elif metric == "clip_r":
                style_hits = self._clip_r(model, fp, style.generated)
                values["clip_r"] = float(np.mean(style_hits))
                hits += style_hits
        return values, hits, fid_sets

    def _inception(self, net, images: Sequence[np.ndarray]) -> np.ndarray:
        """Features in image order; images of one size go through together (the network resizes to 299)."""
        import torch

        from jdiff.scoring.preprocess import batches_by_shape

        rows = np.zeros((len(images), net.feature), np.float64)
        for indices, batch in batches_by_shape(images, int(self.settings.batch_size)):
            rows[indices] = net(torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)).cpu().numpy()
        return rows

    def _lpips(self, net, generated: Sequence[np.ndarray], refs: Sequence[np.ndarray], key: str) -> float:
        import torch

        from jdiff.scoring.lpips import mean_pairwise_lpips
        from jdiff.scoring.preprocess import lpips_input

        def activations(images):
            layers = None
            bs = int(self.settings.batch_size)
            for start in range(0, len(images), bs):
                x = torch.from_numpy(np.stack([lpips_input(im) for im in images[start : start + bs]]))
                out = net.activations(x.to(self.device))
                layers = out if layers is None else [torch.cat([a, b]) for a, b in zip(layers, out)]
            return layers

        # Reference activations are large (about 7 MB an image): kept in memory only.
        ref_acts = self.cache.get(key, lambda: activations(refs), on_disk=False)
        return mean_pairwise_lpips(net, activations(generated), ref_acts)

    def _clip_r(self, model, fp: str, generated: Sequence[tuple[str, np.ndarray]]) -> list[bool]:
        from jdiff.scoring.clip import clip_r_hit, load_clip_r_names

        names_file = self.settings.clip_r_names
        names = load_clip_r_names(Path(names_file) if names_file else None)
        names_key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
        name_embeds = self.cache.get(f"clip_r_names-{fp}-{names_key}", lambda: model.texts(names))
        image_embeds = model.images([im for _, im in generated])
        hits = []
        for (obj, _), embed in zip(generated, image_embeds):
            own = obj.lower()
            own_embed = (name_embeds[names.index(own)] if own in names
                         else self.cache.get(f"clip_r_text-{fp}-{own}", lambda: model.texts([own])[0], on_disk=False))
            hits.append(clip_r_hit(embed, own, names, name_embeds, own_embed))
        return hits
