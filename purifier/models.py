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


def blocks_for(height: int, width: int) -> int:
    """How many stride-2 stages the family uses for an image: halve (rounding up) until the
    larger side is at most 4. 28 -> 3 (the paper's 4 -> 7 -> 14 -> 28), 32 -> 3, 64 -> 4."""
    size, blocks = max(height, width), 0
    while size > 4:
        size, blocks = math.ceil(size / 2), blocks + 1
    return max(blocks, 1)


def _sizes(size: int, blocks: int) -> list[int]:
    """Spatial sizes from the generator's first feature map to the image: [s0, ..., size]."""
    out = [size]
    for _ in range(blocks):
        out.insert(0, math.ceil(out[0] / 2))
    return out


class Generator(nn.Module):
    """Defense-GAN's generator (Gulrajani et al.'s WGAN-GP MNIST generator), as a DCGAN-style
    family over image shapes.

    FC latent->s0*s0*(2^(k-1))d, then k 5x5 stride-2 deconvolutions halving the width
    (..., 2d, d, C) with ReLU between, sigmoid out; each doubling that overshoots the target is
    cropped. ``blocks`` k=3 is the paper's exact network (28x28: FC->4d*4*4, deconv->2d 8x8
    cropped to 7x7, ->d 14x14, ->C 28x28); :func:`blocks_for` picks k from the image size
    (32x32: 3, 64x64: 4). No batch norm, as the paper's: the projection differentiates G one
    image at a time and the critic's gradient penalty is per sample.
    """

    def __init__(self, latent_dim: int = 128, channels: int = 1, height: int = 28,
                 width: int = 28, dim: int = 64, blocks: int = 3):
        super().__init__()
        if height % 4 or width % 4:
            raise ValueError(f"generator image size must be divisible by 4, got {height}x{width}")
        if blocks < 1:
            raise ValueError(f"generator needs at least one block, got {blocks}")
        # Configs saved before the family existed have no "blocks": 3, the paper's, is the default.
        self.config = dict(arch="dcgan", latent_dim=latent_dim, channels=channels,
                           height=height, width=width, dim=dim, blocks=blocks)
        self.latent_dim = latent_dim
        self.image_shape = ImageShape(channels, height, width)
        self.hs, self.ws = _sizes(height, blocks), _sizes(width, blocks)
        self.h0, self.w0 = self.hs[0], self.ws[0]
        self.dim = dim
        self.widths = [dim * 2 ** (blocks - 1 - i) for i in range(blocks)] + [channels]  # 4d, 2d, d, C
        self.fc = nn.Linear(latent_dim, self.widths[0] * self.h0 * self.w0)
        for i in range(blocks):  # up1, up2, ...: the paper's parameter names
            setattr(self, f"up{i + 1}", _deconv(self.widths[i], self.widths[i + 1]))
        self.blocks = blocks

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(z)).view(-1, self.widths[0], self.h0, self.w0)  # (N, 4d, h0, w0)
        for i in range(1, self.blocks + 1):
            # (N, widths[i], hs[i], ws[i]); slicing to the full size is a no-op view
            x = getattr(self, f"up{i}")(x)[:, :, : self.hs[i], : self.ws[i]]
            x = torch.relu(x) if i < self.blocks else torch.sigmoid(x)
        return x                                                                 # (N, C, H, W)


def subpixel_weights(deconv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's 5x5 stride-2 transposed convolution (padding 2, output padding 1) as a
    3x3 convolution (padding 1) with 4x the output channels, to be followed by a 2x pixel
    shuffle: output pixel (2i + a, 2j + b) only ever sees inputs i-1..i+1, j-1..j+1, through
    kernel tap (a + 4 - 2t, b + 4 - 2u) for input offset (t - 1, u - 1) (taps outside 0..4
    are zero). Returns (weight (4*Cout, Cin, 3, 3), bias (4*Cout,)), channel c*4 + 2a + b as
    ``F.pixel_shuffle`` expects."""
    w = deconv.weight.detach()                                   # (Cin, Cout, 5, 5)
    cin, cout = w.shape[:2]
    out = w.new_zeros(cout, 2, 2, cin, 3, 3)
    for a in range(2):
        for t in range(3):
            k = a + 4 - 2 * t
            if not 0 <= k <= 4:
                continue
            for b in range(2):
                for u in range(3):
                    m = b + 4 - 2 * u
                    if 0 <= m <= 4:
                        out[:, a, b, :, t, u] = w[:, :, k, m].T
    bias = deconv.bias.detach() if deconv.bias is not None else w.new_zeros(cout)
    return out.reshape(4 * cout, cin, 3, 3).contiguous(), bias.repeat_interleave(4).contiguous()


class SubpixelGenerator(nn.Module):
    """The function a :class:`Generator` computes, with each transposed convolution rewritten
    as a plain 3x3 convolution and a pixel shuffle (:func:`subpixel_weights`): dense
    convolutions whose forward and input-gradient are implicit GEMMs, instead of the strided
    transposed convolutions that take ~98% of a latent-step (docs/speed.md; issue 15, item 3).
    Built from a generator's weights at construction, for a frozen generator (projection):
    later changes to the source generator's weights are not followed. Same config, so the rest
    of purifier treats it as that generator."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.config = dict(generator.config)
        self.latent_dim, self.image_shape = generator.latent_dim, generator.image_shape
        self.hs, self.ws, self.widths, self.blocks = generator.hs, generator.ws, generator.widths, generator.blocks
        self.h0, self.w0 = generator.h0, generator.w0
        like = dict(device=generator.fc.weight.device, dtype=generator.fc.weight.dtype)
        self.fc = nn.Linear(generator.fc.in_features, generator.fc.out_features, **like)
        self.fc.load_state_dict(generator.fc.state_dict())
        self.ups = nn.ModuleList()
        for i in range(1, generator.blocks + 1):
            weight, bias = subpixel_weights(getattr(generator, f"up{i}"))
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, **like)
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)
            self.ups.append(conv)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(z)).view(-1, self.widths[0], self.h0, self.w0)
        for i, conv in enumerate(self.ups, start=1):
            x = self.upsample(conv, x)[:, :, : self.hs[i], : self.ws[i]]
            x = torch.relu(x) if i < self.blocks else torch.sigmoid(x)
        return x

    def upsample(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """One doubling: (N, Cin, h, w) -> (N, Cout, 2h, 2w), before the crop and activation."""
        return nn.functional.pixel_shuffle(conv(x), 2)


class Critic(nn.Module):
    """WGAN-GP critic: ``blocks`` 5x5 stride-2 convs (d, 2d, 4d, ...), LeakyReLU 0.2, linear -> 1.

    No batch norm: the gradient penalty is per-sample and batch norm would break it.
    ``blocks`` 3 is the paper's critic; the family picks it with :func:`blocks_for`.
    """

    def __init__(self, channels: int = 1, height: int = 28, width: int = 28, dim: int = 64,
                 blocks: int = 3):
        super().__init__()
        self.config = dict(arch="dcgan-critic", channels=channels, height=height, width=width, dim=dim,
                           blocks=blocks)
        self.image_shape = ImageShape(channels, height, width)
        layers: list[nn.Module] = []
        cin, h, w = channels, height, width
        for i in range(blocks):
            layers += [nn.Conv2d(cin, dim * 2 ** i, 5, 2, 2), nn.LeakyReLU(0.2)]
            cin, h, w = dim * 2 ** i, (h + 1) // 2, (w + 1) // 2
        self.net = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * h * w, 1)

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
                 width: int = 28, dim: int = 64, blocks: int = 3):
        super().__init__()
        self.config = dict(arch="encoder", latent_dim=latent_dim, channels=channels,
                           height=height, width=width, dim=dim, blocks=blocks)
        self.image_shape = ImageShape(channels, height, width)
        self.trunk = Critic(channels, height, width, dim, blocks)
        self.trunk.fc = nn.Linear(self.trunk.fc.in_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.fc(self.trunk.net(x).flatten(1))  # (N, latent)


def gan_pair(channels: int, height: int, width: int, latent_dim: int = 128,
             dim: int = 64) -> tuple[Generator, Critic]:
    """The family member for an image shape: G and D with :func:`blocks_for` stages (for
    28x28 the paper's networks, layer for layer)."""
    blocks = blocks_for(height, width)
    return (Generator(latent_dim, channels, height, width, dim, blocks),
            Critic(channels, height, width, dim, blocks))


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
