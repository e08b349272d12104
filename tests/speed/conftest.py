"""Fixtures for the speed-up tests (``sharp_gen`` is shared, in tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture
def mixed_batch(sharp_gen):
    """Half the images on the generator's range (they converge fast), half random noise."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, sharp_gen.latent_dim, generator=g) / math.sqrt(sharp_gen.latent_dim)
    with torch.no_grad():
        on = sharp_gen(z)
    return torch.cat([on, torch.rand(4, 1, 8, 8, generator=g)])
