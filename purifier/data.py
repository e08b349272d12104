"""Datasets as tensors: IDX files (gzip or not) from a data directory that is a setting.

Search order for dataset ``name``: the ``data_dir`` given (or ``PURIFIER_DATA_DIR``), then
``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist``), ``../shared/datasets/<name>``,
and ``./data/<name>``. With ``download=True`` torchvision fetches the files into ``./data``
(needs internet; nothing here downloads unless asked).
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

DATASETS = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip- or xz-compressed) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:6] == b"\xfd7zXZ\x00":  # xz: ~15% smaller than gzip, for moving data sets around
            raw = lzma.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, lzma.LZMAError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: IDX body has {len(body)} bytes, header shape {shape} needs {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = []
    if data_dir:
        dirs += [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("PURIFIER_DATA_DIR")
    if env:
        dirs += [Path(env), Path(env) / name]
    here = Path(__file__).resolve().parent.parent
    dirs += [Path("/usr/share/datasets") / name, here.parent / "shared" / "datasets" / name,
             Path("data") / name, here / "data" / name]
    return dirs


def _find(name: str, stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in [base / (stem + ext) for base in (d, d / "raw") for ext in ("", ".gz", ".xz")]:
            if candidate.is_file():
                return candidate
    return None


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    source: str


def load(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
         download: bool = False) -> Split:
    """Load a dataset split as float images in [0, 1] and int64 labels."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    dirs = candidate_dirs(name, data_dir)
    img_stem, lbl_stem = _FILES[split]
    img_path, lbl_path = _find(name, img_stem, dirs), _find(name, lbl_stem, dirs)
    if (img_path is None or lbl_path is None) and download:
        import torchvision  # only imported when a user asks for the download

        getattr(torchvision.datasets, DATASETS[name])(root=f"data/{name}-tv", train=split == "train",
                                                       download=True)
        dirs.append(Path(f"data/{name}-tv") / DATASETS[name])
        img_path, lbl_path = _find(name, img_stem, dirs), _find(name, lbl_stem, dirs)
    if img_path is None or lbl_path is None:
        searched = ", ".join(str(d) for d in dirs)
        hint = ("`apt-get install dataset-fashion-mnist`, " if name == "fashion-mnist" else "")
        raise DataError(
            f"{name} {split} files ({img_stem}[.gz], {lbl_stem}[.gz]) not found in: {searched}. "
            f"Get them with {hint}--data-dir pointing at a folder holding the IDX files, "
            f"or --download (needs internet).")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{img_path} / {lbl_path}: expected (N,H,W) images and (N,) labels, "
                        f"got {images.shape} and {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, H, W)
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(x, y, str(img_path.parent))


def subset(split: Split, n: int | None, seed: int = 0) -> Split:
    """A seeded random choice of ``n`` examples (all when n is None or too large)."""
    if n is None or n >= len(split.labels):
        return split
    idx = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:n]
    return Split(split.images[idx], split.labels[idx], split.source)
