"""Network architectures: the Defense-GAN generator and critic, and the paper's classifiers.

Every module is built from a small JSON-serialisable config (a dict), so a checkpoint can
describe itself: the config travels in the safetensors metadata beside the weights
(see ``purifier.checkpoint``). Nothing here hard-codes 1x28x28: image shape and latent
size come from the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ImageShape:
    channels: int = 1
    height: int = 28
    width: int = 28

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    # 5x5, stride 2, doubles the spatial size exactly (TF "SAME" transposed conv).
    return nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)


class Generator(nn.Module):
    """Defense-GAN's generator (Gulrajani et al.'s WGAN-GP MNIST generator).

    FC latent->4*4*4d, ReLU, deconv->2d, ReLU, crop, deconv->d, ReLU, deconv->C, sigmoid.
    For 28x28 the crop takes 8x8 to 7x7; in general the three deconvolutions produce
    ceil(H/8) -> H/4 -> H/2 -> H, cropping where doubling overshoots.
    """

    def __init__(self, latent_dim: int = 128, channels: int = 1, height: int = 28,
                 width: int = 28, dim: int = 64):
        super().__init__()
        if height % 4 or width % 4:
            raise ValueError(f"generator image size must be divisible by 4, got {height}x{width}")
        self.config = dict(arch="dcgan", latent_dim=latent_dim, channels=channels,
                           height=height, width=width, dim=dim)
        self.latent_dim = latent_dim
        self.image_shape = ImageShape(channels, height, width)
        self.h1, self.w1 = height // 4, width // 4
        self.h0, self.w0 = math.ceil(self.h1 / 2), math.ceil(self.w1 / 2)
        self.dim = dim
        self.fc = nn.Linear(latent_dim, 4 * dim * self.h0 * self.w0)
        self.up1 = _deconv(4 * dim, 2 * dim)
        self.up2 = _deconv(2 * dim, dim)
        self.up3 = _deconv(dim, channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(z)).view(-1, 4 * self.dim, self.h0, self.w0)  # (N, 4d, h0, w0)
        x = torch.relu(self.up1(x))[:, :, : self.h1, : self.w1]               # (N, 2d, H/4, W/4)
        x = torch.relu(self.up2(x))                                           # (N, d, H/2, W/2)
        return torch.sigmoid(self.up3(x))                                     # (N, C, H, W)


class Critic(nn.Module):
    """WGAN-GP critic: three 5x5 stride-2 convs (d, 2d, 4d), LeakyReLU 0.2, linear -> 1.

    No batch norm: the gradient penalty is per-sample and batch norm would break it.
    """

    def __init__(self, channels: int = 1, height: int = 28, width: int = 28, dim: int = 64):
        super().__init__()
        self.config = dict(arch="dcgan-critic", channels=channels, height=height, width=width, dim=dim)
        self.net = nn.Sequential(
            nn.Conv2d(channels, dim, 5, 2, 2), nn.LeakyReLU(0.2),
            nn.Conv2d(dim, 2 * dim, 5, 2, 2), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * dim, 4 * dim, 5, 2, 2), nn.LeakyReLU(0.2),
        )
        h, w = height, width
        for _ in range(3):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.fc = nn.Linear(4 * dim * h * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x).flatten(1)).squeeze(1)  # (N,)


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


class Classifier(nn.Module):
    """The Defense-GAN paper's classifiers (Table 1), for C x H x W inputs in [0, 1].

    A: conv64 5x5, conv64 5x5 s2, dropout .25, FC128, dropout .5, FC10.
    B: dropout .2, conv64 8x8 s2, conv128 6x6 s2, conv128 5x5, dropout .5, FC10.
    C: conv128 3x3, conv64 3x3, dropout .25, FC128, dropout .5, FC10.
    D: FC200, dropout .5, FC200, dropout .5, FC10.
    """

    ARCHS = ("A", "B", "C", "D")

    def __init__(self, arch: str = "A", channels: int = 1, height: int = 28, width: int = 28,
                 num_classes: int = 10):
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"unknown classifier architecture {arch!r}; choose one of {self.ARCHS}")
        self.config = dict(arch=arch, channels=channels, height=height, width=width,
                           num_classes=num_classes)
        self.image_shape = ImageShape(channels, height, width)
        h, w = height, width
        if arch == "A":
            layers: list[nn.Module] = [nn.Conv2d(channels, 64, 5), nn.ReLU(),
                                       nn.Conv2d(64, 64, 5, 2), nn.ReLU(), nn.Dropout(0.25)]
            h, w = _conv_out(_conv_out(h, 5, 1, 0), 5, 2, 0), _conv_out(_conv_out(w, 5, 1, 0), 5, 2, 0)
            head = [nn.Flatten(), nn.Linear(64 * h * w, 128), nn.ReLU(), nn.Dropout(0.5),
                    nn.Linear(128, num_classes)]
        elif arch == "B":
            layers = [nn.Dropout(0.2), nn.Conv2d(channels, 64, 8, 2, 3), nn.ReLU(),
                      nn.Conv2d(64, 128, 6, 2), nn.ReLU(), nn.Conv2d(128, 128, 5), nn.ReLU(),
                      nn.Dropout(0.5)]
            for k, s, p in ((8, 2, 3), (6, 2, 0), (5, 1, 0)):
                h, w = _conv_out(h, k, s, p), _conv_out(w, k, s, p)
            head = [nn.Flatten(), nn.Linear(128 * h * w, num_classes)]
        elif arch == "C":
            layers = [nn.Conv2d(channels, 128, 3), nn.ReLU(), nn.Conv2d(128, 64, 3), nn.ReLU(),
                      nn.Dropout(0.25)]
            h, w = h - 4, w - 4
            head = [nn.Flatten(), nn.Linear(64 * h * w, 128), nn.ReLU(), nn.Dropout(0.5),
                    nn.Linear(128, num_classes)]
        else:  # D
            layers = []
            head = [nn.Flatten(), nn.Linear(channels * h * w, 200), nn.ReLU(), nn.Dropout(0.5),
                    nn.Linear(200, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, num_classes)]
        if h <= 0 or w <= 0:
            raise ValueError(f"image {height}x{width} is too small for classifier {arch}")
        self.net = nn.Sequential(*layers, *head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, num_classes) logits


class Encoder(nn.Module):
    """Maps an image to a latent, used to start the projection near the answer
    (the "invert and defend" idea). Same trunk as the critic."""

    def __init__(self, latent_dim: int = 128, channels: int = 1, height: int = 28,
                 width: int = 28, dim: int = 64):
        super().__init__()
        self.config = dict(arch="encoder", latent_dim=latent_dim, channels=channels,
                           height=height, width=width, dim=dim)
        self.trunk = Critic(channels, height, width, dim)
        self.trunk.fc = nn.Linear(self.trunk.fc.in_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.fc(self.trunk.net(x).flatten(1))  # (N, latent)


def build(kind: str, config: dict) -> nn.Module:
    """Build a module from the config saved beside its weights."""
    cfg = dict(config)
    arch = cfg.pop("arch")
    if kind == "generator":
        if arch != "dcgan":
            raise ValueError(f"unknown generator architecture {arch!r}")
        return Generator(**cfg)
    if kind == "critic":
        return Critic(**cfg)
    if kind == "classifier":
        return Classifier(arch=arch, **cfg)
    if kind == "encoder":
        return Encoder(**cfg)
    raise ValueError(f"unknown model kind {kind!r}")
