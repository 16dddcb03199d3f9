"""Write ``clip_iqa_reference.json``: what piq 0.8.0's CLIP RN50 and torchmetrics' CLIP-IQA functions give on the
inputs tests/test_clip_iqa.py feeds jdiff, so that the test needs neither piq nor its model code.

    pip install --no-deps piq==0.8.0      # its CLIP code only; torchvision serves piq's other metrics
    python tests/oracles/make_clip_iqa_reference.py

Run it again only when the inputs below or jdiff's tiny random-weight archive change (the test says so: it checks
the fingerprints stored with the values). The model is jdiff's tiny archive (``jdiff.scoring.tiny_models``, seed
0), loaded by piq's ``build_model``; the inputs are made from the seeds below. The test imports the inputs from
here, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).with_name("clip_iqa_reference.json")
TINY_SEED = 0
TOWER_SEED = 0  # torch.manual_seed of the image-tower inputs
TEXTS = ("Good photo.", "Bad photo.", "a watercolor painting of a lighthouse")
# CLIP-IQA inputs: per style, (seed, sizes) of the generated images and of the references. Sizes mixed within a
# style (jdiff batches per size), and the test's batch size 2 splits them.
STYLES = {"00": ((1, [(40, 40), (48, 36), (40, 40), (40, 40), (48, 36)]), (2, [(40, 40)])),
          "01": ((3, [(64, 64)] * 3), (4, [(40, 40)]))}
# piq's full-size CLIP RN50 (OpenAI's), whose parameter names and shapes jdiff's ClipResNet(RN50_SHAPE) must have.
RN50_ARGS = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                 transformer_heads=8, transformer_layers=12)


# -- the inputs (the test uses these too) ---------------------------------------------------------------------

def images_of(seed: int, shapes) -> list[np.ndarray]:
    """uint8 RGB images: gradients plus noise, so that embeddings differ between images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] / 64
    out = []
    for h, w in shapes:
        a, b = rng.uniform(-4, 4, 2)
        base = np.stack([np.sin(a * xx + b * yy + k) for k in range(3)], axis=-1)[:h, :w] * 0.5 + 0.5
        out.append(np.clip(base * 255 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return out


def style_images() -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """style id -> (generated images, reference images)."""
    return {sid: (images_of(*generated), images_of(*references)) for sid, (generated, references) in STYLES.items()}


def tower_inputs() -> dict[str, torch.Tensor]:
    """Normalised pixels for the image tower: grid 2 (the positional embedding's own size) and another size."""
    torch.manual_seed(TOWER_SEED)
    return {"native": torch.randn(3, 3, 64, 64), "other": torch.randn(2, 3, 56, 88)}


# (input, pos_embedding) pairs the image tower is compared on
TOWER_CASES = (("native", True), ("native", False), ("other", False))


def token_rows(tokenizer_dir: Path, texts, length: int = 77) -> torch.Tensor:
    """torchmetrics' anchor tokens: the CLIP tokenizer's ids zero-padded to the context length."""
    from transformers import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(tokenizer_dir)(list(texts))["input_ids"]
    rows = torch.zeros(len(ids), length, dtype=torch.long)
    for i, row in enumerate(ids):
        rows[i, : len(row)] = torch.tensor(row)
    return rows


def fingerprint(arrays) -> str:
    """sha256 of arrays' dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def archive_fingerprint(path: Path) -> str:
    """The TorchScript archive's state dict (names, then tensors), independent of how the zip was written."""
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    names = sorted(state)
    return hashlib.sha256(("\n".join(names) + fingerprint(state[n] for n in names)).encode()).hexdigest()


def input_fingerprints(tiny_metrics: Path) -> dict[str, str]:
    """Everything the stored values depend on besides the model code under test."""
    return {"archive": archive_fingerprint(tiny_metrics / "clip_rn50.pt"),
            "tower_inputs": fingerprint(tower_inputs().values()),
            "tokens": fingerprint([token_rows(tiny_metrics / "clip", TEXTS)]),
            "images": fingerprint([im for gen, ref in style_images().values() for im in (*gen, *ref)])}


# -- the oracle: piq and torchmetrics -------------------------------------------------------------------------

def piq_clip_module():
    """piq 0.8.0's ``feature_extractors/clip.py``, imported without piq's package ``__init__`` (which imports
    torchvision for metrics unrelated to CLIP)."""
    found = importlib.util.find_spec("piq")
    if found is None:
        sys.exit("piq is needed to make the reference: pip install --no-deps piq==0.8.0")
    root = Path(found.origin).parent
    saved = {name: sys.modules.pop(name, None) for name in ("piq", "piq.utils", "piq.utils.common")}
    bare = types.ModuleType("piq")
    bare.__path__ = [str(root)]
    sys.modules["piq"] = bare
    try:
        spec = importlib.util.spec_from_file_location("piq_clip_reference", root / "feature_extractors" / "clip.py")
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


def rows(tensor: torch.Tensor) -> list:
    return tensor.detach().double().tolist()


def make_reference(tiny_metrics: Path) -> dict:
    from importlib.metadata import version

    from torchmetrics.functional.multimodal.clip_iqa import (
        _clip_iqa_compute, _clip_iqa_format_prompts, _clip_iqa_get_anchor_vectors, _clip_iqa_update)
    from transformers import CLIPProcessor

    piq_clip = piq_clip_module()
    with torch.device("meta"):
        layout = {k: list(v.shape) for k, v in piq_clip.CLIP(**RN50_ARGS).state_dict().items()}
    model = piq_load(piq_clip, tiny_metrics / "clip_rn50.pt")
    pixels = tower_inputs()
    tokens = token_rows(tiny_metrics / "clip", TEXTS)
    with torch.no_grad():
        towers = [{"input": name, "pos_embedding": pos, "expected": rows(model.encode_image(pixels[name], pos))}
                  for name, pos in TOWER_CASES]
        text = rows(model.encode_text(tokens))

    prompts, names = _clip_iqa_format_prompts(("quality",))
    processor = CLIPProcessor.from_pretrained(tiny_metrics / "clip")
    styles = {}
    with torch.no_grad():
        anchors = _clip_iqa_get_anchor_vectors("clip_iqa", model, processor, prompts, "cpu")
        for sid, (generated, _) in style_images().items():
            probs = []
            for image in generated:  # a 0-255 tensor with data_range=255, one image at a time
                batch = torch.from_numpy(image).permute(2, 0, 1)[None].float()
                features = _clip_iqa_update("clip_iqa", batch, model, processor, 255.0, "cpu")
                probs.append(_clip_iqa_compute(features, anchors, names).item())
            styles[sid] = {"probs": probs, "mean": float(np.mean(probs))}
    return {
        "made_by": "tests/oracles/make_clip_iqa_reference.py",
        "versions": {name: version(name) for name in ("piq", "torchmetrics", "torch", "transformers")},
        "fingerprints": input_fingerprints(tiny_metrics),
        "rn50_layout": layout,
        "image_tower": towers,
        "text_tower": {"texts": list(TEXTS), "expected": text},
        "clip_iqa": {"prompts": list(prompts), "styles": styles,
                     "mean": float(np.mean([s["mean"] for s in styles.values()]))},
    }


def main() -> None:
    from jdiff.scoring.tiny_models import ensure_tiny_metric_models

    with tempfile.TemporaryDirectory() as tmp:
        reference = make_reference(ensure_tiny_metric_models(Path(tmp), seed=TINY_SEED))
    REFERENCE.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
