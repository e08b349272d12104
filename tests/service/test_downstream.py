"""Classify and V2 pass-through to a downstream V2 server: forwarding, deadline and request-id
propagation, retries, NOT_FOUND, and a downstream that goes down and comes back."""

from __future__ import annotations

import socket
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc
from purifier.proto.purifier.v1 import purifier_pb2 as pb

from .conftest import Clients, images, running, running_classifier, settings_for, tensor, to_array, v2_outputs, \
    v2_request
from .test_rpcs import metric, scrape

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def classify_locally(purified: np.ndarray) -> np.ndarray:
    from tests.conftest import tiny_classifier

    with torch.no_grad():
        return tiny_classifier()(torch.from_numpy(purified)).numpy()


@pytest.fixture
def stack(aloop, tiny_model_dir):
    with running_classifier(aloop, tiny_model_dir) as cls:
        with running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{cls.port}")) as server:
            clients = Clients(server.port)
            yield server, clients
            clients.close()


def test_classify_purifies_then_classifies(stack):
    _, clients = stack
    x = images(3)
    r = clients.purifier.Classify(pb.ClassifyRequest(tensor=tensor(x), request_id="r1"), timeout=30)
    purified = to_array(r.purification.images)
    logits = {o.name: to_array(o.tensor) for o in r.outputs}["logits"]
    np.testing.assert_allclose(logits, classify_locally(purified), rtol=1e-4, atol=1e-5)
    assert list(r.labels) == logits.argmax(1).tolist()
    assert r.model_name == "classifier" and r.request_id == "r1"
    assert len(r.purification.reconstruction_error) == 3


def test_v2_pass_through_forwards_purified_images(stack):
    _, clients = stack
    x = images(2)
    r = clients.v2.ModelInfer(v2_request(x, model="classifier", name="input", purifier_seed=3, purifier_steps=10),
                              timeout=30)
    assert r.model_name == "classifier" and r.id == "req-1"
    out = v2_outputs(r)
    # the same seeded projection through Purify gives the images the classifier must have seen
    p = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x), options=pb.ProjectionOptions(seed=3, steps=10)),
                                timeout=30).purification
    np.testing.assert_allclose(out["logits"], classify_locally(to_array(p.images)), rtol=1e-4, atol=1e-5)
    errors = [float(e) for e in r.parameters["purifier_reconstruction_error"].string_param.split(",")]
    np.testing.assert_allclose(errors, p.reconstruction_error, rtol=1e-4, atol=1e-9)
    assert r.parameters["purifier_adversarial"].string_param == "0,0"
    assert r.parameters["purifier_threshold"].double_param == pytest.approx(0.05)


def test_v2_pass_through_uint8_nhwc(stack):
    _, clients = stack
    x = (images(2) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1).copy()
    r = clients.v2.ModelInfer(v2_request(x, model="classifier", name="input"), timeout=30)
    assert v2_outputs(r)["label"].shape == (2,)


def test_model_ready_and_metadata_are_forwarded_and_unknown_models_not_found(stack):
    _, clients = stack
    assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier")).ready
    meta = clients.v2.ModelMetadata(v2_pb.ModelMetadataRequest(name="classifier"))
    assert meta.name == "classifier" and meta.inputs[0].name == "input"
    for call, req in [(clients.v2.ModelInfer, v2_request(images(1), model="nope")),
                      (clients.v2.ModelReady, v2_pb.ModelReadyRequest(name="nope"))]:
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details()


class FakeDownstream(v2_grpc.GRPCInferenceServiceServicer):
    """A V2 server that answers in typed contents, records what it saw, and can fail first."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.seen = []

    def ModelInfer(self, request, context):
        self.seen.append((context.time_remaining(), dict(context.invocation_metadata()), request))
        if len(self.seen) <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        r = v2_pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        o = r.outputs.add(name="score", datatype="FP32", shape=[request.inputs[0].shape[0], 2])
        o.contents.fp32_contents.extend([0.25, 0.75] * request.inputs[0].shape[0])
        return r


@pytest.fixture
def fake(aloop, tiny_model_dir, request):
    servicer = FakeDownstream(fail_first=getattr(request, "param", 0))
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{port}")) as server:
            clients = Clients(server.port)
            yield servicer, server, clients
            clients.close()
    finally:
        grpc_server.stop(0)


def test_deadline_and_request_id_reach_the_downstream_and_contents_become_raw(fake):
    servicer, _, clients = fake
    req = v2_request(images(1), model="scorer")
    req.id = "trace-me"
    r = clients.v2.ModelInfer(req, timeout=8)
    remaining, metadata, forwarded = servicer.seen[0]
    assert 0 < remaining < 8                              # the caller's remaining time, not a fresh one
    assert metadata.get("x-request-id") == "trace-me"
    assert not any(k.startswith("purifier_") for k in forwarded.parameters)
    assert len(r.raw_output_contents) == 1 and not r.outputs[0].HasField("contents")
    np.testing.assert_allclose(v2_outputs(r)["score"], [[0.25, 0.75]])


@pytest.mark.parametrize("fake", [2], indirect=True)
def test_unavailable_downstream_is_retried(fake):
    servicer, server, clients = fake
    r = clients.v2.ModelInfer(v2_request(images(1), model="scorer"), timeout=30)
    assert len(servicer.seen) == 3 and len(r.outputs) == 1
    assert metric(scrape(server), "purifier_downstream_retries_total") == 2


@pytest.mark.slow
def test_downstream_down_then_back_up(aloop, tiny_model_dir):
    port = free_port()
    with running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{port}")) as server:
        clients = Clients(server.port)
        request = pb.ClassifyRequest(tensor=tensor(images(1)))
        with pytest.raises(grpc.RpcError) as e:
            clients.purifier.Classify(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # the caller learns that the downstream is down, not where it is (the log has that)
        assert "unavailable (after 3 tries)" in e.value.details()
        assert str(port) not in e.value.details() and "127.0.0.1" not in e.value.details()
        assert clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)  # still serving
        assert not clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier"), timeout=30).ready
        with running_classifier(aloop, tiny_model_dir, port=port):
            deadline = time.monotonic() + 10
            while True:  # the channel reconnects within its (1 s max) backoff
                try:
                    r = clients.purifier.Classify(request, timeout=30)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    time.sleep(0.2)
            assert len(r.labels) == 1
            assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier"), timeout=30).ready
        clients.close()
