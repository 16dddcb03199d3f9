"""Metric models with the real architectures and file formats but random weights, built locally.

For tests, benchmarks and smoke runs where the real weights (CLIP, DINOv2, SqueezeNet + LPIPS heads,
the FID Inception) cannot be downloaded. Each is written in the format its real counterpart has, so the
scoring code loads it through the same path:

    clip/        CLIPModel (tiny ViT and text tower) + CLIP tokenizer files + preprocessor_config.json
    dinov2/      Dinov2Model (tiny) + preprocessor_config.json (BitImageProcessor recipe)
    squeezenet1_1.pth   SqueezeNet 1.1 at full size (it is small), torchvision's parameter names
    squeeze.pth         the seven LPIPS linear heads, the lpips package's parameter names
    inception.pth       the FID Inception layers up to ``feature=192``, torch-fidelity's parameter names
    clip_rn50.pt        a tiny CLIP ResNet as OpenAI's RN50.pt is stored: a TorchScript archive of float16
                        weights (its tokenizer: the files in clip/)

The same seed gives the same weights. :func:`tiny_score_overrides` gives the ``score.*`` overrides that
point a run at them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from jdiff.scoring.clip_resnet import CLIP_MEAN, CLIP_STD

TINY_METRICS_VERSION = 2
MARKER = "jdiff_tiny_metrics.json"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _preprocessor(folder: Path, processor: str, short: int, crop: int, mean, std) -> None:
    config = {"image_processor_type": processor, "do_resize": True, "size": {"shortest_edge": short},
              "do_center_crop": True, "crop_size": {"height": crop, "width": crop}, "resample": 3,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
              "image_std": std, "do_convert_rgb": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random values for every parameter and BatchNorm statistic, so no layer is an identity."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)


# Small enough for tests, with two bottlenecks in one stage, several attention heads in both towers and
# OpenAI's context length.
TINY_CLIP_RESNET = dict(width=8, layers=(1, 2, 1, 1), embed_dim=16, grid=2, text_width=128, text_layers=2,
                        context_length=77)


def save_clip_resnet_archive(path: Path, shape, generator: torch.Generator) -> None:
    """A CLIP ResNet of ``shape`` with random weights, written as OpenAI's ``RN50.pt`` is: a TorchScript
    archive (traced) holding float16 weights under OpenAI's names."""
    from jdiff.scoring.clip_resnet import ClipResNet

    model = ClipResNet(shape).eval()
    _randomise(model, generator)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # what CLIP's training ends at
        token_ids = torch.zeros(1, shape.context_length, dtype=torch.long)
        token_ids[0, :2] = torch.tensor([0, shape.vocab_size - 1])
        # only the text tower is traced; the archive holds every weight all the same
        archive = torch.jit.trace_module(model, {"encode_text": (token_ids,)}, check_trace=False)
    torch.jit.save(archive.half(), str(path))


def build_tiny_metric_models(folder: Path, seed: int = 0) -> None:
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from jdiff.scoring.clip_resnet import ClipResNetShape
    from jdiff.scoring.fid import InceptionFeatures
    from jdiff.scoring.lpips import LpipsSqueeze
    from jdiff.tiny_model import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_tokenizer_files

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vocab = build_tokenizer_files(folder / "clip")
        clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab[BOS_TOKEN],
                             eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[PAD_TOKEN]),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=16))
        clip.save_pretrained(folder / "clip", safe_serialization=True)
        _preprocessor(folder / "clip", "CLIPImageProcessor", 32, 32, CLIP_MEAN, CLIP_STD)

        dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                        patch_size=14, image_size=28))
        dino.save_pretrained(folder / "dinov2", safe_serialization=True)
        _preprocessor(folder / "dinov2", "BitImageProcessor", 32, 28, IMAGENET_MEAN, IMAGENET_STD)

        lpips = LpipsSqueeze()
        _randomise(lpips, generator)
        state = lpips.state_dict()
        backbone = {k: v for k, v in state.items() if k.startswith("features.")}
        # torchvision's file also holds the classifier, which LPIPS does not use
        backbone["classifier.1.weight"] = torch.randn(1000, 512, 1, 1, generator=generator) * 0.01
        backbone["classifier.1.bias"] = torch.zeros(1000)
        torch.save(backbone, folder / "squeezenet1_1.pth")
        # LPIPS heads are non-negative channel weights
        torch.save({k: v.abs() for k, v in state.items() if k.startswith("lin")}, folder / "squeeze.pth")

        inception = InceptionFeatures(192)
        _randomise(inception, generator)
        inception_state = dict(inception.state_dict())
        inception_state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.01  # unused by FID
        torch.save(inception_state, folder / "inception.pth")
        save_clip_resnet_archive(folder / "clip_rn50.pt", ClipResNetShape(**TINY_CLIP_RESNET, vocab_size=len(vocab)),
                                 generator)
    (folder / MARKER).write_text(json.dumps({"version": TINY_METRICS_VERSION, "seed": seed}))


def ensure_tiny_metric_models(cache_root: Path, seed: int = 0) -> Path:
    """``cache_root/tiny-metrics-v{version}-seed{seed}``, built there first if missing."""
    target = Path(cache_root) / f"tiny-metrics-v{TINY_METRICS_VERSION}-seed{seed}"
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_tiny_metric_models(tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_score_overrides(folder: Path) -> list[str]:
    """Hydra overrides that point every metric at the tiny models in ``folder``."""
    folder = Path(folder)
    return [f"score.dinov2_model={folder / 'dinov2'}", f"score.clip_iqa_model={folder / 'clip_rn50.pt'}",
            f"score.clip_iqa_tokenizer={folder / 'clip'}",
            f"score.clip_r_model={folder / 'clip'}", f"score.lpips_backbone={folder / 'squeezenet1_1.pth'}",
            f"score.lpips_head={folder / 'squeeze.pth'}", f"score.fid_weights={folder / 'inception.pth'}"]
