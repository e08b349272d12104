"""Checks on image batches before any compute, so nothing fails half-way; and image files
(PNG/JPEG) decoded within bounds, for the service and ``purifier purify`` alike.

Encoded files are checked from their headers before anything is decoded (:func:`check_files`):
PNG or JPEG only, each exactly the model's height x width (the decoder allocates what the
header claims, so a 12000x12000 PNG of 1 KB is refused here, not after gigabytes of pixels),
at most ``DecodeLimits.max_images`` files and ``max_bytes`` bytes at a time. Decoder messages
(library paths, build directories) go to the log, never into the error.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidInputError

log = logging.getLogger("purifier.validation")


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


# --- image files -------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeLimits:
    """What one call may ask the image decoder to do (one request, in the service: docs/service.md)."""
    max_images: int = 64                 # files per call (the batch limit)
    max_bytes: int = 8 * 1024 * 1024     # encoded bytes per call, all files together


_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(blob: bytes) -> tuple[str, int, int] | None:
    """(format, height, width) read from a PNG's IHDR or a JPEG's start-of-frame segment,
    without decoding; None when the bytes are neither (or the header is cut short)."""
    if blob[:8] == _PNG:
        if len(blob) < 24 or blob[12:16] != b"IHDR":
            return None
        width, height = struct.unpack_from(">II", blob, 16)
        return "PNG", height, width
    if blob[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(blob):  # segments: 0xFF, marker, 2-byte length (which counts itself)
        if blob[i] != 0xFF:
            return None
        marker = blob[i + 1]
        if marker == 0xFF:                      # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):              # end of image / start of scan before any frame
            return None
        (length,) = struct.unpack_from(">H", blob, i + 2)
        if marker in _SOF:
            if i + 9 > len(blob) or length < 7:
                return None
            height, width = struct.unpack_from(">HH", blob, i + 5)
            return "JPEG", height, width
        if length < 2:
            return None
        i += 2 + length
    return None


def _labels(n: int, names: list[str] | None) -> list[str]:
    return list(names) if names is not None else [f"image {i}" for i in range(n)]


def check_files(blobs: list[bytes], image_shape: tuple[int, int, int], limits: DecodeLimits = DecodeLimits(),
                names: list[str] | None = None) -> None:
    """Refuse, before any decoding, what the headers already show to be wrong: too many
    files, too many bytes, something other than PNG/JPEG, a size other than the model's.
    ``names`` label the files in messages (default ``image 0``, ``image 1``, ...)."""
    _, h, w = image_shape
    if len(blobs) > limits.max_images:
        raise InvalidInputError(f"{len(blobs)} image files is above this server's limit of "
                                f"{limits.max_images} per request")
    total = sum(len(b) for b in blobs)
    if total > limits.max_bytes:
        raise InvalidInputError(f"image files of {total} bytes in all are above this server's limit of "
                                f"{limits.max_bytes} bytes per request")
    for label, blob in zip(_labels(len(blobs), names), blobs):
        if not blob:
            raise InvalidInputError(f"{label} is empty")
        size = header_size(blob)
        if size is None:
            raise InvalidInputError(f"{label} is not a decodable PNG or JPEG (no PNG or JPEG header)")
        fmt, fh, fw = size
        if (fh, fw) != (h, w):
            raise InvalidInputError(f"model expects {h}x{w} images; {label} is a {fmt} of {fh}x{fw}")


def decode_images(blobs: list[bytes], image_shape: tuple[int, int, int],
                  limits: DecodeLimits = DecodeLimits(), names: list[str] | None = None) -> np.ndarray:
    """PNG/JPEG files -> uint8 (B, C, H, W), converted to the model's channel count.
    Headers are checked first (:func:`check_files`); the decoder only sees files of the
    model's size. Decoded with Pillow, which reports a corrupt file as an exception:
    torchvision's ``decode_image`` (libpng's error longjmp) kills the whole process on a
    49-byte PNG whose IDAT is broken (tests/service/test_hardening.py keeps that file)."""
    from PIL import Image

    c, h, w = image_shape
    if not blobs:  # an empty batch: validation refuses it, with the same words for every input form
        return np.zeros((0, *image_shape), np.uint8)
    check_files(blobs, image_shape, limits, names)
    out = np.empty((len(blobs), c, h, w), np.uint8)                    # (B, C, H, W)
    for i, (label, blob) in enumerate(zip(_labels(len(blobs), names), blobs)):
        try:
            with Image.open(io.BytesIO(blob), formats=("PNG", "JPEG")) as img:
                if img.size != (w, h):  # Pillow's reading of the header: the same as ours, or refused
                    raise ValueError(f"Pillow reads {img.size[0]}x{img.size[1]} (w x h)")
                arr = np.asarray(img.convert("L" if c == 1 else "RGB"))  # (H, W) or (H, W, 3)
        except Exception as exc:  # noqa: BLE001 - whatever a caller's file makes Pillow raise is the caller's
            # the decoder's words may name files and libraries: the log's, not the caller's
            log.info(f"{label} failed to decode", extra={"fields": {"detail": f"{type(exc).__name__}: {exc}"}})
            raise InvalidInputError(f"{label} is not a decodable PNG or JPEG") from None
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return out
