"""Property tests (Hypothesis) of request decoding and validation: whatever shapes, datatypes,
bytes, files and parameter types a caller sends, the answer is an image batch or an
InvalidInputError (INVALID_ARGUMENT) - never another exception (INTERNAL), never a crash.
The last test sends such requests to a live server over both APIs."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from purifier.engine import Engine, Limits
from purifier.errors import InvalidInputError
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.server import codec, v1, v2

from .conftest import Clients, images, make_model_dir, running, settings_for, tensor
from .test_hardening import png_header

SHAPE = (1, 8, 8)
LIMITS = codec.DecodeLimits(max_images=16, max_bytes=64 * 1024)
GOOD_PNG = codec.encode_pngs((images(1) * 255).astype(np.uint8))[0]

DATATYPES = [*codec.V2_DTYPES, "BYTES", "", "FP8", "fp32"]
dims = st.one_of(st.integers(-2, 10), st.sampled_from([8, 16, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, -2 ** 63]))
shapes = st.one_of(st.lists(dims, max_size=5),
                   st.sampled_from([[1, 1, 8, 8], [2, 8, 8, 1], [3, 8, 8], [1, 3, 8, 8], [0, 1, 8, 8]]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
PARAMS = ["purifier_steps", "purifier_restarts", "purifier_seed", "purifier_input", "purifier_on_flagged", "other"]


@st.composite
def files(draw):
    """Encoded images: junk, headers claiming any size over junk, a good PNG, a good PNG with bytes flipped."""
    kind = draw(st.sampled_from(["junk", "header", "good", "mutated", "jpeg-ish"]))
    if kind == "junk":
        return draw(st.binary(max_size=64))
    if kind == "header":
        return png_header(draw(st.integers(0, 2 ** 32 - 1)), draw(st.integers(0, 2 ** 32 - 1)),
                          draw(st.binary(max_size=64)))
    if kind == "jpeg-ish":
        return b"\xff\xd8" + draw(st.binary(max_size=64))
    blob = bytearray(GOOD_PNG)
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    return bytes(blob)


def set_param(mapping, key, value):
    if value is None:
        return
    if isinstance(value, bool):
        mapping[key].bool_param = value
    elif isinstance(value, int):
        mapping[key].int64_param = value
    elif isinstance(value, float):
        mapping[key].double_param = value
    else:
        mapping[key].string_param = value


@st.composite
def v2_requests(draw):
    req = v2_pb.ModelInferRequest(model_name="purifier", id=draw(st.text(max_size=12)))
    mode = draw(st.sampled_from(["raw", "contents", "both", "none"]))
    for i in range(draw(st.integers(0, 2))):
        datatype = draw(st.sampled_from(DATATYPES))
        shape = draw(shapes)
        inp = req.inputs.add(name=draw(st.sampled_from(["images", "x", ""])), datatype=datatype, shape=shape)
        set_param(inp.parameters, "layout", draw(st.one_of(st.sampled_from(["NCHW", "NHWC", "nhwc"]), scalars)))
        n = codec.count(shape) if all(0 <= s <= 64 for s in shape) and codec.count(shape) <= 256 else 1
        if datatype == "BYTES":
            blobs = draw(st.lists(files(), max_size=3))
            if mode in ("raw", "both"):
                req.raw_input_contents.append(codec.join_bytes_elements(blobs))
            if mode in ("contents", "both", "none"):
                inp.contents.bytes_contents.extend(blobs)
            continue
        if mode in ("raw", "both"):
            itemsize = codec.V2_DTYPES[datatype].itemsize if datatype in codec.V2_DTYPES else 4
            exact = draw(st.booleans())
            data = (np.frombuffer(draw(st.binary(min_size=n * itemsize, max_size=n * itemsize)), np.uint8).tobytes()
                    if exact else draw(st.binary(max_size=64)))
            req.raw_input_contents.append(data)
        if mode in ("contents", "both"):
            field = draw(st.sampled_from(sorted(set(codec.CONTENTS_FIELD.values()) - {"bytes_contents"})))
            values = {"bool_contents": st.booleans(), "fp32_contents": st.floats(width=32),
                      "fp64_contents": st.floats(), "int_contents": st.integers(-2 ** 31, 2 ** 31 - 1),
                      "int64_contents": st.integers(-2 ** 63, 2 ** 63 - 1),
                      "uint_contents": st.integers(0, 2 ** 32 - 1), "uint64_contents": st.integers(0, 2 ** 64 - 1)}
            getattr(inp.contents, field).extend(draw(st.lists(values[field], min_size=0, max_size=n)))
    for key in draw(st.lists(st.sampled_from(PARAMS), unique=True)):
        set_param(req.parameters, key, draw(st.one_of(scalars, st.integers(0, 300).map(str))))
    return req


@st.composite
def v1_requests(draw):
    opts = pb.ProjectionOptions()
    if draw(st.booleans()):
        opts.steps = draw(st.integers(0, 2 ** 32 - 1))
    if draw(st.booleans()):
        opts.restarts = draw(st.integers(0, 2 ** 32 - 1))
    if draw(st.booleans()):
        opts.seed = draw(st.integers(0, 2 ** 64 - 1))
    req = pb.PurifyRequest(options=opts, request_id=draw(st.text(max_size=12)))
    if draw(st.booleans()):
        shape = draw(shapes)
        req.tensor.CopyFrom(pb.Tensor(dtype=draw(st.integers(0, 8)), shape=[s for s in shape if s >= 0],
                                      data=draw(st.binary(max_size=300))))
    elif draw(st.booleans()):
        req.encoded.images.extend(draw(st.lists(files(), max_size=4)))
    return req


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = make_model_dir(tmp_path_factory.mktemp("prop"))
    return Engine.load(d, "cpu", "fast", Limits(16, 200, 8, 6400))


def through_validation(engine, decode, options):
    """What the data plane does before queueing: decode, options, config, validate, budget."""
    try:
        images = decode()
        cfg = engine.config(**options())
        x = engine.validate(images)
        engine.check_compute(cfg, x.shape[0])
    except InvalidInputError as exc:
        assert str(exc)  # a message the caller can act on
        return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=v2_requests())
def test_v2_decoding_and_validation_only_raise_invalid_input(engine, request):
    def decode():
        return v2.images_in(request, v2.image_index(request, SHAPE), SHAPE, LIMITS)[0]

    through_validation(engine, decode, lambda: v2.options(request.parameters))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=v1_requests())
def test_v1_decoding_and_validation_only_raise_invalid_input(engine, request):
    through_validation(engine, lambda: v1.images_of(request, SHAPE, LIMITS), lambda: v1.options_of(request))


@settings(max_examples=200, deadline=None)
@given(blob=files())
def test_header_check_and_decoder_agree_or_refuse(blob):
    """A file passes the header check only if it is a PNG/JPEG of the model's size; then it
    decodes to exactly that size or is refused as undecodable."""
    try:
        out = codec.decode_images([blob], SHAPE, LIMITS)
    except InvalidInputError:
        return
    assert out.shape == (1, *SHAPE) and out.dtype == np.uint8
    assert codec.header_size(blob)[1:] == SHAPE[1:]


@pytest.fixture(scope="module")
def live(aloop, tmp_path_factory):
    d = make_model_dir(tmp_path_factory.mktemp("prop-live"))
    with running(aloop, settings_for(d, max_compute=6400, max_decode_bytes=64 * 1024)) as server:
        clients = Clients(server.port)
        yield clients
        clients.close()


@pytest.mark.integration
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(v2_request=v2_requests(), v1_request=v1_requests())
def test_live_server_never_answers_internal(live, v2_request, v1_request):
    for call, request in ((live.v2.ModelInfer, v2_request), (live.purifier.Purify, v1_request)):
        try:
            call(request, timeout=30)
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), e.details()
            assert "Traceback" not in (e.details() or "")
    # still serving
    assert live.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30).purification.steps
