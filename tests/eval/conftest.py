"""Fixtures for the evaluation tests: a toy task a classifier learns in a second, and a
tiny IDX dataset shaped like the tiny generator's images (1x8x8)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch import nn

from purifier.models import Classifier


@pytest.fixture(autouse=True)
def one_thread():
    """These tests use tiny tensors: with two threads on a busy two-core machine each op waits on
    the thread pool (measured 40x slower than one thread), so run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 1x8x8 images in [0, 1]: the top half a little brighter than the bottom
    or the other way round, plus noise; separable, and flipped by an L-inf change of ~0.15."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.4 + 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    sign = (1 - 2 * y).float().view(n, 1, 1, 1)
    x[:, :, :4] += 0.15 * sign
    x[:, :, 4:] -= 0.15 * sign
    return x.clamp(0, 1), y


def train_toy(arch: str = "D", seed: int = 0, steps: int = 60) -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, above all on a busy machine
    try:
        return _train_toy(arch, seed, steps)
    finally:
        torch.set_num_threads(threads)


def _train_toy(arch: str, seed: int, steps: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Classifier(arch, 1, 8, 8, num_classes=2)
    x, y = toy_data(256, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        # label smoothing keeps the logits moderate, so float32 gradients do not vanish
        nn.functional.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def toy_classifier() -> nn.Module:
    model = train_toy()
    x, y = toy_data(256, seed=1)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95  # the toy task is learnt
    return model


def write_idx(path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A folder with MNIST-named IDX files holding 8x8 images (train 300, test 120)."""
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    for stem, n in (("train", 300), ("t10k", 120)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 8, 8)) * 255).astype(np.uint8)
        write_idx(d / f"{stem}-images-idx3-ubyte", images)
        write_idx(d / f"{stem}-labels-idx1-ubyte", labels)
    return d


@pytest.fixture(scope="session")
def make_toy_data():
    return toy_data


@pytest.fixture(scope="session")
def train_toy_classifier():
    return train_toy
