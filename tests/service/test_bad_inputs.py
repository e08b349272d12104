"""Each bad input gets a clear status and message, no traceback, and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb

from .conftest import Clients, images, make_model_dir, running, settings_for, tensor, v2_request

pytestmark = pytest.mark.integration
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def raw(arr, dtype=pb.FLOAT32, shape=None, data=None):
    return pb.PurifyRequest(tensor=pb.Tensor(dtype=dtype, shape=list(shape or arr.shape),
                                             data=arr.tobytes() if data is None else data))


def nan_images():
    x = images(2)
    x[1, 0, 3, 3] = np.nan
    return x


def inf_images():
    x = images(1)
    x[0, 0, 0, 0] = np.inf
    return x


CASES = {
    # name: (request, code, words the message must contain)
    "wrong dtype": (raw(images(1).astype(np.int64), dtype=pb.INT64), INVALID, "FLOAT32"),
    "no images": (pb.PurifyRequest(), INVALID, "no images"),
    "wrong rank": (raw(images(1)[0]), INVALID, "(B, C, H, W)"),
    "wrong channels": (raw(np.zeros((1, 3, 8, 8), np.float32)), INVALID, "channel"),
    "wrong size": (raw(np.zeros((1, 1, 7, 7), np.float32)), INVALID, "8x8"),
    "byte length": (raw(images(2), data=images(2).tobytes()[:-4]), INVALID, "bytes"),
    "NaN": (raw(nan_images()), INVALID, "NaN"),
    "Inf": (raw(inf_images()), INVALID, "Inf"),
    "out of range": (raw(images(1) + 2.0), INVALID, "[0, 1]"),
    "empty batch": (raw(np.zeros((0, 1, 8, 8), np.float32)), INVALID, "empty"),
    "batch above limit": (raw(np.zeros((17, 1, 8, 8), np.float32)), INVALID, "limit of 16"),
    "steps above cap": (pb.PurifyRequest(tensor=tensor(images(1)), options=pb.ProjectionOptions(steps=201)),
                        INVALID, "limit of 200"),
    "restarts above cap": (pb.PurifyRequest(tensor=tensor(images(1)), options=pb.ProjectionOptions(restarts=9)),
                           INVALID, "limit of 8"),
    "zero restarts": (pb.PurifyRequest(tensor=tensor(images(1)), options=pb.ProjectionOptions(restarts=0)),
                      INVALID, "restarts"),
    "undecodable png": (pb.PurifyRequest(encoded=pb.EncodedImages(images=[b"\x89PNG\r\n\x1a\n garbage"])),
                        INVALID, "PNG or JPEG"),
    "empty png list": (pb.PurifyRequest(encoded=pb.EncodedImages(images=[])), INVALID, "empty"),
}


@pytest.fixture(scope="module")
def shared(aloop, tmp_path_factory):
    # One server for the whole module: every bad request hits the same process, which must
    # keep serving. A 64 KiB message limit makes the size check cheap to reach.
    d = make_model_dir(tmp_path_factory.mktemp("bad"))
    with running(aloop, settings_for(d, max_message_bytes=64 * 1024)) as server:
        clients = Clients(server.port)
        yield server, clients
        clients.close()


def assert_still_serving(clients):
    r = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)
    assert len(r.purification.reconstruction_error) == 1


@pytest.mark.parametrize("case", list(CASES))
def test_bad_purify_request(shared, case):
    _, clients = shared
    request, code, words = CASES[case]
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(request, timeout=30)
    assert e.value.code() == code, e.value.details()
    assert words in e.value.details()
    assert "Traceback" not in e.value.details()
    assert_still_serving(clients)


V2_CASES = {
    "unknown datatype": (lambda: _v2(images(1).astype(np.float64), "FP64"), INVALID, "FP64"),
    "byte length": (lambda: _v2(images(1), "FP32", shape=[1, 1, 8, 9]), INVALID, "bytes"),
    "wrong image size": (lambda: _v2(np.zeros((1, 1, 6, 6), np.float32), "FP32"), INVALID, "8x8"),
    "NaN": (lambda: v2_request(nan_images()), INVALID, "NaN"),
    "two inputs": (lambda: _two_inputs(), INVALID, "one input"),
    "unknown output": (lambda: _with_output("logits"), INVALID, "unknown outputs"),
    "bad layout": (lambda: _layout("NWHC"), INVALID, "layout"),
    "steps above cap": (lambda: v2_request(images(1), purifier_steps=10_000), INVALID, "limit of 200"),
    "raw count": (lambda: _raw_count(), INVALID, "raw_input_contents"),
    "bad png": (lambda: _bytes_input([b"not an image"]), INVALID, "PNG or JPEG"),
    "negative dimension": (lambda: _v2(images(1), "FP32", shape=[-1, 1, 8, 8]), INVALID, "negative"),
}


def _v2(arr, datatype, shape=None):
    req = v2_pb.ModelInferRequest(model_name="purifier")
    req.inputs.add(name="images", datatype=datatype, shape=shape or list(arr.shape))
    req.raw_input_contents.append(arr.tobytes())
    return req


def _two_inputs():
    req = v2_request(images(1))
    req.inputs.add(name="other", datatype="FP32", shape=[1])
    req.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    return req


def _with_output(name):
    req = v2_request(images(1))
    req.outputs.add(name=name)
    return req


def _layout(value):
    req = v2_request(images(1))
    req.inputs[0].parameters["layout"].string_param = value
    return req


def _raw_count():
    req = v2_request(images(1))
    req.raw_input_contents.append(b"extra")
    return req


def _bytes_input(blobs):
    req = v2_pb.ModelInferRequest(model_name="purifier")
    req.inputs.add(name="images", datatype="BYTES", shape=[len(blobs)])
    req.inputs[0].contents.bytes_contents.extend(blobs)
    return req


@pytest.mark.parametrize("case", list(V2_CASES))
def test_bad_v2_request(shared, case):
    _, clients = shared
    make, code, words = V2_CASES[case]
    with pytest.raises(grpc.RpcError) as e:
        clients.v2.ModelInfer(make(), timeout=30)
    assert e.value.code() == code, e.value.details()
    assert words in e.value.details()
    assert_still_serving(clients)


def test_message_over_the_size_limit_is_resource_exhausted(shared):
    _, clients = shared
    big = np.zeros((300, 1, 8, 8), np.float32)  # 76 KB > the 64 KiB limit of this server
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(raw(big), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(clients)


def test_deadline_too_short_is_deadline_exceeded(shared):
    _, clients = shared
    request = pb.PurifyRequest(tensor=tensor(images(4)), options=pb.ProjectionOptions(steps=200, restarts=8))
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(request, timeout=0.005)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_serving(clients)


def test_unexpected_error_is_internal_without_traceback(shared, monkeypatch):
    server, clients = shared

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.plane.engine, "validate", boom)
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in e.value.details() and "request id" in e.value.details()
    monkeypatch.undo()
    assert_still_serving(clients)
