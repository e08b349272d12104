"""Offline purification of files: PNG images, or an IDX / NPY batch.

Reads every input first and validates the whole batch before any compute, so a bad
file fails the run at once, naming the file, rather than half-way through. Image files are
read and decoded within the service's bounds (``validation.decode_images``): a file over
``DecodeLimits.max_bytes`` is refused from its size before it is read, anything but PNG/JPEG
or a size other than the model's from its header before it is decoded (a 12000x12000 PNG
costs 24 bytes of reading, not gigabytes of pixels), and a corrupt file is an error, never
a crash.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import ModelBundle
from .data import read_idx
from .errors import DataError, InvalidInputError
from .projection import ProjectionConfig, project
from .validation import DecodeLimits, decode_images, to_float_images


@dataclass
class Inputs:
    images: torch.Tensor  # (N, C, H, W) float in [0, 1]
    names: list[str]      # one per image, used for output file names
    batch_file: bool      # True for IDX/NPY input: write one .npy back


def _image_file(path: Path, image_shape: tuple[int, int, int], limits: DecodeLimits = DecodeLimits(max_images=1)
                ) -> np.ndarray:
    """One PNG/JPEG file -> uint8 (C, H, W), decoded as the service decodes a request's files."""
    size = path.stat().st_size
    if size > limits.max_bytes:  # before reading it: a file is not read whole into memory on trust
        raise InvalidInputError(f"{path}: file of {size} bytes is above the limit of {limits.max_bytes} bytes "
                                "for one image")
    return decode_images([path.read_bytes()], image_shape, limits, names=[str(path)])[0]


def read_inputs(paths: list[str | Path], image_shape: tuple[int, int, int]) -> Inputs:
    paths = [Path(p) for p in paths]
    if not paths:
        raise InvalidInputError("no input files given")
    for p in paths:
        if not p.is_file():
            raise InvalidInputError(f"input file {p} does not exist")
    batch_like = [p for p in paths if p.suffix == ".npy" or "idx" in p.name or p.suffix == ".gz"]
    if batch_like:
        if len(paths) != 1:
            raise InvalidInputError("give either image files or one IDX/NPY batch, not several batches")
        p = paths[0]
        if p.suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)  # no pickle: a data file must not run code
            except (ValueError, OSError) as exc:
                raise InvalidInputError(f"{p}: not a readable .npy array ({exc})") from exc
        else:
            try:
                arr = read_idx(p)
            except DataError as exc:
                raise InvalidInputError(str(exc)) from exc
        if arr.ndim == 3:  # (N, H, W) grey images, as IDX stores them
            arr = arr[:, None]
        try:
            x = to_float_images(arr, image_shape)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{p}: {exc}") from exc
        stem = p.name.split(".")[0]
        return Inputs(x, [f"{stem}-{i:05d}" for i in range(len(x))], True)
    arrays = []
    for p in paths:
        arrays.append(_image_file(p, image_shape))                       # (C, H, W) uint8
    x = to_float_images(np.stack(arrays), image_shape)
    return Inputs(x, [p.stem for p in paths], False)


def purify_files(bundle: ModelBundle, paths: list[str | Path], out_dir: str | Path,
                 cfg: ProjectionConfig, batch_size: int = 256, device: str = "cpu",
                 progress: bool = True) -> dict:
    """Purify the files and write purified images plus ``errors.csv`` / ``errors.json``."""
    from torchvision.utils import save_image

    inputs = read_inputs(paths, bundle.image_shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    purified, errors = [], []
    starts = range(0, len(inputs.images), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="purify", unit="batch")
    for i in starts:
        x = inputs.images[i: i + batch_size].to(device)
        batch_cfg = cfg if cfg.seed is None else cfg.with_(seed=cfg.seed + i)
        result = project(bundle.generator, x, batch_cfg, bundle.encoder)
        purified.append(result.images.cpu())
        errors.append(result.errors.cpu())
    images = torch.cat(purified)   # (N, C, H, W)
    err = torch.cat(errors)        # (N,)
    threshold = bundle.threshold
    rows = [{"name": n, "reconstruction_error": float(e),
             "adversarial": (bool(e > threshold) if threshold is not None else None)}
            for n, e in zip(inputs.names, err)]
    if inputs.batch_file:
        np.save(out / "purified.npy", images.numpy())
    else:
        for n, img in zip(inputs.names, images):
            save_image(img, str(out / f"{n}.png"))
    with open(out / "errors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "reconstruction_error", "adversarial"])
        w.writeheader()
        w.writerows(rows)
    summary = {"images": len(rows), "threshold": threshold, "settings": cfg.__dict__,
               "mean_reconstruction_error": float(err.mean()), "results": rows}
    (out / "errors.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
