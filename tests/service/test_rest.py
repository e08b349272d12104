"""The V2 REST API (--http-port): plain HTTP requests as curl would send them, and
tritonclient.http (JSON tensors and Triton's binary tensor data extension), against the
same purification, pass-through and error mapping as gRPC."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from purifier.proto.purifier.v1 import purifier_pb2 as pb

from .conftest import Clients, images, running, running_classifier, settings_for, tensor, to_array
from .test_downstream import classify_locally
from .test_rpcs import metric, scrape

pytestmark = pytest.mark.integration


def call(server, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; errors are answers here, not exceptions."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data,
                                 headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def rest(aloop, tiny_model_dir):
    with running(aloop, settings_for(tiny_model_dir, http_port=0, max_message_bytes=1 << 20)) as server:
        yield server


@pytest.fixture
def triton_http():
    return pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")


def test_health_and_metadata_as_curl_sees_them(rest):
    assert call(rest, "/v2/health/live")[:1] == (200,)
    status, headers, body = call(rest, "/v2/health/ready", headers={"x-request-id": "probe-1"})
    assert status == 200 and json.loads(body) == {"ready": True} and headers["x-request-id"] == "probe-1"
    assert json.loads(call(rest, "/v2")[2])["name"] == "purifier"
    meta = json.loads(call(rest, "/v2/models/purifier")[2])
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert call(rest, "/v2/models/purifier/versions/1/ready")[0] == 200
    config = json.loads(call(rest, "/v2/models/purifier/config")[2])
    assert config["max_batch_size"] == 16 and config["input"][0]["data_type"] == "TYPE_FP32"


def test_json_infer_purifies(rest):
    x = images(2)
    status, _, body = call(rest, "/v2/models/purifier/infer", {
        "id": "j-1", "parameters": {"purifier_steps": 5, "purifier_restarts": 2},
        "inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}],
        "outputs": [{"name": "purified"}, {"name": "reconstruction_error"}]})
    assert status == 200
    answer = json.loads(body)
    assert answer["id"] == "j-1" and [o["name"] for o in answer["outputs"]] == ["purified", "reconstruction_error"]
    purified = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
    errors = np.asarray(answer["outputs"][1]["data"], np.float32)
    np.testing.assert_allclose(errors, ((purified - x) ** 2).reshape(2, -1).mean(1), rtol=1e-4, atol=1e-7)
    assert answer["parameters"]["purifier_steps"] == 5


@pytest.mark.parametrize("path, body, status, words", [
    ("/v2/models/nope/infer", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.5]}]},
     404, "nope"),
    ("/v2/models/purifier/infer", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                               "data": [0.5] * 63}]}, 400, "63 values"),
    ("/v2/models/purifier/infer", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                               "data": [2.0] * 64}]}, 400, "[0, 1]"),
    ("/v2/models/purifier/infer", b"{not json", 400, "not valid JSON"),
    ("/v2/models/purifier/infer", {"inputs": []}, 400, "inputs"),
])
def test_errors_are_http_statuses_with_json_bodies(rest, path, body, status, words):
    got, headers, raw = call(rest, path, body, {"content-type": "application/json"})
    assert got == status and headers["content-type"] == "application/json"
    assert words in json.loads(raw)["error"]


def test_a_body_over_the_message_limit_is_refused_before_it_is_read(rest):
    conn = http.client.HTTPConnection("127.0.0.1", rest.http_port, timeout=60)
    conn.putrequest("POST", "/v2/models/purifier/infer")
    conn.putheader("Content-Length", str(2 << 20))                   # the limit is 1 MiB here
    conn.endheaders()                                                 # and no body follows
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    conn.close()


def test_rest_requests_are_counted_by_route_and_model(rest):
    call(rest, "/v2/models/nope/ready")
    text = scrape(rest)
    assert metric(text, "purifier_requests_total", method="rest:ModelReady", code="NOT_FOUND", model="nope") == 1


def test_tritonclient_http_binary_and_json_tensors(triton_http, rest):
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{rest.http_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("purifier")
    assert client.get_model_metadata("purifier")["inputs"][0]["name"] == "images"
    x = images(3)
    for binary in (True, False):
        inp = triton_http.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [triton_http.InferRequestedOutput(n, binary_data=binary)
                   for n in ("purified", "reconstruction_error", "adversarial")]
        result = client.infer("purifier", [inp], outputs=outputs, request_id="h-1",
                              parameters={"purifier_steps": 5, "purifier_restarts": 2, "purifier_seed": 4})
        purified = result.as_numpy("purified")
        assert purified.shape == x.shape and result.as_numpy("adversarial").dtype == np.bool_
        np.testing.assert_allclose(result.as_numpy("reconstruction_error"),
                                   ((purified - x) ** 2).reshape(3, -1).mean(1), rtol=1e-4, atol=1e-7)
        assert result.get_response()["id"] == "h-1"
    assert client.get_model_config("purifier")["max_batch_size"] == 16
    stats = client.get_inference_statistics("purifier")["model_stats"][0]
    assert stats["name"] == "purifier" and stats["inference_count"] == 6
    client.close()


def test_tritonclient_http_pass_through_returns_the_downstreams_answer_on_purified_images(triton_http, aloop,
                                                                                         tiny_model_dir):
    with running_classifier(aloop, tiny_model_dir) as cls, \
            running(aloop, settings_for(tiny_model_dir, downstream=f"127.0.0.1:{cls.port}", http_port=0)) as server:
        client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
        assert client.is_model_ready("classifier")
        x = images(2)
        inp = triton_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("classifier", [inp], parameters={"purifier_seed": 3, "purifier_steps": 10})
        # the same seeded projection through Purify gives the images the classifier must have seen
        grpc_clients = Clients(server.port)
        p = grpc_clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x), options=pb.ProjectionOptions(
            seed=3, steps=10)), timeout=30).purification
        np.testing.assert_allclose(result.as_numpy("logits"), classify_locally(to_array(p.images)),
                                   rtol=1e-4, atol=1e-5)
        assert result.as_numpy("label").shape == (2,)
        assert len(result.get_response()["parameters"]["purifier_reconstruction_error"].split(",")) == 2
        with pytest.raises(triton_http.InferenceServerException) as e:   # the reference classifier has no config RPC
            client.get_model_config("classifier")
        assert "501" in str(e.value.status()) or "not implement" in str(e.value)
        grpc_clients.close()
        client.close()


def test_flagged_rejection_over_rest_names_the_images(aloop, tiny_model_dir):
    settings = settings_for(tiny_model_dir, http_port=0, on_flagged="reject", threshold=0.0)
    with running(aloop, settings) as server:
        x = images(2)
        status, headers, body = call(server, "/v2/models/purifier/infer", {
            "inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]})
        assert status == 400 and json.loads(body)["error"].startswith("rejected:")
        assert headers["purifier-flagged-indices"] == "0,1"


def rest_body(req) -> tuple[bytes, dict]:
    """A V2 gRPC request as tritonclient.http would send it: a JSON header, then the raw
    inputs and BYTES files as binary data; typed numeric contents as JSON ``data``."""
    from purifier.server import codec, v2

    header = {"id": req.id, "parameters": v2.params(req.parameters), "inputs": []}
    blobs = []
    for i, inp in enumerate(req.inputs):
        entry = {"name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape),
                 "parameters": v2.params(inp.parameters)}
        if req.raw_input_contents:
            blob = req.raw_input_contents[i]
        elif inp.datatype == "BYTES":
            blob = codec.join_bytes_elements(list(inp.contents.bytes_contents))
        else:
            blob, entry["data"] = None, list(getattr(inp.contents, codec.CONTENTS_FIELD[inp.datatype]))
        if blob is not None:
            entry["parameters"]["binary_data_size"] = len(blob)
            blobs.append(blob)
        header["inputs"].append(entry)
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text))}


def _rest_cases():
    from .test_hardening import V2_CASES

    # REST carries each input once (no raw-and-contents), and its request id is the
    # x-request-id header, checked apart (test_health_and_metadata_as_curl_sees_them)
    skip = {"raw and contents", "id with newline", "id not ascii", "id too long"}
    return {k: v for k, v in V2_CASES.items() if k not in skip}


@pytest.fixture(scope="module")
def rest_hardened(aloop, tmp_path_factory):
    from .conftest import make_model_dir

    d = make_model_dir(tmp_path_factory.mktemp("rest-hard"))
    with running(aloop, settings_for(d, http_port=0, max_compute=3000, max_decode_bytes=64 * 1024)) as server:  # as test_hardening
        yield server


@pytest.mark.parametrize("case", list(_rest_cases()))
def test_issue_11_bad_inputs_are_400_over_rest_too(rest_hardened, case):
    from .test_hardening import LEAKS

    make, words = _rest_cases()[case]
    words = {"uint8 value 300": "not UINT8 integers (0..255)"}.get(case, words)   # REST's field is 'data'
    body, headers = rest_body(make())
    status, _, raw = call(rest_hardened, "/v2/models/purifier/infer", body, headers)
    error = json.loads(raw)["error"]
    assert status == 400 and words in error, error
    assert not any(leak in error for leak in LEAKS), error


def test_stop_lets_a_rest_request_in_flight_finish(aloop, tiny_model_dir):
    import asyncio
    import threading

    from .conftest import hold_batches

    with running(aloop, settings_for(tiny_model_dir, http_port=0)) as server:
        seen = []
        gate = hold_batches(server, seen)
        x = images(1)
        answers = []
        body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
        thread = threading.Thread(target=lambda: answers.append(call(server, "/v2/models/purifier/infer", body)))
        thread.start()
        end = time.monotonic() + 30
        while not seen:                                   # the request's batch is at the gate
            assert time.monotonic() < end and thread.is_alive()
            time.sleep(0.01)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=30), aloop.loop)
        while server.state.ready:                         # draining has begun
            assert time.monotonic() < end
            time.sleep(0.01)
        gate.set()
        thread.join(60)
        stopping.result(60)
        assert answers and answers[0][0] == 200 and json.loads(answers[0][2])["outputs"]
