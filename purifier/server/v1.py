"""The purifier.v1 codec: PurifyRequest/ClassifyRequest -> images and options, and a
purification (plus a downstream's V2 answer) -> PurifyResponse/ClassifyResponse. No servicer code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError
from ..proto.inference import grpc_service_pb2 as v2_pb
from ..proto.purifier.v1 import purifier_pb2 as pb
from . import codec, v2

if TYPE_CHECKING:
    from .dataplane import Purified

DTYPES = {pb.FLOAT32: np.dtype("<f4"), pb.UINT8: np.dtype("u1"), pb.INT64: np.dtype("<i8"),
          pb.INT32: np.dtype("<i4"), pb.FLOAT64: np.dtype("<f8"), pb.BOOL: np.dtype("?")}
ENUMS = {v: k for k, v in DTYPES.items()}


def tensor_to_array(t: pb.Tensor) -> np.ndarray:
    if t.dtype not in (pb.FLOAT32, pb.UINT8):
        name = pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else f"an unknown dtype ({t.dtype})"
        raise InvalidInputError(f"images must be FLOAT32 (0..1) or UINT8 (0..255), got {name}")
    return codec.from_raw(t.data, DTYPES[t.dtype], t.shape, "images")


def array_to_tensor(arr: np.ndarray, out: pb.Tensor) -> None:
    out.dtype = ENUMS[arr.dtype]
    out.shape.extend(arr.shape)
    out.data = codec.to_raw(arr)


def images_of(request, image_shape, limits: codec.DecodeLimits = codec.DecodeLimits()) -> np.ndarray:
    which = request.WhichOneof("images")
    if which == "tensor":
        return tensor_to_array(request.tensor)
    if which == "encoded":
        return codec.decode_images(list(request.encoded.images), image_shape, limits)
    raise InvalidInputError("no images: set tensor (raw bytes) or encoded (PNG/JPEG files)")


def options_of(request) -> dict:
    o = request.options
    return {name: getattr(o, name) for name in ("steps", "restarts", "seed") if o.HasField(name)}


def on_flagged_of(request) -> str | None:
    """The request's flagged-input policy ("forward", "reject"), or None for the server's."""
    return {pb.ON_FLAGGED_FORWARD: "forward", pb.ON_FLAGGED_REJECT: "reject"}.get(request.on_flagged)


def fill_purification(out: pb.Purification, p: "Purified") -> None:
    array_to_tensor(np.ascontiguousarray(p.images, dtype=np.float32), out.images)
    out.reconstruction_error.extend(p.errors.tolist())
    out.adversarial.extend(bool(f) for f in p.flags)
    out.threshold_calibrated = p.threshold is not None
    out.threshold = p.threshold or 0.0
    out.steps = p.cfg.steps
    out.restarts = p.cfg.restarts
    out.model = p.model


def purify_response(purified: "Purified", request_id: str) -> pb.PurifyResponse:
    response = pb.PurifyResponse(request_id=request_id)
    fill_purification(response.purification, purified)
    return response


def classify_response(purified: "Purified", answer: v2_pb.ModelInferResponse, request_id: str,
                      model_name: str) -> pb.ClassifyResponse:
    """The purification, every downstream output purifier.v1 has a dtype for, and labels
    (the argmax of the first 2-D float output, when there is one)."""
    response = pb.ClassifyResponse(request_id=request_id, model_name=answer.model_name or model_name)
    fill_purification(response.purification, purified)
    labels = None
    for name, datatype, data in v2.output_arrays(answer):
        if datatype not in codec.V2_DTYPES or codec.V2_DTYPES[datatype] not in ENUMS:
            continue  # BYTES and exotic types have no purifier.v1 dtype
        array_to_tensor(np.asarray(data), response.outputs.add(name=name).tensor)
        if labels is None and data.ndim == 2 and datatype.startswith("FP"):
            labels = data.argmax(axis=1)
    if labels is not None:
        response.labels.extend(int(v) for v in labels)
    return response
