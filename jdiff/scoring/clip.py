"""The two CLIP metrics, with the checker's semantics.

CLIP-IQA (torchmetrics ``CLIPImageQualityAssessment(prompts=("quality",))``): per image,
``softmax(100 * [cos(image, "Good photo."), cos(image, "Bad photo.")])[0]``; the metric is the mean over
images. The checker's model is OpenAI's CLIP RN50 (:mod:`jdiff.scoring.clip_resnet`); a transformers CLIP
given instead is embedded as torchmetrics does it for a hub model id (:class:`ClipEmbedder`).

CLIP-R (``openai/clip-vit-large-patch14``): each generated image is compared with the bare, lower-cased
object names of ``clip_r_prompts.txt`` plus its own object (each name once). A hit when its own object is
among the 5 most similar names; the metric is the hit rate. A tie with the own object counts in its favour.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from jdiff.scoring.preprocess import PretrainedImageModel

QUALITY_PROMPTS = ("Good photo.", "Bad photo.")
# torchmetrics scales CLIP-IQA's cosines by a fixed 100 (not the model's logit scale).
CLIP_IQA_LOGIT_SCALE = 100.0
CLIP_R_TOP_K = 5


class ClipEmbedder(PretrainedImageModel):
    """Unit-length CLIP image and text embeddings (projections of the pooled outputs)."""

    def __init__(self, folder: Path, device: torch.device, batch_size: int):
        from transformers import CLIPModel, CLIPTokenizer

        super().__init__(CLIPModel, folder, device, batch_size)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        rows = []
        for pixels in self.pixel_batches(images):
            # vision_model + visual_projection: what get_image_features returns in transformers 4 and 5 alike
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            rows.append(self.model.visual_projection(pooled).float().cpu())
        return _unit(torch.cat(rows).numpy())

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), 64):
            tokens = self.tokenizer(list(texts[start : start + 64]), padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            rows.append(self.model.text_projection(pooled).float().cpu())
        return _unit(torch.cat(rows).numpy())


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clip_iqa_scores(image_embeds: np.ndarray, quality_anchors: np.ndarray) -> np.ndarray:
    """Per-image probability of "Good photo." against "Bad photo." (rows of ``quality_anchors``, in that order)."""
    logits = CLIP_IQA_LOGIT_SCALE * image_embeds.astype(np.float64) @ quality_anchors.astype(np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs[:, 0]


def load_clip_r_names(path: Optional[Path] = None) -> list[str]:
    """The candidate names, lower-cased, each once: ``path``, or the 215 challenge names shipped with jdiff."""
    if path is None:
        text = resources.files("jdiff.scoring").joinpath("clip_r_prompts.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    names = [line.strip().lower() for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(names))


def clip_r_hit(image_embed: np.ndarray, own: str, names: Sequence[str], name_embeds: np.ndarray,
               own_embed: np.ndarray) -> bool:
    """Whether ``own`` (lower-cased) ranks in the top 5 of ``names`` plus ``own`` by cosine similarity.

    ``name_embeds`` are the unit text embeddings of ``names``; ``own_embed`` that of ``own``.
    """
    own_similarity = float(own_embed @ image_embed)
    others = np.array([n != own for n in names])
    better = int((name_embeds[others] @ image_embed > own_similarity).sum())
    return better < CLIP_R_TOP_K
