"""Dynamic batching: merging, per-request answers, grouping, overload, deadlines, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from purifier.errors import DeadlineError, OverloadedError
from purifier.projection import FAST
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.engine import Batcher

from .conftest import Clients, hold_batches, images, running, settings_for, tensor, to_array
from .test_rpcs import metric, scrape


def fake_compute(calls):
    def compute(x, cfg, should_stop=None):
        calls.append((x.shape[0], cfg))
        return x.numpy() * 0.5, x.flatten(1).mean(1).numpy()
    return compute


def at_once(n, call):
    """call(i) for i < n from n threads released together; their results (None where one raised)."""
    results, barrier = [None] * n, threading.Barrier(n)

    def run(i):
        barrier.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_batcher(coro_fn, compute, **kw):
    async def main():
        params = dict(max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=16)
        params.update(kw)
        b = Batcher(compute, ThreadPoolExecutor(1), **params)
        b.start()
        try:
            return await coro_fn(b)
        finally:
            await b.close()
    return asyncio.run(main())


def test_batcher_merges_and_splits_answers():
    calls = []
    xs = [torch.full((n, 1, 2, 2), float(i) / 10) for i, n in enumerate([1, 2, 1, 3])]

    async def go(b):
        return await asyncio.gather(*(b.submit(x, FAST) for x in xs))

    results = run_batcher(go, fake_compute(calls))
    assert [c[0] for c in calls] == [7]                       # one batch of 1+2+1+3 images
    for x, (out, errors) in zip(xs, results):
        np.testing.assert_allclose(out, x.numpy() * 0.5)     # each caller gets its own slice
        assert errors.shape == (x.shape[0],)


def test_batcher_groups_by_options_and_runs_seeded_requests_alone():
    calls = []
    a, b_cfg, seeded = FAST, FAST.with_(steps=5), FAST.with_(seed=3)

    async def go(b):
        x = torch.zeros(1, 1, 2, 2)
        return await asyncio.gather(b.submit(x, a), b.submit(x, b_cfg), b.submit(x, a),
                                    b.submit(x, seeded), b.submit(x, seeded))

    run_batcher(go, fake_compute(calls))
    sizes = sorted((n, cfg.steps, cfg.seed) for n, cfg in calls)
    assert sizes == [(1, 5, None), (1, FAST.steps, 3), (1, FAST.steps, 3), (2, FAST.steps, None)]


def test_a_queue_of_mixed_options_is_served_whole():
    # Each request brings its own tensor, as in the server. Taking a batch out of a queue that
    # holds other options' requests ahead of it once compared the queued items field by field
    # (tensors included), which raised inside the worker and stopped it: every later request
    # waited forever while health checks still said SERVING (found by scripts/serve_check.py).
    calls = []
    cfgs = [FAST, FAST.with_(seed=3), FAST.with_(steps=5), FAST.with_(seed=4), FAST]

    async def go(b):
        for _ in range(3):   # the worker must still be there for the next round
            xs = [torch.full((1, 1, 2, 2), i / 10) for i in range(len(cfgs))]
            out = await asyncio.wait_for(asyncio.gather(*(b.submit(x, c) for x, c in zip(xs, cfgs))), 5)
            for x, (purified, _) in zip(xs, out):
                np.testing.assert_allclose(purified, x.numpy() * 0.5)
        return b._task.done()

    assert run_batcher(go, fake_compute(calls)) is False
    assert sum(n for n, _ in calls) == 3 * len(cfgs)


def test_a_bug_in_the_batchers_bookkeeping_fails_that_batch_and_the_next_is_served(caplog):
    class Metrics:   # batch_done raises once, after the batch computed
        failed = False

        def __getattr__(self, name):
            return _Anything()

        def batch_done(self, *args):
            if not Metrics.failed:
                Metrics.failed = True
                raise ValueError("bookkeeping bug")

    async def go(b):
        first = await asyncio.gather(b.submit(torch.zeros(1, 1, 2, 2), FAST), return_exceptions=True)
        second = await asyncio.wait_for(b.submit(torch.ones(1, 1, 2, 2), FAST), 5)
        return first[0], second

    with caplog.at_level("ERROR", logger="purifier.batcher"):
        first, (images, _) = run_batcher(go, fake_compute([]), metrics=Metrics())
    assert isinstance(first, ValueError)
    np.testing.assert_allclose(images, 0.5)
    assert "failed outside the computation" in caplog.text


def test_a_bug_before_a_batch_is_taken_fails_the_oldest_request_and_the_worker_goes_on(caplog):
    calls = []

    async def go(b):
        real = b._next_batch
        broken = {"once": True}

        async def next_batch():
            if broken.pop("once", False):
                raise KeyError("bookkeeping bug")
            return await real()

        b._next_batch = next_batch
        first = asyncio.ensure_future(b.submit(torch.zeros(1, 1, 2, 2), FAST))
        second = asyncio.ensure_future(b.submit(torch.ones(1, 1, 2, 2), FAST.with_(steps=5)))
        return await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)

    with caplog.at_level("ERROR", logger="purifier.batcher"):
        first, second = run_batcher(go, fake_compute(calls))
    assert isinstance(first, KeyError)                        # the oldest request took the error
    np.testing.assert_allclose(second[0], 0.5)                # and the next one was served
    assert "failed outside the computation" in caplog.text


class _Anything:
    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


def test_a_lone_sequential_caller_does_not_wait_for_the_queue_delay():
    calls = []

    async def go(b):
        start = time.monotonic()
        for _ in range(3):
            await b.submit(torch.zeros(1, 1, 2, 2), FAST)
        return time.monotonic() - start

    elapsed = run_batcher(go, fake_compute(calls), max_queue_delay_s=2.0)
    assert elapsed < 1.0 and [n for n, _ in calls] == [1, 1, 1]


def test_batcher_respects_max_batch_size():
    calls = []

    async def go(b):
        return await asyncio.gather(*(b.submit(torch.zeros(3, 1, 2, 2), FAST) for _ in range(4)))

    run_batcher(go, fake_compute(calls), max_batch_size=7)
    assert all(n <= 7 for n, _ in calls) and sum(n for n, _ in calls) == 12


def test_failed_batch_fails_each_request():
    def compute(x, cfg, should_stop=None):
        raise RuntimeError("out of memory")

    async def go(b):
        return await asyncio.gather(*(b.submit(torch.zeros(1, 1, 2, 2), FAST) for _ in range(3)),
                                    return_exceptions=True)

    results = run_batcher(go, compute)
    assert len(results) == 3 and all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)


def test_full_queue_refuses_at_once_and_stale_requests_are_dropped():
    calls = []

    def slow(x, cfg, **kw):
        time.sleep(0.2)
        return fake_compute(calls)(x, cfg)

    async def go(b):
        first = asyncio.ensure_future(b.submit(torch.zeros(1, 1, 2, 2), FAST))
        await asyncio.sleep(0.05)                       # the first batch is computing now
        stale = asyncio.ensure_future(b.submit(torch.zeros(1, 1, 2, 2), FAST.with_(steps=1),
                                               deadline=time.monotonic() + 0.05))
        queued = asyncio.ensure_future(b.submit(torch.zeros(1, 1, 2, 2), FAST))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="queue full"):
            await b.submit(torch.zeros(1, 1, 2, 2), FAST)
        return await asyncio.gather(first, stale, queued, return_exceptions=True)

    first, stale, queued = run_batcher(go, slow, max_queue_size=2, max_queue_delay_s=0)
    assert isinstance(stale, DeadlineError) and "nothing was computed" in str(stale)
    assert not isinstance(first, Exception) and not isinstance(queued, Exception)
    assert all(cfg.steps == FAST.steps for _, cfg in calls)    # the stale request never reached compute


@pytest.mark.integration
def test_concurrent_callers_each_get_their_own_answer_in_merged_batches(aloop, tiny_model_dir):
    n = 12
    # Flat images of distinct brightness: whatever G(z*) looks like, its error to each caller's
    # own image differs from its error to anyone else's, so a mixed-up answer cannot pass.
    xs = np.linspace(0.55, 1.0, n, dtype=np.float32)[:, None, None, None] * np.ones((n, 1, 8, 8), np.float32)
    with running(aloop, settings_for(tiny_model_dir, max_queue_delay_ms=100, max_batch_size=16)) as server:
        clients = Clients(server.port)
        results = at_once(n, lambda i: clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(xs[i:i + 1])), timeout=60))
        text = scrape(server)
        clients.close()
    for i, r in enumerate(results):
        out = to_array(r.purification.images)[0]                       # (1, 8, 8)
        to_each = ((xs - out) ** 2).reshape(n, -1).mean(1)              # its error to every caller's image
        reported = r.purification.reconstruction_error[0]
        assert np.abs(to_each - reported).argmin() == i                 # the error is to its own image
        assert reported == pytest.approx(to_each[i], rel=1e-4, abs=1e-7)
    batches = metric(text, "purifier_batch_size_count", model="default")
    assert metric(text, "purifier_batch_size_sum", model="default") == n                # the warm-up is not counted
    assert batches < n, f"{n} concurrent requests ran in {batches} batches: nothing merged"


@pytest.mark.integration
def test_concurrent_callers_with_mixed_options_are_all_answered(aloop, tiny_model_dir):
    # default, seeded and non-default options at once: three kinds of batch in one queue
    n = 9
    xs = np.linspace(0.55, 1.0, n, dtype=np.float32)[:, None, None, None] * np.ones((n, 1, 8, 8), np.float32)
    options = [pb.ProjectionOptions(), pb.ProjectionOptions(seed=7), pb.ProjectionOptions(steps=3, restarts=2)]
    with running(aloop, settings_for(tiny_model_dir, max_queue_delay_ms=100, max_batch_size=16)) as server:
        clients = Clients(server.port)
        for _ in range(2):   # the second round finds the same batcher still serving
            results = at_once(n, lambda i: clients.purifier.Purify(
                pb.PurifyRequest(tensor=tensor(xs[i:i + 1]), options=options[i % 3]), timeout=30))
            assert all(r is not None for r in results)
            for i, r in enumerate(results):
                out = to_array(r.purification.images)[0]
                assert r.purification.reconstruction_error[0] == pytest.approx(((xs[i] - out) ** 2).mean(), rel=1e-4)
        clients.close()


@pytest.mark.integration
def test_overload_answers_unavailable_and_server_recovers(aloop, tiny_model_dir):
    settings = settings_for(tiny_model_dir, max_queue_size=2, max_batch_size=1, max_queue_delay_ms=0)
    with running(aloop, settings) as server:
        gate = hold_batches(server)
        clients = Clients(server.port)
        codes = []

        def call():
            try:
                clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                assert "queue full" in e.details()

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(codes) < 5:              # one computing, two queued: the other five are refused at once
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join()
        assert codes.count(grpc.StatusCode.UNAVAILABLE) == 5 and codes.count(grpc.StatusCode.OK) == 3
        assert metric(scrape(server), "purifier_rejected_total", reason="queue_full") == 5
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=60)
        clients.close()


@pytest.mark.integration
def test_request_whose_deadline_passes_in_the_queue_is_not_computed(aloop, tiny_model_dir):
    with running(aloop, settings_for(tiny_model_dir, max_queue_delay_ms=0)) as server:
        seen = []
        gate = hold_batches(server, seen)
        clients = Clients(server.port)
        busy = threading.Thread(target=lambda: clients.purifier.Purify(
            pb.PurifyRequest(tensor=tensor(images(1))), timeout=60))
        busy.start()
        deadline = time.monotonic() + 20
        while not seen:                                                 # the first batch holds the worker
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as e:
            clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1)), options=pb.ProjectionOptions(steps=3)),
                                    timeout=0.2)
        gate.set()
        busy.join()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 3 not in seen                                            # dropped before compute
        clients.close()


def test_a_request_that_cannot_finish_is_refused_on_arrival_not_after_its_wait():
    """Refusal at admission (issue 11): with ~0.3 s batches measured, one batch running and
    two queued ahead, a request with 0.4 s left is refused at once (UNAVAILABLE: the work ahead
    is longer; counted `backlog`); one whose own batch is longer than its deadline is refused
    at once too (DEADLINE_EXCEEDED, as dispatch would); one with time enough is served; before
    anything was measured nothing is refused."""
    calls = []

    def slow(x, cfg, **kw):
        time.sleep(0.3)
        return fake_compute(calls)(x, cfg)

    async def go(b):
        x = torch.zeros(2, 1, 2, 2)
        other = FAST.with_(steps=7)
        # nothing measured yet: a short deadline is admitted (and may miss it at dispatch)
        await asyncio.gather(b.submit(x, FAST, deadline=time.monotonic() + 0.05), return_exceptions=True)
        await b.submit(x, FAST)                                       # measured: a batch of 2 takes ~0.3 s
        await b.submit(x, other)
        running = asyncio.ensure_future(b.submit(x, FAST))
        await asyncio.sleep(0.05)                                     # computing now
        queued = [asyncio.ensure_future(b.submit(x, other)), asyncio.ensure_future(b.submit(x, FAST.with_(steps=9)))]
        await asyncio.sleep(0)
        t0 = time.monotonic()
        with pytest.raises(OverloadedError, match="queued ahead .* refused on arrival") as e:
            await b.submit(x, FAST.with_(steps=9), deadline=time.monotonic() + 0.4)
        assert time.monotonic() - t0 < 0.05                           # at once, not after a wait
        with pytest.raises(DeadlineError, match="refused on arrival"):
            await b.submit(x, other, deadline=time.monotonic() + 0.1)   # its own batch alone takes 0.3 s
        served = await b.submit(x, other, deadline=time.monotonic() + 10)
        await asyncio.gather(running, *queued)
        return str(e.value), served

    message, served = run_batcher(go, slow, max_batch_size=2, max_queue_delay_s=0)
    assert served[0].shape == (2, 1, 2, 2)


def test_an_abandoned_batch_still_teaches_the_estimate():
    """Under overload whole batches are abandoned; if they taught nothing, the estimate would
    expire and every doomed request would be computed again. An abandoned batch records how
    long it ran (a lower bound): the next request that cannot finish is refused on arrival."""
    calls = []

    def slow(x, cfg, should_stop=None):
        calls.append(x.shape[0])
        for _ in range(100):                      # 1 s of work, stopping when nobody waits
            if should_stop is not None and should_stop():
                from purifier.projection import Abandoned
                raise Abandoned("nobody waits")
            time.sleep(0.01)
        return fake_compute([])(x, cfg)

    async def go(b):
        x = torch.zeros(2, 1, 2, 2)
        with pytest.raises(Exception):            # its caller leaves after 0.3 s: abandoned
            await asyncio.wait_for(b.submit(x, FAST, deadline=time.monotonic() + 0.3), 0.3)
        await asyncio.sleep(0.1)                  # the batch notices and stops
        with pytest.raises(DeadlineError, match="refused on arrival"):
            await b.submit(x, FAST, deadline=time.monotonic() + 0.1)

    run_batcher(go, slow, max_batch_size=2, max_queue_delay_s=0)
    assert calls == [2]                           # the second request was never computed
