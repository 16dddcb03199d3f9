"""FID as torchmetrics' ``FrechetInceptionDistance(feature=N)`` computes it, without torchvision.

torchmetrics takes its features from torch-fidelity's ``FeatureExtractorInceptionV3``: the TensorFlow
FID Inception v3 (``pt_inception-2015-12-05``), fed uint8 images resized to 299x299 with TensorFlow 1's
bilinear rule and scaled by ``(x - 128) / 128``. ``feature`` picks the layer: 64 (the first max pool,
after ``Conv2d_2b_3x3``), 192 (the second max pool), 768 (after ``Mixed_6e``) or 2048 (the final average
pool); each is averaged over the pixels. The modules below carry torch-fidelity's parameter names, so its
``weights-inception-2015-12-05-6726825d.pth`` loads as is, and only the blocks the chosen layer needs are
built (the challenge's ``feature=64`` needs three convolutions).

FID = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr(sqrt(S_r S_g)), with unbiased covariances, the trace
of the square root taken as the sum of square roots of the eigenvalues of S_r S_g, in float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jdiff.validate import FID_FEATURES as FEATURES

INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for k in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{k}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for k in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{k}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last two blocks; the TF graph pools by average in ``Mixed_7b`` and by max in ``Mixed_7c``."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's bilinear resize (no half-pixel offset): output pixel i samples input at i * in / out.

    Interpolates along the width first, then the height, in the order torch-fidelity does.
    """

    def axis(n_in: int):
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo.float()).to(x.dtype)

    y_lo, y_hi, dy = axis(x.shape[2])
    x_lo, x_hi, dx = axis(x.shape[3])
    left, right = x[:, :, :, x_lo], x[:, :, :, x_hi]
    rows = left + (right - left) * dx
    top, bottom = rows[:, :, y_lo], rows[:, :, y_hi]
    return top + (bottom - top) * dy.view(-1, 1)


class InceptionFeatures(nn.Module):
    """The FID Inception v3 up to the layer that gives ``feature``-dimensional features."""

    def __init__(self, feature: int = 64):
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"score.fid_feature={feature} is invalid: use one of {', '.join(map(str, FEATURES))}.")
        self.feature = feature
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        stages = [[self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, nn.MaxPool2d(3, stride=2)]]
        if feature >= 192:
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            stages.append([self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, nn.MaxPool2d(3, stride=2)])
        if feature >= 768:
            self.Mixed_5b = InceptionA(192, pool_features=32)
            self.Mixed_5c = InceptionA(256, pool_features=64)
            self.Mixed_5d = InceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = InceptionC(768, channels_7x7=128)
            self.Mixed_6c = InceptionC(768, channels_7x7=160)
            self.Mixed_6d = InceptionC(768, channels_7x7=160)
            self.Mixed_6e = InceptionC(768, channels_7x7=192)
            stages.append([self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                           self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e])
        if feature == 2048:
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280, max_pool=False)
            self.Mixed_7c = InceptionE(2048, max_pool=True)
            stages.append([self.Mixed_7a, self.Mixed_7b, self.Mixed_7c])
        self.layers = [layer for stage in stages for layer in stage]  # a plain list: no extra parameter names

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> N x feature (float32)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
        x = resize_like_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        for layer in self.layers:
            x = layer(x)
        return x.mean(dim=(2, 3))


def load_inception(path: Path, feature: int, device: torch.device) -> InceptionFeatures:
    """The layers ``feature`` needs, from torch-fidelity's Inception state dict (other keys are ignored)."""
    from jdiff.scoring.models import MetricUnavailable, load_state_dict

    net = InceptionFeatures(feature)
    state = load_state_dict("fid", path)
    # BatchNorm's step counter plays no part in inference and some converted files omit it.
    needed = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise MetricUnavailable("fid", f"{path} lacks {len(missing)} Inception weights, e.g. {missing[:3]}; "
                                       "expected torch-fidelity's weights-inception-2015-12-05-6726825d.pth.")
    try:
        net.load_state_dict({k: state[k] for k in needed}, strict=False)
    except RuntimeError as err:
        raise MetricUnavailable("fid", f"{path} does not fit the FID Inception network: {err}") from err
    return net.eval().to(device)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, as torchmetrics computes it (eigenvalues of S1 S2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    eig = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    # sqrt of a tiny negative rounding error is imaginary; its real part is 0, as in torchmetrics
    trace_sqrt = np.sqrt(eig).real.sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(generated: np.ndarray, references: np.ndarray) -> float:
    """FID between two feature sets (rows are images); each set needs at least two images."""
    for name, feats in (("generated", generated), ("reference", references)):
        if len(feats) < 2:
            raise ValueError(f"FID needs at least 2 {name} images, got {len(feats)}")
    g, r = np.asarray(generated, np.float64), np.asarray(references, np.float64)
    return frechet_distance(r.mean(0), np.cov(r, rowvar=False), g.mean(0), np.cov(g, rowvar=False))
