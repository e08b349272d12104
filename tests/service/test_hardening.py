"""Issue 11's probes, over both APIs against one live server: every malformed request is
INVALID_ARGUMENT naming its field, oversized files are refused from their headers, caller
messages carry no paths or library names, request ids are checked before any work, and a
batch whose callers are gone stops computing."""

from __future__ import annotations

import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

from purifier.projection import Abandoned
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.server import codec

from .conftest import Clients, images, make_model_dir, running, settings_for, tensor, v2_request
from .test_rpcs import metric, scrape

pytestmark = pytest.mark.integration
INVALID = grpc.StatusCode.INVALID_ARGUMENT
HUGE = [2 ** 32, 2 ** 32, 1, 1]


@pytest.fixture(scope="module")
def shared(aloop, tmp_path_factory):
    d = make_model_dir(tmp_path_factory.mktemp("hard"))
    # max_compute: 16 images x 200 steps x 8 restarts (FAST prunes to 1 after the first step:
    # 16 x (8 + 199) = 3,312 latent-steps) is within the L and R caps and above this budget; a
    # full batch of the default (16 x 65 = 1,040) is within it
    with running(aloop, settings_for(d, max_compute=3000, max_decode_bytes=64 * 1024)) as server:
        clients = Clients(server.port)
        yield server, clients
        clients.close()


def png_header(width: int, height: int, body: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grey); the body need not decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + body


def v2_raw(shape, datatype="FP32", data=b""):
    req = v2_pb.ModelInferRequest(model_name="purifier")
    req.inputs.add(name="images", datatype=datatype, shape=shape)
    req.raw_input_contents.append(data)
    return req


def v2_contents(shape, datatype="FP32", values=()):
    req = v2_pb.ModelInferRequest(model_name="purifier")
    inp = req.inputs.add(name="images", datatype=datatype, shape=shape)
    getattr(inp.contents, codec.CONTENTS_FIELD[datatype]).extend(values)
    return req


def v2_with(string_params=None, input_params=None, **int_params):
    req = v2_request(images(1))
    for k, v in (string_params or {}).items():
        req.parameters[k].string_param = v
    for k, v in int_params.items():
        req.parameters[k].int64_param = v
    for k, v in (input_params or {}).items():
        req.inputs[0].parameters[k].int64_param = v
    return req


def both_raw_and_contents():
    req = v2_request(images(1))
    req.inputs[0].contents.fp32_contents.extend(images(1).reshape(-1).tolist())
    return req


def v2_files(blobs):
    req = v2_pb.ModelInferRequest(model_name="purifier")
    req.inputs.add(name="images", datatype="BYTES", shape=[len(blobs)])
    req.inputs[0].contents.bytes_contents.extend(blobs)
    return req


def v1_files(blobs):
    return pb.PurifyRequest(encoded=pb.EncodedImages(images=blobs))


BIG_PNGS = [png_header(12000, 12000, bytes(100)) for _ in range(12)]
# a header of the model's size over a body no decoder accepts: the decoder's own words are long
BROKEN_PNG = png_header(8, 8, b"\x00\x00\x00\x04IDATjunk\x00\x00\x00\x00")

V2_CASES = {
    # name: (request, words the message must contain)
    "huge shape raw": (lambda: v2_raw(HUGE), "shape"),
    "huge shape contents": (lambda: v2_contents(HUGE), "shape"),
    "huge shape files": (lambda: v2_raw(HUGE, "BYTES"), "shape"),
    "uint8 value 300": (lambda: v2_contents([1, 1, 8, 8], "UINT8", [300] + [0] * 63), "uint_contents"),
    "layout as an integer": (lambda: v2_with(input_params={"layout": 1}), "layout"),
    "steps not a number": (lambda: v2_with({"purifier_steps": "ten"}), "purifier_steps"),
    "steps superscript digit": (lambda: v2_with({"purifier_steps": "\u00b2"}), "purifier_steps"),
    "23-digit seed": (lambda: v2_with({"purifier_seed": "1" * 23}), "seed"),
    "negative seed": (lambda: v2_with(purifier_seed=-1), "seed"),
    "raw and contents": (both_raw_and_contents, "not both"),
    "id with newline": (lambda: _with_id(v2_request(images(1)), "a\nb"), "request id"),
    "id not ascii": (lambda: _with_id(v2_request(images(1)), "caf\u00e9"), "request id"),
    "id too long": (lambda: _with_id(v2_request(images(1)), "x" * 129), "request id"),
    "compute budget": (lambda: v2_request(images(16), purifier_steps=200, purifier_restarts=8), "max_compute"),
    "12 files of 12000x12000": (lambda: v2_files(BIG_PNGS), "12000x12000"),
    "too many files": (lambda: v2_files([png_header(8, 8)] * 17), "limit of 16"),
    "too many file bytes": (lambda: v2_files([png_header(8, 8, bytes(40_000))] * 2), "bytes per request"),
    "broken file": (lambda: v2_files([BROKEN_PNG]), "image 0 is not a decodable PNG or JPEG"),
    "gif": (lambda: v2_files([b"GIF89a" + bytes(20)]), "PNG or JPEG"),
}

V1_CASES = {
    "huge shape": (lambda: pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=HUGE)), "shape"),
    "id with newline": (lambda: pb.PurifyRequest(request_id="a\nb", tensor=tensor(images(1))), "request id"),
    "id not ascii": (lambda: pb.PurifyRequest(request_id="\u00fcber", tensor=tensor(images(1))), "request id"),
    "seed above 2^64 - 1 cannot be sent; top seed works": None,
    "compute budget": (lambda: pb.PurifyRequest(tensor=tensor(images(16)),
                                                options=pb.ProjectionOptions(steps=200, restarts=8)), "max_compute"),
    "12 files of 12000x12000": (lambda: v1_files(BIG_PNGS), "12000x12000"),
    "too many files": (lambda: v1_files([png_header(8, 8)] * 17), "limit of 16"),
    "broken file": (lambda: v1_files([BROKEN_PNG]), "image 0 is not a decodable PNG or JPEG"),
}
V1_CASES = {k: v for k, v in V1_CASES.items() if v is not None}

# words no caller may read: source paths, build directories, library names
LEAKS = ("/", "\\", ".cpp", ".py", "torchvision", "torch", "libpng", "Traceback")


def _with_id(req, rid):
    req.id = rid
    return req


def assert_still_serving(clients):
    r = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)
    assert len(r.purification.reconstruction_error) == 1


def check_refusal(e, words):
    assert e.value.code() == INVALID, e.value.details()
    assert words in e.value.details(), e.value.details()
    assert not any(leak in e.value.details() for leak in LEAKS), e.value.details()


@pytest.mark.parametrize("case", list(V2_CASES))
def test_malformed_v2_request_is_invalid_argument(shared, case):
    _, clients = shared
    make, words = V2_CASES[case]
    with pytest.raises(grpc.RpcError) as e:
        clients.v2.ModelInfer(make(), timeout=30)
    check_refusal(e, words)
    assert_still_serving(clients)


def test_compute_budget_refusals_are_counted_by_reason(shared):
    server, clients = shared
    before = metric(scrape(server), "purifier_rejected_total", reason="compute_budget")
    with pytest.raises(grpc.RpcError):
        clients.v2.ModelInfer(V2_CASES["compute budget"][0](), timeout=30)
    assert metric(scrape(server), "purifier_rejected_total", reason="compute_budget") == before + 1


@pytest.mark.parametrize("case", list(V1_CASES))
def test_malformed_v1_request_is_invalid_argument(shared, case):
    _, clients = shared
    make, words = V1_CASES[case]
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(make(), timeout=30)
    check_refusal(e, words)
    assert_still_serving(clients)


def test_largest_seed_is_accepted(shared):
    _, clients = shared
    request = pb.PurifyRequest(tensor=tensor(images(1)), options=pb.ProjectionOptions(seed=2 ** 64 - 1))
    assert len(clients.purifier.Purify(request, timeout=30).purification.reconstruction_error) == 1


def test_bad_request_id_is_refused_before_any_work_and_counted(shared):
    server, clients = shared
    seen = []
    real = server.plane.batcher.compute

    def spy(x, cfg, **kw):
        seen.append(x.shape[0])
        return real(x, cfg, **kw)

    server.plane.batcher.compute = spy
    try:
        before = metric(scrape(server), "purifier_requests_total", method="ModelInfer", code="INVALID_ARGUMENT")
        with pytest.raises(grpc.RpcError) as e:
            clients.v2.ModelInfer(_with_id(v2_request(images(2)), "line\nbreak"), timeout=30)
        check_refusal(e, "request id")
        trailing = dict(e.value.trailing_metadata() or ())
        assert trailing.get("x-request-id", "").isalnum()           # a fresh id to find the log line by
        after = metric(scrape(server), "purifier_requests_total", method="ModelInfer", code="INVALID_ARGUMENT")
        assert after == before + 1
        assert seen == []                                           # nothing was projected
    finally:
        server.plane.batcher.compute = real


def test_caller_message_of_a_broken_file_is_generic_and_the_log_has_the_detail(shared, caplog):
    _, clients = shared
    with caplog.at_level("INFO", logger="purifier.validation"):
        with pytest.raises(grpc.RpcError) as e:
            clients.purifier.Purify(v1_files([BROKEN_PNG]), timeout=30)
    check_refusal(e, "not a decodable PNG or JPEG")
    details = [getattr(r, "fields", {}).get("detail", "") for r in caplog.records if r.name == "purifier.validation"]
    assert any(details), "the decoder's own message belongs in the log"


class StepGate:
    """Wrap a server's compute: when the projection asks ``should_stop`` for the ``at``-th
    time, signal ``reached`` and hold until ``release`` is set, then answer as the real
    should_stop does. Records each batch's outcome and how often should_stop was asked."""

    def __init__(self, server, at: int = 5):
        self.server, self.at = server, at
        self.reached, self.release = threading.Event(), threading.Event()
        self.asked = 0
        self.outcomes: list[str] = []
        self.real = server.plane.batcher.compute
        server.plane.batcher.compute = self.compute

    def compute(self, x, cfg, should_stop):
        def gated():
            self.asked += 1
            if self.asked == self.at:
                self.reached.set()
                self.release.wait(30)
                for _ in range(3000):  # the server notices the cancel on its loop: let it
                    if should_stop():
                        break
                    time.sleep(0.01)
            return should_stop()

        try:
            out = self.real(x, cfg, should_stop=gated)
        except Abandoned:
            self.outcomes.append("abandoned")
            self.stopped_after = self.asked   # asks before it stopped (later batches ask too)
            raise
        self.outcomes.append("finished")
        return out

    def restore(self):
        self.release.set()
        self.server.plane.batcher.compute = self.real


def long_request():
    # 200 steps, at the server's caps and within its compute budget
    return pb.PurifyRequest(tensor=tensor(images(4)), options=pb.ProjectionOptions(steps=200, restarts=8))


def test_cancelled_request_stops_its_projection(shared):
    server, clients = shared
    gate = StepGate(server)
    abandoned = metric(scrape(server), "purifier_rejected_total", reason="abandoned")
    try:
        call = clients.purifier.Purify.future(long_request(), timeout=60)
        assert gate.reached.wait(30)
        call.cancel()
        gate.release.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        assert_still_serving(clients)      # runs after the abandoned batch: the worker is free
        assert gate.outcomes[0] == "abandoned"
        assert gate.stopped_after < 200    # stopped at a check, long before its 200th step
        assert metric(scrape(server), "purifier_rejected_total", reason="abandoned") == abandoned + 1
    finally:
        gate.restore()


def test_request_past_its_deadline_stops_its_projection(shared):
    server, clients = shared
    gate = StepGate(server)
    codes = {c: metric(scrape(server), "purifier_requests_total", method="Purify", code=c)
             for c in ("DEADLINE_EXCEEDED", "CANCELLED")}
    try:
        with pytest.raises(grpc.RpcError) as e:
            # the projection holds at its 5th step; the caller's deadline passes meanwhile
            clients.purifier.Purify(long_request(), timeout=2)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert gate.reached.is_set()
        gate.release.set()
        assert_still_serving(clients)
        assert gate.outcomes[0] == "abandoned" and gate.stopped_after < 200
        # counted once, as what it was
        assert metric(scrape(server), "purifier_requests_total", method="Purify",
                      code="DEADLINE_EXCEEDED") == codes["DEADLINE_EXCEEDED"] + 1
        assert metric(scrape(server), "purifier_requests_total", method="Purify",
                      code="CANCELLED") == codes["CANCELLED"]
    finally:
        gate.restore()


def test_stop_abandons_a_running_batch(aloop, tiny_model_dir):
    with running(aloop, settings_for(tiny_model_dir)) as server:
        clients = Clients(server.port)
        gate = StepGate(server)
        gate.release.set()  # hold only until the server cancels the call on stop
        call = clients.purifier.Purify.future(long_request(), timeout=60)
        assert gate.reached.wait(30)
        aloop.run(server.stop(grace=0), timeout=30)   # would wait out all 200 steps without the check
        assert gate.outcomes == ["abandoned"] and gate.stopped_after < 200
        with pytest.raises(grpc.RpcError):
            call.result()
        clients.close()


def test_compute_budget_below_a_full_default_batch_fails_at_start(tiny_model_dir):
    from purifier.engine import Engine, Limits
    from purifier.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-compute 100 is below a full batch"):
        Engine.load(tiny_model_dir, "cpu", "fast", Limits(16, 200, 8, max_compute=100))
