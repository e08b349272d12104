"""Helpers on Open Inference Protocol (V2) messages: read inputs, write raw outputs, read
and write parameters. No servicer code."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError
from ..proto.inference import grpc_service_pb2 as pb
from . import codec


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
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInputError(f"{len(request.raw_input_contents)} raw_input_contents for "
                                f"{len(request.inputs)} inputs: send one per input, or none")
    return bool(request.raw_input_contents)


def input_array(request: pb.ModelInferRequest, index: int, image_shape) -> np.ndarray:
    """The image input ``index`` as an array (FP32/UINT8 as sent; BYTES decoded to uint8 NCHW)."""
    inp = request.inputs[index]
    raw = request.raw_input_contents[index] if uses_raw(request) else None
    return codec.image_array(inp.datatype, inp.shape, raw, inp.contents, image_shape, what=f"input {inp.name!r}")


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
