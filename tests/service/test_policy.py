"""The flagged-input policy over real gRPC: ``reject`` fails the whole request with
FAILED_PRECONDITION and forwards nothing (checked at the downstream), ``forward`` forwards and
flags; purifier.v1 Purify/Classify, V2 model ``purifier`` and the V2 pass-through, single and
batched; a request may only tighten the server's policy; rejections are counted and logged."""

from __future__ import annotations

import json
import logging
from concurrent import futures

import grpc
import numpy as np
import pytest

from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.server import logs

from .conftest import Clients, images, running, settings_for, tensor, v2_outputs, v2_request
from .test_rpcs import metric, scrape

pytestmark = pytest.mark.integration

THRESHOLD = 0.05  # the tiny model card's


def checkerboard() -> np.ndarray:
    """(1, 1, 8, 8): an image no tiny generator draws (its error is far above the threshold)."""
    return (np.indices((8, 8)).sum(0) % 2)[None, None].astype(np.float32)


def mixed() -> np.ndarray:
    """A batch of 3: clean, flagged (index 1), clean."""
    x = images(3)
    x[1] = checkerboard()[0]
    return x


class Recording(v2_grpc.GRPCInferenceServiceServicer):
    """A downstream that records every image batch it is sent and answers two logits each."""

    def __init__(self):
        self.seen: list[v2_pb.ModelInferRequest] = []

    def ModelMetadata(self, request, context):
        T = v2_pb.ModelMetadataResponse.TensorMetadata
        return v2_pb.ModelMetadataResponse(name=request.name, inputs=[T(name="input", datatype="FP32",
                                                                        shape=[-1, 1, 8, 8])])

    def ModelInfer(self, request, context):
        self.seen.append(request)
        n = request.inputs[0].shape[0]
        r = v2_pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        r.outputs.add(name="logits", datatype="FP32", shape=[n, 2])
        r.raw_output_contents.append(np.tile(np.float32([0.25, 0.75]), (n, 1)).tobytes())
        return r


@pytest.fixture(scope="module")
def downstream():
    servicer = Recording()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def stack(aloop, model_dir, downstream, on_flagged: str):
    """(recording downstream, server, clients) for a server with policy ``on_flagged``."""
    recording, port = downstream
    with running(aloop, settings_for(model_dir, downstream=f"127.0.0.1:{port}", on_flagged=on_flagged)) as server:
        clients = Clients(server.port)
        recording.seen.clear()
        try:
            yield recording, server, clients
        finally:
            clients.close()


@pytest.fixture
def reject(aloop, tiny_model_dir, downstream):
    yield from stack(aloop, tiny_model_dir, downstream, "reject")


@pytest.fixture
def forward(aloop, tiny_model_dir, downstream):
    yield from stack(aloop, tiny_model_dir, downstream, "forward")


def rejected(call, req, flagged: list[int], threshold: float = THRESHOLD) -> grpc.RpcError:
    """Call, expect the documented rejection of the images ``flagged``; returns the error."""
    with pytest.raises(grpc.RpcError) as e:
        call(req, timeout=30)
    err = e.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details()
    assert details.startswith(f"rejected: {len(flagged)} of ") and f"threshold {threshold:g})" in details
    assert "nothing was forwarded" in details
    for i in flagged:
        assert f"image {i} error " in details
    trailing = dict(err.trailing_metadata())
    assert trailing["purifier-flagged-indices"] == ",".join(map(str, flagged))
    assert trailing["x-request-id"]
    return err


def v2_with_policy(x, model, name, policy):
    req = v2_request(x, model=model, name=name)
    req.parameters["purifier_on_flagged"].string_param = policy
    return req


# --- reject --------------------------------------------------------------------------------

def test_reject_classify_forwards_nothing_and_names_the_flagged_image(reject):
    recording, server, clients = reject
    err = rejected(clients.purifier.Classify, pb.ClassifyRequest(tensor=tensor(mixed()), request_id="r-9"), [1])
    assert dict(err.trailing_metadata())["x-request-id"] == "r-9"
    assert "image 0" not in err.details() and "image 2" not in err.details()
    assert recording.seen == []                                        # checked at the downstream
    r = clients.purifier.Classify(pb.ClassifyRequest(tensor=tensor(images(2))), timeout=30)   # clean passes
    assert len(recording.seen) == 1 and list(r.labels) == [1, 1]
    assert not any(r.purification.adversarial)


def test_reject_v2_pass_through_batched_and_single(reject):
    recording, server, clients = reject
    rejected(clients.v2.ModelInfer, v2_request(mixed(), model="classifier", name="input"), [1])
    rejected(clients.v2.ModelInfer, v2_request(checkerboard(), model="classifier", name="input"), [0])
    assert recording.seen == []
    r = clients.v2.ModelInfer(v2_request(images(3), model="classifier", name="input"), timeout=30)
    assert len(recording.seen) == 1 and v2_outputs(r)["logits"].shape == (3, 2)
    assert r.parameters["purifier_adversarial"].string_param == "0,0,0"


def test_reject_purify_and_v2_purifier_model(reject):
    recording, server, clients = reject
    rejected(clients.purifier.Purify, pb.PurifyRequest(tensor=tensor(mixed())), [1])
    rejected(clients.v2.ModelInfer, v2_request(mixed()), [1])
    x = images(2)
    assert len(clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x)), timeout=30).purification.adversarial) == 2
    assert v2_outputs(clients.v2.ModelInfer(v2_request(x), timeout=30))["adversarial"].tolist() == [False, False]


def test_a_request_may_not_loosen_a_reject_server(reject):
    recording, server, clients = reject
    for call, req in [
        (clients.purifier.Classify, pb.ClassifyRequest(tensor=tensor(mixed()), on_flagged=pb.ON_FLAGGED_FORWARD)),
        (clients.v2.ModelInfer, v2_with_policy(mixed(), "classifier", "input", "forward")),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stricter" in e.value.details()
    assert recording.seen == []


def test_rejections_are_counted_by_model_and_reason_and_logged_with_the_request_id(reject):
    recording, server, clients = reject
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record):   # formats in the server's task, where the request id is set
            lines.append(json.loads(logs.JsonFormatter().format(record)))

    handler = Collect(logging.INFO)
    logger = logging.getLogger("purifier.policy")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        rejected(clients.purifier.Classify, pb.ClassifyRequest(tensor=tensor(mixed()), request_id="r-1"), [1])
        req = v2_request(mixed(), model="classifier", name="input")
        req.id = "r-2"
        rejected(clients.v2.ModelInfer, req, [1])
        rejected(clients.purifier.Purify, pb.PurifyRequest(tensor=tensor(mixed()), request_id="r-3"), [1])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = scrape(server)
    assert metric(text, "purifier_policy_rejected_total", model="classifier", reason="flagged") == 2
    assert metric(text, "purifier_policy_rejected_total", model="purifier", reason="flagged") == 1
    assert [(d["request_id"], d["model"], d["flagged"], d["level"]) for d in lines] == [
        ("r-1", "classifier", [1], "info"), ("r-2", "classifier", [1], "info"), ("r-3", "purifier", [1], "info")]


# --- forward -------------------------------------------------------------------------------

def test_forward_purifies_forwards_and_flags(forward):
    recording, server, clients = forward
    r = clients.purifier.Classify(pb.ClassifyRequest(tensor=tensor(mixed())), timeout=30)
    assert list(r.purification.adversarial) == [False, True, False] and list(r.labels) == [1, 1, 1]
    r2 = clients.v2.ModelInfer(v2_request(mixed(), model="classifier", name="input"), timeout=30)
    assert r2.parameters["purifier_adversarial"].string_param == "0,1,0"
    assert [tuple(s.inputs[0].shape) for s in recording.seen] == [(3, 1, 8, 8), (3, 1, 8, 8)]
    assert metric(scrape(server), "purifier_policy_rejected_total", model="classifier", reason="flagged") == 0


def test_a_request_may_tighten_a_forward_server(forward):
    recording, server, clients = forward
    rejected(clients.purifier.Classify, pb.ClassifyRequest(tensor=tensor(mixed()), on_flagged=pb.ON_FLAGGED_REJECT),
             [1])
    rejected(clients.v2.ModelInfer, v2_with_policy(mixed(), "classifier", "input", "reject"), [1])
    rejected(clients.v2.ModelInfer, v2_with_policy(mixed(), "purifier", "images", "reject"), [1])
    rejected(clients.purifier.Purify, pb.PurifyRequest(tensor=tensor(mixed()), on_flagged=pb.ON_FLAGGED_REJECT), [1])
    assert recording.seen == []
    clients.v2.ModelInfer(v2_with_policy(images(2), "classifier", "input", "reject"), timeout=30)  # clean: passes
    assert len(recording.seen) == 1 and "purifier_on_flagged" not in recording.seen[0].parameters
    with pytest.raises(grpc.RpcError) as e:
        clients.v2.ModelInfer(v2_with_policy(mixed(), "classifier", "input", "drop"), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "forward, reject" in e.value.details()


# --- the threshold override -----------------------------------------------------------------

def test_the_servers_threshold_overrides_the_cards(aloop, tiny_model_dir):
    x = images(2)
    with running(aloop, settings_for(tiny_model_dir, threshold=0.0, on_flagged="reject")) as server:
        clients = Clients(server.port)
        try:
            rejected(clients.purifier.Purify, pb.PurifyRequest(tensor=tensor(x)), [0, 1], threshold=0.0)
        finally:
            clients.close()
    with running(aloop, settings_for(tiny_model_dir, threshold=1.0)) as server:
        clients = Clients(server.port)
        try:
            p = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(checkerboard())), timeout=30).purification
            assert p.threshold == pytest.approx(1.0) and list(p.adversarial) == [False]
        finally:
            clients.close()


def test_reject_without_any_threshold_fails_at_start_with_a_hint(aloop, tmp_path):
    from purifier.errors import ConfigError

    from .conftest import make_model_dir

    with pytest.raises(ConfigError, match="purifier calibrate"):
        with running(aloop, settings_for(make_model_dir(tmp_path, threshold=None), on_flagged="reject")):
            pass
