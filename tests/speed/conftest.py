"""Fixtures for the speed-up tests: a tiny generator whose output depends visibly on z."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture
def sharp_gen(tiny_gen):
    """tiny_gen with weights scaled x4 (pixel std ~0.05 across z; unscaled it is nearly constant)."""
    with torch.no_grad():
        for p in tiny_gen.parameters():
            p.mul_(4.0)
    return tiny_gen


@pytest.fixture
def mixed_batch(sharp_gen):
    """Half the images on the generator's range (they converge fast), half random noise."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, sharp_gen.latent_dim, generator=g) / math.sqrt(sharp_gen.latent_dim)
    with torch.no_grad():
        on = sharp_gen(z)
    return torch.cat([on, torch.rand(4, 1, 8, 8, generator=g)])
