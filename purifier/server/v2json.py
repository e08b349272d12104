"""The V2 REST bodies <-> the V2 messages: JSON tensors and Triton's binary tensor data
extension, so the REST front end (``rest``) hands ``V2`` the same ``ModelInferRequest`` a
gRPC client would have sent and turns its answer back into JSON.

Infer request: a JSON header, optionally followed by binary tensor data when the HTTP
header ``Inference-Header-Content-Length`` gives the JSON's length. An input carries its
values in ``data`` (nested or flat list; BYTES as strings) or, with the parameter
``binary_data_size``, as that many raw little-endian bytes of the binary part (inputs in
order). Every input becomes ``raw_input_contents``, the form purifier forwards.

Infer response: an output goes as raw bytes after the JSON when the request asked for it
(output parameter ``binary_data``, or request parameter ``binary_data_output`` for all
outputs, as tritonclient.http sends), else as JSON ``data`` (flat, row-major, as the
protocol writes it). The transport parameters are not passed on to the model.
"""

from __future__ import annotations

import json

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from ..errors import InvalidInputError
from ..proto.inference import grpc_service_pb2 as pb
from . import codec, v2

HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE, BINARY_OUTPUT, BINARY_ALL = "binary_data_size", "binary_data", "binary_data_output"


def _json_object(data: bytes, what: str) -> dict:
    try:
        obj = json.loads(data or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return obj


def _set_params(mapping, params, what: str) -> None:
    if not isinstance(params, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    for key, value in params.items():
        if not isinstance(value, (bool, int, float, str)):
            raise InvalidInputError(f"{what} {key!r}: a parameter is a bool, number or string")
        v2.set_param(mapping, key, value)


def _flatten(data, what: str) -> list:
    if not isinstance(data, list):
        raise InvalidInputError(f"{what}: 'data' must be a list")
    out, stack = [], [data]
    while stack:                    # iterative: a deeply nested body must not exhaust the stack
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _json_raw(data, datatype: str, shape, what: str) -> bytes:
    """An input's JSON ``data`` -> raw little-endian bytes (BYTES: length-prefixed elements)."""
    values = _flatten(data, what)
    if len(values) != codec.count(codec.check_shape(shape, what)):
        raise InvalidInputError(f"{what} has {len(values)} values in 'data'; shape {list(shape)} needs "
                                f"{codec.count(shape)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidInputError(f"{what}: BYTES 'data' holds strings (send files as binary data)")
        return codec.join_bytes_elements([v.encode() for v in values])
    if datatype not in codec.V2_DTYPES:
        raise InvalidInputError(f"{what}: unknown datatype {datatype!r}")
    if not all(isinstance(v, (bool, int, float)) for v in values):
        raise InvalidInputError(f"{what}: 'data' of {datatype} holds numbers")
    dtype = codec.V2_DTYPES[datatype]
    if dtype.kind in "iu" and values:
        info = np.iinfo(dtype)
        if not all(float(v).is_integer() and info.min <= v <= info.max for v in values):
            raise InvalidInputError(f"{what}: 'data' holds values that are not {datatype} integers "
                                    f"({info.min}..{info.max})")
    return codec.to_raw(np.asarray(values, dtype=dtype))


def infer_request(model: str, version: str, body: bytes, header_length: str | None
                  ) -> tuple[pb.ModelInferRequest, dict[str, bool], bool]:
    """A REST infer body -> (request, binary wanted per requested output, binary for the rest)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInputError(f"header Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 <= n <= len(body):
            raise InvalidInputError(f"header Inference-Header-Content-Length {n} is outside the "
                                    f"body's {len(body)} bytes")
        header, binary = _json_object(body[:n], "the inference header"), memoryview(body)[n:]
    else:
        header, binary = _json_object(body, "the request body"), memoryview(b"")
    params = dict(header.get("parameters") or {})
    binary_all = bool(params.pop(BINARY_ALL, False))
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(header.get("id", "")))
    _set_params(request.parameters, params, "'parameters'")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("'inputs' must be a non-empty list of tensors")
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidInputError(f"inputs[{i}] must be a JSON object")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        what = f"input {name!r}"
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise InvalidInputError(f"inputs[{i}] needs 'name' (string), 'datatype' (string) and 'shape' "
                                    "(list of integers)")
        tparams = dict(tensor.get("parameters") or {})
        size = tparams.pop(BINARY_SIZE, None)
        inp = request.inputs.add(name=name, datatype=datatype, shape=shape)
        _set_params(inp.parameters, tparams, f"{what} 'parameters'")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InvalidInputError(f"{what}: binary_data_size {size!r} does not fit the "
                                        f"{len(binary) - offset} bytes of binary data left")
            request.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in tensor:
            request.raw_input_contents.append(_json_raw(tensor["data"], datatype, shape, what))
        else:
            raise InvalidInputError(f"{what} has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes of binary data belong to no input")
    wanted: dict[str, bool] = {}
    for i, out in enumerate(header.get("outputs") or []):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInputError(f"outputs[{i}] needs a 'name'")
        oparams = dict(out.get("parameters") or {})
        wanted[out["name"]] = bool(oparams.pop(BINARY_OUTPUT, binary_all))
        _set_params(request.outputs.add(name=out["name"]).parameters, oparams, f"output {out['name']!r}")
    return request, wanted, binary_all


def _param(p: pb.InferParameter):
    return v2.param_value(p)


def infer_response(response: pb.ModelInferResponse, wanted: dict[str, bool], binary_all: bool
                   ) -> tuple[bytes, int | None]:
    """The answer -> (body, JSON header length when binary data follows it, else None)."""
    response = v2.to_raw_outputs(response)
    outputs, blobs = [], []
    for out, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        params = {k: _param(p) for k, p in out.parameters.items()}
        if wanted.get(out.name, binary_all):
            params[BINARY_SIZE] = len(raw)
            blobs.append(raw)
        elif out.datatype == "BYTES":
            try:
                entry["data"] = [b.decode() for b in codec.split_bytes_elements(raw, out.name)]
            except UnicodeDecodeError:
                raise InvalidInputError(f"output {out.name!r} holds bytes that are not UTF-8: ask for it "
                                        "as binary data (parameter binary_data)") from None
        else:
            entry["data"] = codec.from_raw(raw, codec.V2_DTYPES[out.datatype], out.shape, out.name).reshape(-1).tolist()
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    header = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = {k: _param(p) for k, p in response.parameters.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


def message_json(message) -> dict:
    """A V2 message as the REST API writes it: field names as in the proto, integers as JSON
    numbers (protobuf's own JSON writes 64-bit integers as strings), enums by name."""
    out = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(value_field, v) for k, v in value.items()}
        elif _repeated(field):
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


def _repeated(field) -> bool:
    # protobuf >= 6.32 has is_repeated and deprecates label; 6.31 has only label
    repeated = getattr(field, "is_repeated", None)
    return field.label == FieldDescriptor.LABEL_REPEATED if repeated is None else repeated


def _value(field, value):
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("latin-1")
    return value
