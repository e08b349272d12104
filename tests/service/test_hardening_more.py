"""Issue 11's last items: request ids checked over REST as over gRPC (one rule), and every
outcome counted once, with the right code, in ``purifier_requests_total`` and
``purifier_rejected_total{reason}``."""

from __future__ import annotations

import json

import grpc
import pytest

from purifier.proto.purifier.v1 import purifier_pb2 as pb

from .conftest import Clients, images, make_model_dir, running, settings_for, tensor
from .test_rest import call
from .test_rpcs import metric, scrape

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(aloop, tmp_path_factory):
    d = make_model_dir(tmp_path_factory.mktemp("more"))
    with running(aloop, settings_for(d, http_port=0, max_message_bytes=64 * 1024)) as server:
        clients = Clients(server.port)
        yield server, clients
        clients.close()


def spy_batches(server) -> list:
    """Record each projection batch's size; returns the list (undo with ``unspy``)."""
    seen, real = [], server.plane.batcher.compute

    def spy(x, cfg, **kw):
        seen.append(x.shape[0])
        return real(x, cfg, **kw)

    spy.real = real
    server.plane.batcher.compute = spy
    return seen


def unspy(server) -> None:
    server.plane.batcher.compute = server.plane.batcher.compute.real


def json_body(n: int = 1, **extra) -> dict:
    x = images(n)
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}],
            **extra}


REST_BAD_IDS = {
    "header too long": ({"x-request-id": "x" * 129}, {}, "at most 128"),
    "header not ascii": ({"x-request-id": "caf\u00e9"}, {}, "printable ASCII"),
    "header control character": ({"x-request-id": "a\x01b"}, {}, "printable ASCII"),
    "body id too long": ({}, {"id": "y" * 200}, "at most 128"),
    "body id with newline": ({}, {"id": "a\nb"}, "printable ASCII"),
    "body id not ascii": ({"x-request-id": "fine-1"}, {"id": "\u00fcber"}, "printable ASCII"),
}


@pytest.mark.parametrize("case", list(REST_BAD_IDS))
def test_rest_refuses_a_bad_request_id_before_any_work(live, case):
    server, _ = live
    headers, extra, words = REST_BAD_IDS[case]
    seen = spy_batches(server)
    try:
        before = metric(scrape(server), "purifier_requests_total", method="rest:ModelInfer", code="INVALID_ARGUMENT")
        status, answer_headers, raw = call(server, "/v2/models/purifier/infer", json_body(2, **extra), headers)
        error = json.loads(raw)["error"]
        assert status == 400 and "request id" in error and words in error, error
        assert answer_headers["x-request-id"].isalnum()             # a fresh id to find the log line by
        after = metric(scrape(server), "purifier_requests_total", method="rest:ModelInfer", code="INVALID_ARGUMENT")
        assert after == before + 1
        assert seen == []                                           # nothing was projected
    finally:
        unspy(server)


def test_rest_bad_header_id_is_refused_on_every_route(live):
    server, _ = live
    status, headers, raw = call(server, "/v2/health/ready", headers={"x-request-id": "z" * 300})
    assert status == 400 and "request id" in json.loads(raw)["error"] and headers["x-request-id"].isalnum()


def test_rest_good_ids_are_echoed_and_the_body_id_wins(live):
    server, _ = live
    status, headers, raw = call(server, "/v2/models/purifier/infer", json_body(1, id="body-7"),
                                {"x-request-id": "header-7"})
    assert status == 200 and json.loads(raw)["id"] == "body-7" and headers["x-request-id"] == "body-7"
    status, headers, _ = call(server, "/v2/models/purifier/infer", json_body(1), {"x-request-id": "header-8"})
    assert status == 200 and headers["x-request-id"] == "header-8"
    edge = "~ !" * 42 + "ab"                                        # 128 printable characters
    status, headers, _ = call(server, "/v2/health/live", headers={"x-request-id": edge})
    assert status == 200 and headers["x-request-id"] == edge
