"""Benchmark of the scoring: 15 styles x 25 generated images against each style's 10 references.

    python -m jdiff.bench.scoring                       # tiny metric models, CPU
    python -m jdiff.bench.scoring --size full --device cuda   # real architectures, random weights

Prints numbers, checks nothing. Measured, in one process on the same images:

* cold: a fresh scorer, empty feature cache (models load, every feature computed);
* warm: the same scorer again (models loaded, reference features in memory);
* next run: a fresh scorer on the cache the cold pass filled (what a new sweep job pays);
* each metric alone (fresh scorer, filled cache);
* the checker's way for the two pairwise metrics on one style: both images of every (generated,
  reference) pair through the model, pair by pair, against jdiff's one pass per image.

``--size full`` builds CLIP ViT-L/14, CLIP RN50, DINOv2-base and the full FID Inception with random weights
(speed does not depend on weight values); LPIPS SqueezeNet is full size either way. Generated images are random
smooth 512x512 images; references come from ``--data`` (challenge-layout styles) or the demo styles.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from jdiff.data import load_style
from jdiff.scoring.final import METRICS, final_score
from jdiff.scoring.scorer import Scorer, StyleImages
from jdiff.scoring.tiny_models import TINY_METRICS_VERSION, ensure_tiny_metric_models


def build_full_size(folder: Path) -> Path:
    """CLIP ViT-L/14, CLIP RN50 and DINOv2-base architectures (random weights), the full FID Inception, and
    the LPIPS SqueezeNet (full size in the tiny set too)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from jdiff.scoring.clip_resnet import RN50_SHAPE
    from jdiff.scoring.fid import InceptionFeatures
    from jdiff.scoring.tiny_models import save_clip_resnet_archive

    tiny = ensure_tiny_metric_models(folder)
    full = folder / f"full-v{TINY_METRICS_VERSION}"
    if (full / "done").is_file():
        return full
    full.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (full / "clip" / name).parent.mkdir(parents=True, exist_ok=True)
        (full / "clip" / name).write_bytes((tiny / "clip" / name).read_bytes())
    vocab = json.loads((tiny / "clip" / "vocab.json").read_text())
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, eos_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768))
    clip.save_pretrained(full / "clip")
    preprocessor = json.loads((tiny / "clip" / "preprocessor_config.json").read_text())
    preprocessor.update(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    (full / "clip" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                             image_size=518)).save_pretrained(full / "dinov2")
    preprocessor = json.loads((tiny / "dinov2" / "preprocessor_config.json").read_text())
    preprocessor.update(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    (full / "dinov2" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    torch.save(InceptionFeatures(2048).state_dict(), full / "inception.pth")
    save_clip_resnet_archive(full / "clip_rn50.pt", RN50_SHAPE, torch.Generator().manual_seed(0))
    for name in ("squeezenet1_1.pth", "squeeze.pth"):
        (full / name).write_bytes((tiny / name).read_bytes())
    (full / "done").write_text("")
    return full


def settings(models: Path, device: str, metrics=METRICS, batch_size: int = 25) -> SimpleNamespace:
    return SimpleNamespace(
        metrics=list(metrics), device=device, batch_size=batch_size, allow_download=False,
        dinov2_model=str(models / "dinov2"), clip_iqa_model=str(models / "clip_rn50.pt"),
        clip_iqa_tokenizer=str(models / "clip"), clip_r_model=str(models / "clip"),
        lpips_backbone=str(models / "squeezenet1_1.pth"), lpips_head=str(models / "squeeze.pth"),
        fid_weights=str(models / "inception.pth"), fid_feature=64, clip_r_names=None)


def smooth_image(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    a, b, c = rng.uniform(-6, 6, 3)
    base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], axis=-1) * 0.5 + 0.5
    return np.clip(base * 255 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def make_styles(data: Path, n_styles: int, n_images: int) -> list[StyleImages]:
    rng = np.random.default_rng(0)
    style_ids = sorted(p.name for p in data.iterdir() if (p / "images").is_dir())
    styles = []
    for k in range(n_styles):
        style = load_style(data, style_ids[k % len(style_ids)])
        objects = [style.prompt_objects[i % len(style.prompt_objects)] for i in range(n_images)]
        styles.append(StyleImages(f"{k:02d}", [(o, smooth_image(rng)) for o in objects], style.images()))
    return styles


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def checker_way(scorer: Scorer, style: StyleImages) -> dict[str, float]:
    """DINOv2 and LPIPS the way the challenge's checker computes them: every pair through the network."""
    import torch

    from jdiff.scoring.preprocess import lpips_input

    seconds = {}
    from jdiff.scoring.dinov2 import mean_cosine

    dino = scorer.model("dinov2")[0]
    _, seconds["dinov2"] = timed(lambda: [mean_cosine(dino([g]), dino([r])) for _, g in style.generated
                                          for r in style.references])
    net = scorer.model("lpips")[0]

    def lpips_pairs():
        for _, g in style.generated:  # the checker stacks all pairs into one batch; pairs in chunks of 25 here
            pairs = [(lpips_input(g), lpips_input(r)) for r in style.references]
            a = torch.from_numpy(np.stack([p[0] for p in pairs])).to(scorer.device)
            b = torch.from_numpy(np.stack([p[1] for p in pairs])).to(scorer.device)
            net.distance(net.activations(a), net.activations(b))

    _, seconds["lpips"] = timed(lpips_pairs)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.scoring",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--styles", type=int, default=15)
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--data", type=Path, default=Path("data/styles"), help="style folders (else the demo's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "jdiff_bench_scoring")
    args = parser.parse_args()

    if not args.data.is_dir():
        from jdiff.demo_data import write_demo_styles

        args.data = args.work / "demo_styles"
        write_demo_styles(args.data)
    models, build_s = timed(lambda: build_full_size(args.work) if args.size == "full"
                            else ensure_tiny_metric_models(args.work))
    styles = make_styles(args.data, args.styles, args.images)
    n = sum(len(s.generated) for s in styles)
    print(f"{args.styles} styles x {args.images} images ({n} generated, {sum(len(s.references) for s in styles)} "
          f"references) from {args.data}; {args.size} models on {args.device} (built in {build_s:.1f} s)")

    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=args.work))
    scorer = Scorer(settings(models, args.device), cache)
    result, cold = timed(lambda: scorer.score(styles))
    _, warm = timed(lambda: scorer.score(styles))
    _, next_run = timed(lambda: Scorer(settings(models, args.device), cache).score(styles))
    print(f"\n{'pass':<34}{'seconds':>9}{'ms/image':>10}")
    for name, sec in (("cold (load models, empty cache)", cold), ("warm (same scorer again)", warm),
                      ("next run (fresh scorer, disk cache)", next_run)):
        print(f"{name:<34}{sec:>9.2f}{1000 * sec / n:>10.1f}")
    print(f"\nmetrics: {json.dumps({k: round(v, 4) for k, v in result.metrics.items()})}")
    print(f"final: {final_score(result.metrics).value:.4f}")

    print(f"\n{'metric alone (fresh scorer, disk cache)':<42}{'seconds':>9}")
    for metric in METRICS:
        _, sec = timed(lambda: Scorer(settings(models, args.device, [metric]), cache).score(styles))
        print(f"{metric:<42}{sec:>9.2f}")

    one = styles[:1]
    checker = checker_way(scorer, one[0])
    print(f"\none style, {len(one[0].generated)} x {len(one[0].references)} pairs: checker's pair-by-pair vs jdiff")
    for metric in ("dinov2", "lpips"):
        fresh = Scorer(settings(models, args.device, [metric]))  # no cache: references computed too
        fresh.model(metric)
        _, ours = timed(lambda: fresh.score(one))
        print(f"{metric:<8} checker {checker[metric]:7.2f} s   jdiff {ours:6.2f} s   speed-up x{checker[metric] / ours:.1f}")


if __name__ == "__main__":
    main()
