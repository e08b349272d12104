"""The V2 codec: Open Inference Protocol (KServe V2) messages <-> arrays, in one place.

- request -> images: :func:`images_in` (FP32, UINT8 or BYTES PNG/JPEG files; NCHW, NHWC or
  (B, H, W); see ``codec``), :func:`options` (the ``purifier_*`` request parameters);
- images -> request/response: :func:`images_out` (back to the layout and datatype the caller
  sent), :func:`infer_request`, :func:`replace_images`, :func:`add_outputs`;
- results -> parameters: :func:`annotate` (errors, flags, threshold, L and R);
- lower level: parameters, raw vs typed contents, a downstream's input spec.

Used by both servicers, the data plane and the reference classifier; no servicer code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidInputError
from ..proto.inference import grpc_service_pb2 as pb
from . import codec

if TYPE_CHECKING:
    from .dataplane import Purified

# V2 request parameters read by purifier (and stripped before forwarding) -> projection option.
OPTION_PARAMS = {"purifier_steps": "steps", "purifier_restarts": "restarts", "purifier_seed": "seed"}


def param_value(p: pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def params(mapping) -> dict:
    return {k: param_value(v) for k, v in mapping.items()}


def set_param(mapping, key: str, value) -> None:
    p = mapping[key]
    if isinstance(value, (bool, np.bool_)):
        p.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        p.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def uses_raw(request: pb.ModelInferRequest) -> bool:
    """Whether the inputs travel in raw_input_contents (one per input) or in typed contents;
    a request that mixes both is refused (the protocol forbids it; one would be ignored)."""
    if not request.raw_input_contents:
        return False
    if len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInputError(f"{len(request.raw_input_contents)} raw_input_contents for "
                                f"{len(request.inputs)} inputs: send one per input, or none")
    typed = [inp.name for inp in request.inputs if inp.contents.ListFields()]
    if typed:
        raise InvalidInputError(f"inputs {typed} set contents and the request sets raw_input_contents: "
                                "send each input's data in one of them, not both")
    return True


def input_array(request: pb.ModelInferRequest, index: int, image_shape,
                limits: codec.DecodeLimits = codec.DecodeLimits()) -> np.ndarray:
    """The image input ``index`` as an array (FP32/UINT8 as sent; BYTES decoded to uint8 NCHW)."""
    inp = request.inputs[index]
    raw = request.raw_input_contents[index] if uses_raw(request) else None
    return codec.image_array(inp.datatype, inp.shape, raw, inp.contents, image_shape,
                             what=f"input {inp.name!r}", limits=limits)


def output_arrays(response: pb.ModelInferResponse) -> list[tuple[str, str, np.ndarray | list]]:
    """(name, datatype, array) per output, whether sent raw or in contents (BYTES: list of bytes)."""
    out = []
    raw = list(response.raw_output_contents)
    for i, o in enumerate(response.outputs):
        if o.datatype == "BYTES":
            data = codec.split_bytes_elements(raw[i]) if raw else list(o.contents.bytes_contents)
        elif raw:
            data = codec.from_raw(raw[i], codec.V2_DTYPES[o.datatype], o.shape, f"output {o.name!r}")
        else:
            data = codec.from_contents(o.contents, o.datatype, o.shape, f"output {o.name!r}")
        out.append((o.name, o.datatype, data))
    return out


def to_raw_outputs(response: pb.ModelInferResponse) -> pb.ModelInferResponse:
    """Move outputs sent in typed contents to raw_output_contents (all tritonclient reads)."""
    if response.raw_output_contents or not response.outputs:
        return response
    arrays = output_arrays(response)
    for o, (_, datatype, data) in zip(response.outputs, arrays):
        o.ClearField("contents")
        response.raw_output_contents.append(
            codec.join_bytes_elements(data) if datatype == "BYTES" else codec.to_raw(data))
    return response


def add_output(response: pb.ModelInferResponse, name: str, arr: np.ndarray, datatype: str | None = None) -> None:
    o = response.outputs.add(name=name, datatype=datatype or codec.v2_name(arr.dtype), shape=list(arr.shape))
    del o  # the data travels raw, in the same order as outputs
    response.raw_output_contents.append(codec.to_raw(arr))


def set_input(request: pb.ModelInferRequest, index: int, arr: np.ndarray | list, datatype: str) -> None:
    """Replace input ``index``'s data (raw or contents, as the request carries its inputs)."""
    inp = request.inputs[index]
    inp.datatype = datatype
    if datatype == "BYTES":
        inp.ClearField("shape")
        inp.shape.append(len(arr))
    else:
        del inp.shape[:]
        inp.shape.extend(arr.shape)
    if request.raw_input_contents:
        request.raw_input_contents[index] = (codec.join_bytes_elements(arr) if datatype == "BYTES"
                                             else codec.to_raw(arr))
    else:
        inp.ClearField("contents")
        if datatype == "BYTES":
            inp.contents.bytes_contents.extend(arr)
        else:
            codec.fill_contents(inp.contents, arr)


# --- images and options in, images and results out -------------------------------------------

def images_in(request: pb.ModelInferRequest, index: int, image_shape,
              limits: codec.DecodeLimits = codec.DecodeLimits()) -> tuple[np.ndarray, str, str]:
    """Input ``index``'s images as (B, C, H, W) (FP32/UINT8 as sent; BYTES files decoded to
    uint8), the layout they came in, and the datatype to answer in (the input's; FP32 for files)."""
    inp = request.inputs[index]
    images = input_array(request, index, image_shape, limits)
    if inp.datatype == "BYTES":
        return images, "NCHW", "FP32"
    nchw, layout = codec.to_nchw(images, image_shape, params(inp.parameters).get("layout"))
    return nchw, layout, inp.datatype


def images_out(images: np.ndarray, layout: str, datatype: str) -> np.ndarray:
    """float32 (B, C, H, W) in [0, 1] -> the layout and datatype (FP32 or UINT8) a caller uses."""
    return codec.to_dtype(codec.from_nchw(images, layout), datatype)


def image_index(request: pb.ModelInferRequest, image_shape) -> int:
    """Which input holds the images: the one the ``purifier_input`` parameter names, the only
    one, or the first whose shape fits the model's image in either layout (or that holds files)."""
    if not request.inputs:
        raise InvalidInputError("the request has no inputs")
    names = [i.name for i in request.inputs]
    name = params(request.parameters).get("purifier_input")
    if name:
        if name not in names:
            raise InvalidInputError(f"purifier_input {name!r} is not among the inputs {names}")
        return names.index(name)
    if len(names) == 1:
        return 0
    c, h, w = image_shape
    for i, inp in enumerate(request.inputs):
        if inp.datatype == "BYTES" or tuple(inp.shape[1:]) in ((c, h, w), (h, w, c)):
            return i
    raise InvalidInputError(f"cannot tell which of the inputs {names} holds the images; "
                            "name it with the request parameter purifier_input")


def replace_images(request: pb.ModelInferRequest, index: int, images: np.ndarray, layout: str) -> None:
    """Put float32 (B, C, H, W) images in place of input ``index``, in the form it was sent:
    PNG files for BYTES, else its layout and datatype."""
    datatype = request.inputs[index].datatype
    if datatype == "BYTES":
        set_input(request, index, codec.encode_pngs(codec.to_dtype(images, "UINT8")), "BYTES")
    else:
        set_input(request, index, images_out(images, layout, datatype), datatype)


def options(parameters) -> dict:
    """Projection options from V2 request parameters (purifier_steps/_restarts/_seed): an
    int64 parameter, or a string of ASCII digits (tritonclient sends some as strings).
    Ranges are the engine's to check (``Engine.config``)."""
    given, out = params(parameters), {}
    for key, field in OPTION_PARAMS.items():
        value = given.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value) <= 40:
            value = int(value.strip())  # isdigit alone admits '²', which int() refuses
        if isinstance(value, bool) or not isinstance(value, int):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise InvalidInputError(f"parameter {key} must be an integer, got {shown}")
        out[field] = value
    return out


def on_flagged(parameters) -> str | None:
    """The request parameter ``purifier_on_flagged`` ("forward" or "reject"; checked by the
    policy), or None for the server's policy."""
    value = params(parameters).get("purifier_on_flagged")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"parameter purifier_on_flagged must be a string (forward or reject), got {value!r}")
    return value.strip().lower()


def model_param(parameters) -> str | None:
    """The request parameter ``purifier_model`` (V2 model ``purifier``: which repository model
    purifies), or None for the default model."""
    value = params(parameters).get("purifier_model")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"parameter purifier_model must be a string (a model name), got {value!r}")
    return value


def wanted_outputs(request: pb.ModelInferRequest, model: str, available) -> list[str]:
    """The outputs a request asks for (all when it names none); unknown names are refused."""
    wanted = [o.name for o in request.outputs] or list(available)
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise InvalidInputError(f"unknown outputs {unknown}; model {model!r} has {list(available)}")
    return wanted


def add_outputs(response: pb.ModelInferResponse, results: dict, wanted: list[str]) -> None:
    for name in wanted:
        add_output(response, name, results[name])


def infer_request(model: str, input_name: str, arr: np.ndarray, datatype: str,
                  request_id: str = "") -> pb.ModelInferRequest:
    """A one-input request carrying ``arr`` raw."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=input_name, datatype=datatype, shape=list(arr.shape))
    request.raw_input_contents.append(codec.to_raw(arr))
    return request


def annotate(parameters, purified: "Purified") -> None:
    """Purification results as V2 response parameters (InferParameter holds scalars only,
    so per-image lists travel as comma-separated strings)."""
    set_param(parameters, "purifier_reconstruction_error", ",".join(f"{e:.6g}" for e in purified.errors))
    set_param(parameters, "purifier_adversarial", ",".join("1" if f else "0" for f in purified.flags))
    set_param(parameters, "purifier_flagged", int(purified.flags.sum()))
    set_param(parameters, "purifier_threshold_calibrated", purified.threshold is not None)
    if purified.threshold is not None:
        set_param(parameters, "purifier_threshold", float(purified.threshold))
    set_param(parameters, "purifier_steps", purified.cfg.steps)
    set_param(parameters, "purifier_restarts", purified.cfg.restarts)
    if purified.model:
        set_param(parameters, "purifier_model", purified.model)


@dataclass
class InputSpec:
    """How a downstream model wants its image input."""
    name: str = "input"
    datatype: str = "FP32"
    layout: str = "NCHW"


def input_spec(meta: pb.ModelMetadataResponse, image_shape) -> InputSpec:
    """A downstream model's first input from its metadata: name, datatype (FP32 or UINT8,
    else FP32) and layout (NHWC when its shape says so unambiguously)."""
    spec = InputSpec()
    if meta.inputs:
        first = meta.inputs[0]
        spec.name = first.name or spec.name
        spec.datatype = first.datatype if first.datatype in codec.IMAGE_DTYPES else "FP32"
        c, h, w = image_shape
        shape = tuple(first.shape[-3:])
        if len(shape) == 3 and shape == (h, w, c) and shape != (c, h, w):
            spec.layout = "NHWC"
    return spec
