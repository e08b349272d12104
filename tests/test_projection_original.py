"""The ``original`` preset against a literal transcription of the original Defense-GAN
reconstruction (kabkabm/defensegan, models/gan.py ``reconstruct``): z0 ~ N(0, 1/D), momentum
SGD (0.7, lr 10, every step), loss = per-image mean squared error summed over the B*R latents,
and the answer read from the last step's forward (the TF while-loop returns the images and
errors computed *before* its last update), lowest error among each image's restarts."""

from __future__ import annotations

import math

import torch
from torch import nn

from purifier.projection import ORIGINAL, PAPER, preset, project


class LinearGenerator(nn.Module):
    """G(z) = W z + 0.5 on 1x8x8 images: a quadratic error whose curvature ``scale`` sets, so lr=10
    makes real progress (scale 0.2) or overshoots (scale 1), unlike the tiny DCGAN's near-flat one."""

    latent_dim = 8

    def __init__(self, scale: float):
        super().__init__()
        self.weight = nn.Parameter(scale * torch.randn(8, 64, generator=torch.Generator().manual_seed(7)),
                                   requires_grad=False)

    def forward(self, z):
        return (z @ self.weight + 0.5).view(-1, 1, 8, 8)


def reference(generator, x: torch.Tensor, steps: int, restarts: int, seed: int, lr: float = 10.0):
    B, D = x.shape[0], generator.latent_dim
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, restarts, D, generator=gen) / math.sqrt(D)).reshape(B * restarts, D)
    target = x.repeat_interleave(restarts, dim=0)           # (B*R, C, H, W), tiled as tf.tile does
    accum = torch.zeros_like(z)
    images = errors = None
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        images = generator(z)                                # (B*R, C, H, W)
        errors = (images - target).pow(2).flatten(1).mean(1)  # (B*R,)
        (grad,) = torch.autograd.grad(errors.sum(), z)
        images, errors = images.detach(), errors.detach()    # the loop's outputs: before the update
        accum = 0.7 * accum + grad                           # tf.train.MomentumOptimizer
        z = z.detach() - lr * accum
    pick = errors.view(B, restarts).argmin(1)
    rows = torch.arange(B) * restarts + pick
    return images[rows], errors[rows]


def test_original_preset_is_the_original_reconstruction(tiny_gen):
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = preset("original", steps=12, restarts=3).with_(seed=4)
    assert (cfg.lr, cfg.momentum, cfg.optimizer, cfg.latent_radius, cfg.init_std) == (10.0, 0.7, "sgd", 0.0, None)
    for generator in (tiny_gen, LinearGenerator(0.2)):
        ours = project(generator, x, cfg)
        images, errors = reference(generator, x, 12, 3, seed=4)
        torch.testing.assert_close(ours.images, images, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.errors, errors, rtol=1e-4, atol=1e-7)
    start = reference(generator, x, 1, 3, seed=4)[1]
    assert (start - errors > 1e-3).all()  # the linear generator really moves z: the test sees the updates


def test_paper_differs_from_original_only_in_choosing_the_best_step():
    """Same starts, same trajectory: PAPER answers with the best step seen, so its error is never
    above ORIGINAL's; where lr=10 overshoots (a steep G), the original's last step is far worse."""
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    generator = LinearGenerator(1.0)
    last = project(generator, x, ORIGINAL.with_(steps=8, restarts=2, seed=2))
    best = project(generator, x, PAPER.with_(steps=8, restarts=2, seed=2))
    torch.testing.assert_close(last.errors, reference(generator, x, 8, 2, seed=2)[1], rtol=1e-4, atol=1e-7)
    assert (best.errors <= last.errors).all()
    assert (best.errors < 0.5 * last.errors).all()
