"""CLIP with a ResNet image tower, in OpenAI's state-dict layout: the model behind the checker's CLIP-IQA.

torchmetrics' ``CLIPImageQualityAssessment()`` defaults to ``model_name_or_path="clip_iqa"``: piq's copy of
OpenAI's ``RN50.pt`` (a TorchScript archive, cached as ``~/.cache/clip/RN50.pt``). Its CLIP-IQA takes

* image features from the ResNet tower at the image's own size: pixels / data_range, normalised with
  OpenAI's mean and std, and the attention pool run *without* its positional embedding (so no resizing);
* text features of "Good photo." and "Bad photo.": CLIP BPE token ids zero-padded to the context length,
  read at the end-of-text token (the highest id of each row);
* ``softmax(100 * cosines)`` over the pair, the probability of "Good photo.".

The layer shapes are read from the state dict, so a tiny random-weight model and the real RN50 load
through the same code. Only the ResNet variants (RN50, RN101, RN50x4, ...) are covered here; ViT CLIPs
load through transformers (:class:`jdiff.scoring.clip.ClipEmbedder`).
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jdiff.scoring.models import MetricUnavailable, load_state_dict

# Where OpenAI's clip package and piq keep the file (a literal ~/.cache/clip, whatever XDG says).
OPENAI_CLIP_CACHE = Path("~/.cache/clip")
# piq downloads its own snapshot of OpenAI's RN50.pt first; that is what the checker loaded.
RN50_URL = "https://github.com/photosynthesis-team/piq/releases/download/v0.7.1/RN50.pt"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # OpenAI's rule for both towers: heads = width // 64
# Scalars OpenAI's TorchScript archive keeps beside the weights; they are read from the shapes instead.
ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ClipResNetShape:
    width: int  # channels after the stem; the stages have 4x, 8x, 16x, 32x that many outputs
    layers: tuple[int, int, int, int]  # bottlenecks per stage
    embed_dim: int  # the joint image-text space
    grid: int  # side of the final feature map at the native resolution (7 for RN50 at 224)
    text_width: int
    text_layers: int
    context_length: int
    vocab_size: int

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClipResNetShape":
        positions = state["visual.attnpool.positional_embedding"].shape[0]
        return cls(
            width=state["visual.layer1.0.conv1.weight"].shape[0],
            layers=tuple(len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{stage}.")})
                         for stage in (1, 2, 3, 4)),
            embed_dim=state["text_projection"].shape[1],
            grid=round((positions - 1) ** 0.5),
            text_width=state["ln_final.weight"].shape[0],
            text_layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
        )


# OpenAI's RN50, as its state dict describes it.
RN50_SHAPE = ClipResNetShape(width=64, layers=(3, 4, 6, 3), embed_dim=1024, grid=7, text_width=512, text_layers=12,
                             context_length=77, vocab_size=49408)


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 convolutions; a stride is an average pool after the 3x3 (and before the shortcut's 1x1)."""

    def __init__(self, inputs: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inputs, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride > 1 or inputs != 4 * planes:
            self.downsample = nn.Sequential(OrderedDict(
                [("0", nn.Conv2d(inputs, 4 * planes, 1, bias=False)), ("1", nn.BatchNorm2d(4 * planes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        shortcut = x if self.downsample is None else self.downsample(self.avgpool(x))
        return F.relu(out + shortcut)


class AttentionPool(nn.Module):
    """The mean of the feature map attends to itself and every position; its output is the image embedding."""

    def __init__(self, grid: int, channels: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, channels))
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(channels, channels) for _ in range(3))
        self.c_proj = nn.Linear(channels, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor, pos_embedding: bool) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # N, HW, C
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        if pos_embedding:
            if tokens.shape[1] != self.positional_embedding.shape[0]:
                side = round((self.positional_embedding.shape[0] - 1) ** 0.5)
                raise ValueError(f"the positional embedding fits a {side}x{side} feature map, got "
                                 f"{x.shape[2]}x{x.shape[3]}: use the native input size or pos_embedding=False")
            tokens = tokens + self.positional_embedding
        n, length, channels = tokens.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # N, L, C -> N, heads, L, C / heads
            return t.view(n, t.shape[1], self.heads, channels // self.heads).transpose(1, 2)

        # Only the mean token's output is used, so only its query is computed.
        pooled = F.scaled_dot_product_attention(split(self.q_proj(tokens[:, :1])), split(self.k_proj(tokens)),
                                                split(self.v_proj(tokens)))
        return self.c_proj(pooled.transpose(1, 2).reshape(n, channels))


class ResNetTower(nn.Module):
    """OpenAI's ModifiedResNet: a three-convolution stem with an average pool, four bottleneck stages, and
    attention pooling instead of global average pooling."""

    def __init__(self, shape: ClipResNetShape):
        super().__init__()
        half = shape.width // 2
        self.conv1, self.bn1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = nn.Conv2d(half, shape.width, 3, padding=1, bias=False), nn.BatchNorm2d(shape.width)
        self.avgpool = nn.AvgPool2d(2)
        inputs = shape.width
        for stage, blocks in enumerate(shape.layers):
            planes = shape.width * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for block in range(blocks):
                stage_blocks.append(Bottleneck(inputs, planes, stride if block == 0 else 1))
                inputs = 4 * planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.attnpool = AttentionPool(shape.grid, inputs, inputs // HEAD_WIDTH, shape.embed_dim)

    def forward(self, pixels: torch.Tensor, pos_embedding: bool) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(pixels)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x, pos_embedding)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, width // HEAD_WIDTH, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipResNet(nn.Module):
    """Both CLIP towers; parameter names are those of OpenAI's checkpoints."""

    def __init__(self, shape: ClipResNetShape):
        super().__init__()
        self.shape = shape
        self.visual = ResNetTower(shape)
        self.transformer = nn.ModuleDict(
            {"resblocks": nn.ModuleList(TextBlock(shape.text_width) for _ in range(shape.text_layers))})
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(shape.context_length, shape.text_width))
        self.ln_final = nn.LayerNorm(shape.text_width)
        self.text_projection = nn.Parameter(torch.zeros(shape.text_width, shape.embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))  # in the checkpoints; CLIP-IQA uses a fixed 100

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClipResNet":
        """The model the state dict describes, in float32 (OpenAI's files hold float16 weights)."""
        state = {k: v for k, v in state.items() if k not in ARCHIVE_EXTRAS}
        model = cls(ClipResNetShape.from_state_dict(state))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.eval()

    def encode_image(self, pixels: torch.Tensor, pos_embedding: bool = True) -> torch.Tensor:
        """Normalised pixels (N, 3, H, W) -> image embeddings (N, embed_dim), not unit length."""
        return self.visual(pixels, pos_embedding)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N, context_length), end-of-text the highest id of each row -> text embeddings (N, embed_dim)."""
        x = self.token_embedding(token_ids) + self.positional_embedding
        length = token_ids.shape[1]
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        for block in self.transformer["resblocks"]:
            x = block(x, causal_mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)] @ self.text_projection


def is_openai_weights(spec: str) -> bool:
    """Whether a ``clip_iqa_model`` value names an OpenAI-layout weights file (else a transformers model)."""
    return Path(spec).suffix in WEIGHT_SUFFIXES


def read_openai_state_dict(metric: str, path: Path) -> dict:
    """The state dict of OpenAI's TorchScript archive (``RN50.pt``), of a ``.safetensors`` file or of a
    ``torch.save``'d state dict. Of an archive only the tensors are read; none of its code runs."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error type for a damaged file
            raise MetricUnavailable(metric, f"cannot read {path} as safetensors ({err}).") from err
    if _is_torchscript_archive(path):
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as err:
            raise MetricUnavailable(metric, f"cannot read {path} as a TorchScript archive ({err}).") from err
    return load_state_dict(metric, path)


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold a ``constants.pkl`` beside the pickled module; ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())


def load_clip_resnet(metric: str, path: Path) -> ClipResNet:
    state = read_openai_state_dict(metric, path)
    if "visual.proj" in state:
        raise MetricUnavailable(metric, f"{path} holds a CLIP ViT; this loader takes the ResNet CLIPs (RN50.pt). "
                                        f"Give a ViT as a transformers folder or hub id instead.")
    try:
        return ClipResNet.from_state_dict(state)
    except (KeyError, RuntimeError) as err:  # a missing key while reading shapes, or missing/extra weights
        raise MetricUnavailable(metric, f"{path} is not a CLIP ResNet in OpenAI's layout ({err}).") from err


class ClipResNetEmbedder:
    """Unit-length image and text embeddings of a ResNet CLIP, prepared as torchmetrics' ``clip_iqa`` does."""

    def __init__(self, metric: str, weights: Path, tokenizer_folder: Path, device: torch.device, batch_size: int):
        from transformers import CLIPTokenizer

        self.model = load_clip_resnet(metric, weights).to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 images of any size, each at its own size (images of one size go through together)."""
        from jdiff.scoring.preprocess import batches_by_shape

        rows = np.zeros((len(images), self.model.shape.embed_dim), np.float32)
        for indices, batch in batches_by_shape(images, self.batch_size):
            pixels = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            features = self.model.encode_image((pixels - self.mean) / self.std, pos_embedding=False)
            rows[indices] = features.float().cpu().numpy()
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        length = self.model.shape.context_length
        token_ids = torch.zeros(len(texts), length, dtype=torch.long)
        for row, ids in enumerate(self.tokenizer(list(texts))["input_ids"]):
            if len(ids) > length:
                raise ValueError(f"{texts[row]!r} is {len(ids)} tokens long; the text tower takes {length}")
            token_ids[row, : len(ids)] = torch.tensor(ids)
        features = self.model.encode_text(token_ids.to(self.device)).float().cpu().numpy()
        return features / np.linalg.norm(features, axis=1, keepdims=True)
