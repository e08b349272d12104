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


# --- every outcome counted once, with its code -----------------------------------------------

@pytest.fixture(scope="module")
def small(aloop, tmp_path_factory):
    """A server whose messages may be 2 KiB: 16 UINT8 8x8 images (1 KiB) fit in a request,
    their FP32 purified images (4 KiB) do not fit in the answer."""
    d = make_model_dir(tmp_path_factory.mktemp("small"))
    with running(aloop, settings_for(d, max_message_bytes=2048)) as server:
        clients = Clients(server.port)
        yield server, clients
        clients.close()


def codes(server, method: str) -> dict[str, float]:
    text = scrape(server)
    return {c: metric(text, "purifier_requests_total", method=method, code=c)
            for c in ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED",
                      "UNAVAILABLE", "INTERNAL")}


def changed(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def uint8_images(n: int):
    return (images(n) * 255).round().astype("uint8")


def test_an_answer_over_the_limit_is_resource_exhausted_and_counted_once(small):
    server, clients = small
    before = codes(server, "Purify")
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(uint8_images(16))), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-message-bytes" in e.value.details() and "answer" in e.value.details()   # ours, not gRPC's
    assert changed(before, codes(server, "Purify")) == {"RESOURCE_EXHAUSTED": 1}
    answer = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(uint8_images(2))), timeout=60)
    assert len(answer.purification.reconstruction_error) == 2      # one that fits still goes out


def test_a_request_over_the_limit_is_refused_by_grpc_before_any_handler(small):
    """What gRPC lets a server see of it: nothing. The core answers RESOURCE_EXHAUSTED before a
    handler, an interceptor's continuation or a done-callback runs, so purifier cannot count it
    (docs/service.md, Metrics). If a gRPC release starts handing it to the handler, this fails."""
    server, clients = small
    before = codes(server, "Purify")
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(16))), timeout=60)     # 4 KiB of FP32
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in e.value.details()
    assert changed(before, codes(server, "Purify")) == {}
    clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(uint8_images(1))), timeout=60)   # still serving


def wait_for(condition, seconds: float = 30) -> None:
    import time

    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def rejected(server, reason: str) -> float:
    return metric(scrape(server), "purifier_rejected_total", reason=reason)


def test_a_deadline_that_passes_in_the_queue_is_counted_once_as_deadline(live, monkeypatch):
    from purifier.engine import batching

    from .conftest import hold_batches

    # No estimate: on a loaded machine an earlier 1-image batch can take longer than this
    # request's 0.3 s, and it would be refused on arrival (test_batching.py tests that path).
    monkeypatch.setattr(batching, "ESTIMATE_TTL_S", 0.0)
    server, clients = live
    seen = []
    gate = hold_batches(server, seen)
    try:
        first = clients.purifier.Purify.future(pb.PurifyRequest(tensor=tensor(images(1))), timeout=60)
        wait_for(lambda: seen)                            # the first batch holds the worker
        before, dropped = codes(server, "Purify"), rejected(server, "deadline")
        with pytest.raises(grpc.RpcError) as e:
            clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(2))), timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        first.result(60)
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=60)  # after the queue's turn
        assert len(seen) == 2                             # the expired request never reached compute
        assert rejected(server, "deadline") == dropped + 1
        assert changed(before, codes(server, "Purify")) == {"DEADLINE_EXCEEDED": 1, "OK": 2}
    finally:
        gate.set()
        unspy_gate(server)


def test_a_cancel_in_the_queue_is_counted_once_as_cancelled(live):
    import time

    from .conftest import hold_batches

    server, clients = live
    seen = []
    gate = hold_batches(server, seen)
    try:
        first = clients.purifier.Purify.future(pb.PurifyRequest(tensor=tensor(images(1))), timeout=60)
        wait_for(lambda: seen)
        before, dropped = codes(server, "Purify"), rejected(server, "cancelled")
        second = clients.purifier.Purify.future(pb.PurifyRequest(tensor=tensor(images(2))), timeout=60)
        end = time.monotonic() + 30
        while server.plane.batcher.depth < 1:            # queued behind the held batch
            assert time.monotonic() < end
            time.sleep(0.01)
        second.cancel()
        while codes(server, "Purify")["CANCELLED"] == before["CANCELLED"]:   # the server saw the cancel
            assert time.monotonic() < end
            time.sleep(0.01)
        gate.set()
        first.result(60)
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=60)
        assert len(seen) == 2
        assert rejected(server, "cancelled") == dropped + 1
        assert changed(before, codes(server, "Purify")) == {"CANCELLED": 1, "OK": 2}
    finally:
        gate.set()
        unspy_gate(server)


def unspy_gate(server) -> None:
    """Undo ``hold_batches``: the gated compute wraps the engine's own."""
    server.plane.batcher.compute = server.plane.engine.project


# --- abandonment inside a step -----------------------------------------------------------------

def test_an_eager_step_is_abandoned_at_a_layer_not_only_between_steps(tiny_model_dir):
    import torch

    from purifier.engine import Engine
    from purifier.projection import Abandoned

    engine = Engine.load(tiny_model_dir, "cpu", "fast")
    generator = engine.bundle.generator
    asked = []

    def stop_at_the_first_layer():
        asked.append(1)
        return len(asked) > 2      # 1: before the lock's wait; 2: before step 0; 3: inside step 0

    x = torch.full((2, *engine.image_shape), 0.5)
    with pytest.raises(Abandoned, match="inside a step"):
        engine.project(x, engine.config(steps=1, restarts=2), should_stop=stop_at_the_first_layer)
    assert len(asked) == 3
    assert not generator._forward_hooks                                 # the hooks lived for that call only
    images, errors = engine.project(x, engine.config(steps=3, restarts=2), should_stop=lambda: False)
    assert images.shape == (2, *engine.image_shape) and not generator._forward_hooks
    # backward is asked too: stop once the forward's checks (one per weighted layer) are past
    layers = sum(1 for m in generator.modules() if next(m.parameters(recurse=False), None) is not None)
    asked.clear()
    with pytest.raises(Abandoned):
        engine.project(x, engine.config(steps=1, restarts=2),
                       should_stop=lambda: asked.append(1) or len(asked) > 2 + layers)
    assert len(asked) == 3 + layers


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_serve_sets_a_passive_openmp_wait_policy_before_torch_loads(tmp_path, preset, expected):
    import os

    from .conftest import environment_serve_runs_with

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    seen = environment_serve_runs_with(tmp_path, env, ["OMP_WAIT_POLICY"])
    assert (seen["OMP_WAIT_POLICY"], seen["torch_loaded"]) == (expected, False)   # set before torch loaded


# --- no compute for a request that cannot finish in time ---------------------------------------

def test_a_request_whose_batch_cannot_finish_before_its_deadline_is_dropped_before_compute():
    """Under sustained overload every request waits until its batch can no longer finish in
    time; computing it anyway is what made the soak's goodput collapse (docs/service.md)."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from purifier.engine import Batcher
    from purifier.errors import DeadlineError
    from purifier.projection import FAST

    calls = []

    def compute(x, cfg, should_stop=None):      # 0.3 s a batch, and no stopping part-way
        calls.append(x.shape[0])
        time.sleep(0.3)
        return x.numpy(), np.zeros(x.shape[0], np.float32)

    async def go():
        b = Batcher(compute, ThreadPoolExecutor(1), max_batch_size=4, max_queue_delay_s=0, max_queue_size=8)
        b.start()
        try:
            x = torch.full((2, 1, 2, 2), 0.5)
            await b.submit(x, FAST)                                   # the first batch: nothing known yet
            with pytest.raises(DeadlineError, match="a batch like this one takes about 0.3"):
                await b.submit(x, FAST, deadline=time.monotonic() + 0.1)
            await b.submit(x, FAST, deadline=time.monotonic() + 5)    # time enough: computed
            await b.submit(torch.full((3, 1, 2, 2), 0.5), FAST, deadline=time.monotonic() + 0.1)  # no 3+ batch yet
            await b.submit(x, FAST.with_(steps=7), deadline=time.monotonic() + 0.1)   # other options: unknown
        finally:
            await b.close()

    asyncio.run(go())
    assert calls == [2, 2, 3, 2]              # the doomed request never reached compute


def test_a_stale_estimate_refuses_nothing(monkeypatch):
    """Dropped requests compute nothing, so the estimate that dropped them would never be
    renewed: one slow batch (a load spike) must not refuse short deadlines for ever."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from purifier.engine import batching
    from purifier.errors import DeadlineError
    from purifier.projection import FAST

    calls = []

    def compute(x, cfg, should_stop=None):
        calls.append(x.shape[0])
        time.sleep(0.3)
        return x.numpy(), np.zeros(x.shape[0], np.float32)

    async def go():
        b = batching.Batcher(compute, ThreadPoolExecutor(1), max_batch_size=4, max_queue_delay_s=0, max_queue_size=8)
        b.start()
        try:
            x = torch.full((2, 1, 2, 2), 0.5)
            await b.submit(x, FAST)                                   # took 0.3 s: the estimate
            with pytest.raises(DeadlineError):
                await b.submit(x, FAST, deadline=time.monotonic() + 0.2)
            monkeypatch.setattr(batching, "ESTIMATE_TTL_S", 0.0)      # the estimate has expired:
            try:                                                      # the same short deadline is tried
                await b.submit(x, FAST, deadline=time.monotonic() + 0.2)
            except DeadlineError:
                pass                                                  # (it may still miss it)
            assert len(calls) == 2
            monkeypatch.setattr(batching, "ESTIMATE_TTL_S", 30.0)
            with pytest.raises(DeadlineError):                        # renewed by that batch
                await b.submit(x, FAST, deadline=time.monotonic() + 0.2)
        finally:
            await b.close()

    asyncio.run(go())
    assert calls == [2, 2]
