"""Checks on image batches before any compute, so nothing fails half-way."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InvalidInputError


def to_float_images(x, image_shape: tuple[int, int, int], max_batch: int | None = None) -> torch.Tensor:
    """Validate a batch and return it as float32 (B, C, H, W) in [0, 1].

    Accepts float tensors/arrays in [0, 1] or uint8 in 0..255, shape (B, C, H, W)
    (a single (C, H, W) image is not accepted: batches are explicit).
    """
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(x))
        elif np.issubdtype(x.dtype, np.floating):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        else:
            raise InvalidInputError(f"images must be float (0..1) or uint8 (0..255), got {x.dtype}")
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"images must be a tensor or array, got {type(x).__name__}")
    if x.dim() != 4:
        raise InvalidInputError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InvalidInputError("empty batch: send at least one image")
    if max_batch is not None and x.shape[0] > max_batch:
        raise InvalidInputError(f"batch of {x.shape[0]} images is above the limit of {max_batch}")
    c, h, w = image_shape
    if x.shape[1] != c:
        raise InvalidInputError(f"model expects {c} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if tuple(x.shape[2:]) != (h, w):
        raise InvalidInputError(f"model expects {h}x{w} images, got {x.shape[2]}x{x.shape[3]}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise InvalidInputError(f"images must be float (0..1) or uint8 (0..255), got {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise InvalidInputError("images contain NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x
