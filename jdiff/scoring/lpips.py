"""LPIPS with the SqueezeNet backbone (LPIPS v0.1, ``net_type='squeeze'``), as torchmetrics computes it.

The network is written here so that it needs no torchvision: a SqueezeNet 1.1 feature stack whose
parameters carry torchvision's names (``features.3.squeeze.weight``...), so torchvision's
``squeezenet1_1-b8a52dc0.pth`` loads into it as is, and the seven LPIPS linear heads named as in the
lpips package's ``squeeze.pth`` (``lin0.model.1.weight``...).

LPIPS(a, b) = sum over the 7 ReLU outputs k of mean over pixels of ``w_k . (f_k(a) - f_k(b))**2``, where
``f_k`` is the layer's activation scaled to unit length along the channels and ``w_k`` the learnt
per-channel weights. Inputs are RGB in [-1, 1], shifted and scaled first as LPIPS does.

Because a distance only needs each image's normalised activations, every image goes through the network
once and all (generated, reference) pairs are compared from those activations (see mean_pairwise_lpips).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# (squeeze, expand1x1, expand3x3) channels of SqueezeNet 1.1's Fire modules, at their index in `features`.
FIRES = {3: (16, 64, 64), 4: (16, 64, 64), 6: (32, 128, 128), 7: (32, 128, 128), 9: (48, 192, 192),
         10: (48, 192, 192), 11: (64, 256, 256), 12: (64, 256, 256)}
POOLS = (2, 5, 8)
# The layers LPIPS compares: outputs of features[1] (the first ReLU) and of these Fire modules.
TAPS = (1, 4, 7, 9, 10, 11, 12)
TAP_CHANNELS = (64, 128, 256, 384, 384, 512, 512)
# LPIPS's input normalisation (its ScalingLayer).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class Fire(nn.Module):
    def __init__(self, in_channels: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], dim=1)


def squeezenet_features() -> nn.Sequential:
    """SqueezeNet 1.1's ``features`` stack, with torchvision's module indices."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU()]
    channels = 64
    for index in range(2, 13):
        if index in POOLS:
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        else:
            squeeze, e1, e3 = FIRES[index]
            layers.append(Fire(channels, squeeze, e1, e3))
            channels = e1 + e3
    return nn.Sequential(*layers)


class LinearHead(nn.Module):
    """One LPIPS head: (dropout, 1x1 conv to one channel); only the conv has weights (``model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LpipsSqueeze(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = squeezenet_features()
        for k, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    @property
    def heads(self) -> list[LinearHead]:
        return [getattr(self, f"lin{k}") for k in range(len(TAPS))]

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised activations of the 7 compared layers, for images in [-1, 1] (N x 3 x H x W)."""
        x = (x - self.shift) / self.scale
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + EPS))
        return out

    @torch.no_grad()
    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS between activations ``a`` and ``b`` (broadcast along the batch): one value per pair."""
        total = 0.0
        for head, fa, fb in zip(self.heads, a, b):
            total = total + head((fa - fb).square()).mean(dim=(1, 2, 3))
        return total


def load_lpips(backbone: Path, head: Path, device: torch.device) -> LpipsSqueeze:
    """SqueezeNet weights from torchvision's file, linear heads from the lpips ``squeeze.pth``."""
    from jdiff.scoring.models import MetricUnavailable, load_state_dict

    net = LpipsSqueeze()
    state = {k: v for k, v in load_state_dict("lpips", backbone).items() if k.startswith("features.")}
    state.update(load_state_dict("lpips", head))
    expected = set(net.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise MetricUnavailable("lpips", f"{backbone} + {head} lack {len(missing)} weights, e.g. {missing[:3]}; "
                                         "expected torchvision's squeezenet1_1 and lpips v0.1 squeeze.pth.")
    try:
        net.load_state_dict({k: state[k] for k in expected})
    except RuntimeError as err:
        raise MetricUnavailable("lpips", f"{backbone} + {head} do not fit SqueezeNet 1.1 LPIPS: {err}") from err
    return net.eval().to(device)


@torch.no_grad()
def mean_pairwise_lpips(net: LpipsSqueeze, generated: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """Mean LPIPS over all (generated, reference) pairs, from per-layer activations (N x C x H x W each).

    Per layer, ``mean_pixels w.(a - b)**2 = mean(w.a**2) + mean(w.b**2) - 2 mean(w.(a*b))``, so the
    cross terms of all pairs are one matrix product instead of a difference tensor per pair (in float64,
    so the subtraction loses nothing that matters).
    """
    total = 0.0
    for head, a, b in zip(net.heads, generated, references):
        w = head.model[1].weight.view(1, -1, 1, 1).double()
        a, b = a.double(), b.double()
        pixels = a.shape[2] * a.shape[3]
        wa = w * a
        own_a = (wa * a).sum(dim=(1, 2, 3)) / pixels
        own_b = (w * b.square()).sum(dim=(1, 2, 3)) / pixels
        cross = wa.flatten(1) @ b.flatten(1).T / pixels
        total += float((own_a[:, None] + own_b[None, :] - 2 * cross).mean())
    return total
