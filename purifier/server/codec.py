"""Tensors on the wire: raw little-endian bytes with a dtype and shape (both APIs), V2's typed
``contents`` fields, V2 BYTES elements, and PNG/JPEG files (decoded with Pillow, encoded with
torchvision).

Image layout in V2 requests: an input parameter ``layout`` ("NCHW" or "NHWC") decides;
without it, a 4-D shape (B, H, W, C) that matches the model's image as NHWC (and not as
NCHW) is read as NHWC, anything else as NCHW; a 3-D (B, H, W) is accepted for one-channel
models. Errors are :class:`InvalidInputError` with a message that names the problem.

Encoded files are checked from their headers and decoded within ``DecodeLimits`` by
``purifier.validation`` (one home, shared with ``purifier purify``; re-exported here):
PNG or JPEG only, each exactly the model's height x width, at most ``max_images`` files and
``max_bytes`` bytes per request. Decoder messages go to the log, never to the caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import InvalidInputError, OverloadedError
from ..validation import DecodeLimits, check_files, decode_images, header_size  # noqa: F401 (re-exported)

# V2 datatype -> numpy dtype (little-endian). BYTES is handled apart.
V2_DTYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_V2_NAMES = {v: k for k, v in V2_DTYPES.items()}
# V2 datatype -> field of InferTensorContents that carries it
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
IMAGE_DTYPES = ("FP32", "UINT8")


def v2_name(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _V2_NAMES[dtype]
    except KeyError:
        raise InvalidInputError(f"no V2 datatype for numpy {dtype}") from None


# Most elements a tensor's shape may declare: far above anything a message can carry, and
# small enough that numpy never sees a size it cannot represent.
MAX_ELEMENTS = 2 ** 40


def check_shape(shape, what: str = "tensor") -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InvalidInputError(f"{what} shape {list(shape)} has a negative dimension")
    # zero dimensions excluded too: numpy refuses [0, 2^40, 2^40] as "too big" although it is empty
    if count(max(s, 1) for s in shape) > MAX_ELEMENTS:
        raise InvalidInputError(f"{what} shape {list(shape)} declares more than {MAX_ELEMENTS} elements")
    return shape


def count(shape) -> int:
    """Elements of a shape, in Python ints (numpy's int64 product wraps: 2^32 * 2^32 -> 0)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


def from_raw(data: bytes, dtype: np.dtype, shape, what: str = "tensor") -> np.ndarray:
    """Raw little-endian C-order bytes -> array, checking the length against the shape."""
    shape = check_shape(shape, what)
    dtype = np.dtype(dtype)
    need = count(shape) * dtype.itemsize
    if len(data) != need:
        raise InvalidInputError(f"{what} has {len(data)} bytes of raw data; shape {list(shape)} of "
                                f"{v2_name(dtype)} needs {need}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, as torch wants


def to_raw(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def from_contents(contents, datatype: str, shape, what: str = "tensor") -> np.ndarray:
    """V2 typed contents (``fp32_contents`` ...) -> array."""
    if datatype not in CONTENTS_FIELD or datatype == "BYTES":
        raise InvalidInputError(f"{what}: datatype {datatype!r} cannot travel in contents here")
    shape = check_shape(shape, what)
    field = CONTENTS_FIELD[datatype]
    values = getattr(contents, field)
    n = count(shape)
    if len(values) != n:
        raise InvalidInputError(f"{what} has {len(values)} values in {field}; shape {list(shape)} needs {n}")
    dtype = V2_DTYPES[datatype]
    if dtype.kind in "iu" and n:  # e.g. 300 in a UINT8 tensor's uint_contents (a uint32 field)
        info = np.iinfo(dtype)
        lo, hi = min(values), max(values)
        if lo < info.min or hi > info.max:
            raise InvalidInputError(f"{what}: {field} holds values in [{lo}, {hi}], outside {datatype}'s "
                                    f"range {info.min}..{info.max}")
    return np.asarray(values, dtype=dtype).reshape(shape)


def fill_contents(contents, arr: np.ndarray) -> str:
    """Array -> V2 typed contents; returns the V2 datatype."""
    name = v2_name(arr.dtype)
    getattr(contents, CONTENTS_FIELD[name]).extend(arr.reshape(-1).tolist())
    return name


def split_bytes_elements(data: bytes, what: str = "tensor") -> list[bytes]:
    """V2 BYTES raw encoding: each element is a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(data):
        if i + 4 > len(data):
            raise InvalidInputError(f"{what}: truncated BYTES element length at offset {i}")
        (n,) = struct.unpack_from("<I", data, i)
        if i + 4 + n > len(data):
            raise InvalidInputError(f"{what}: BYTES element at offset {i} claims {n} bytes, "
                                    f"only {len(data) - i - 4} remain")
        out.append(bytes(data[i + 4: i + 4 + n]))
        i += 4 + n
    return out


def join_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@contextmanager
def _quiet_torchvision():
    # torchvision 0.29 warns that its image codecs will move to torchcodec; they still work.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def preload() -> None:
    """Import torchvision's codecs now: the import takes seconds (it loads every torchvision
    model module) and would otherwise stall the event loop on the first PNG request."""
    with _quiet_torchvision():
        import torchvision.io  # noqa: F401


class DecodePool:
    """Request decoding (``v1.images_of``, ``v2.images_in``) in a few threads of its own, so
    neither PNG/JPEG files nor large tensors stall the event loop (health checks, other
    requests). At most ``max_pending`` decodes wait or run; the next is refused at once
    (UNAVAILABLE, like a full batch queue). Each call runs in the caller's context, so its
    log lines carry the request id."""

    def __init__(self, image_shape: tuple[int, int, int], limits: DecodeLimits = DecodeLimits(),
                 threads: int = 2, max_pending: int = 256):
        self.image_shape = tuple(image_shape)
        self.limits = limits
        self.max_pending = max_pending
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="purifier-decode")

    async def run(self, fn, *args, image_shape: tuple[int, int, int] | None = None):
        """``fn(*args, image_shape, limits=limits)`` in a decode thread (``image_shape``: the
        model's the request is for; default the pool's)."""
        if self._pending >= self.max_pending:
            raise OverloadedError(f"{self._pending} requests are being decoded; retry later")
        self._pending += 1
        try:
            shape = self.image_shape if image_shape is None else tuple(image_shape)
            call = functools.partial(contextvars.copy_context().run, fn, *args, shape, limits=self.limits)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """uint8 (B, C, H, W) -> PNG files."""
    from torchvision.io import encode_png

    with _quiet_torchvision():
        return [bytes(encode_png(torch.from_numpy(np.ascontiguousarray(img))).numpy()) for img in images]


def to_nchw(arr: np.ndarray, image_shape: tuple[int, int, int], layout: str | None = None) -> tuple[np.ndarray, str]:
    """Images in any accepted layout -> (B, C, H, W), and the layout they came in."""
    c, h, w = image_shape
    if layout is not None:
        if not isinstance(layout, str):
            raise InvalidInputError(f"layout parameter must be a string (NCHW or NHWC), got {type(layout).__name__} "
                                    f"{layout!r}")
        layout = layout.upper()
        if layout not in ("NCHW", "NHWC"):
            raise InvalidInputError(f"layout parameter {layout!r}: use NCHW or NHWC")
    if arr.ndim == 3 and c == 1 and layout is None:
        if arr.shape[1:] != (h, w):
            raise InvalidInputError(f"model expects {h}x{w} images, got shape {list(arr.shape)}")
        return arr[:, None], "NHW"
    if arr.ndim != 4:
        raise InvalidInputError(f"images must be 4-D (B, C, H, W) or (B, H, W, C), got shape {list(arr.shape)}")
    if layout is None:
        layout = "NHWC" if arr.shape[1:] == (h, w, c) and arr.shape[1:] != (c, h, w) else "NCHW"
    if layout == "NHWC":
        arr = arr.transpose(0, 3, 1, 2)
    return arr, layout


def from_nchw(arr: np.ndarray, layout: str) -> np.ndarray:
    """(B, C, H, W) -> the layout the images came in."""
    if layout == "NHWC":
        return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
    if layout == "NHW":
        return arr[:, 0]
    return arr


def to_dtype(images: np.ndarray, datatype: str) -> np.ndarray:
    """float32 images in [0, 1] -> FP32 or UINT8 (rounded) as the caller sent them."""
    if datatype == "UINT8":
        return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return images.astype(np.float32, copy=False)


def image_array(datatype: str, shape, raw: bytes | None = None, contents=None,
                image_shape: tuple[int, int, int] = (1, 28, 28), what: str = "input",
                limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """A V2 image input (FP32, UINT8, or BYTES holding PNG/JPEG files) -> array as sent
    (BYTES: decoded to uint8 (B, C, H, W))."""
    if datatype == "BYTES":
        shape = check_shape(shape, what)
        if count(shape) > limits.max_images:  # before splitting: millions of empty elements cost time
            raise InvalidInputError(f"{what}: shape {list(shape)} declares {count(shape)} image files, above "
                                    f"this server's limit of {limits.max_images} per request")
        if raw is not None:
            blobs = split_bytes_elements(raw, what)
        else:
            blobs = list(contents.bytes_contents) if contents is not None else []
        if len(blobs) != count(shape):
            raise InvalidInputError(f"{what}: {len(blobs)} BYTES elements for shape {list(shape)}")
        return decode_images(blobs, image_shape, limits)
    if datatype not in IMAGE_DTYPES:
        raise InvalidInputError(f"{what}: datatype {datatype!r} is not supported for images; "
                                "send FP32 in [0, 1], UINT8 in 0..255, or BYTES holding PNG/JPEG files")
    if raw is not None:
        return from_raw(raw, V2_DTYPES[datatype], shape, what)
    return from_contents(contents, datatype, shape, what)
