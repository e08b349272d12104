"""Dynamic batching: concurrent requests become one projection batch.

One worker task takes the oldest waiting request, waits until requests with the same
projection options fill ``max_batch_size`` images or the oldest has waited
``max_queue_delay``, then runs them as one batch in a worker thread (the event loop stays
free to decode and answer). Requests arriving while a batch runs wait for the next one,
so under load batches fill without any delay.

- A request that finds the queue empty right after a one-request batch runs at once:
  nothing suggests company is coming, so a lone sequential client pays no batching delay.
  As soon as requests overlap, the delay applies again.
- Requests with different options (L, R) cannot share a batch; a request with a seed runs
  alone, so the same seed gives the same answer whatever else is in flight.
- At most ``max_queue_size`` requests wait; the next is refused at once (OverloadedError).
- A request is refused on arrival, in microseconds instead of after its whole wait, when its
  deadline cannot be met by the same estimate the dispatch-time drop uses (``_estimate``,
  below), summed over the batches queued ahead of it and the running batch's remainder:
  DeadlineError when its own batch alone would outlast the deadline (what dispatch would
  decide, decided without the wait), OverloadedError (``rejected{reason="backlog"}``: retry
  on another replica) when the work ahead of it would. No estimate, no refusal.
- A request whose deadline passed while it waited is dropped before compute (DeadlineError);
  one whose caller went away is dropped too. So is one whose time left is shorter than the
  last batch of the same options and at least its size took (``_estimate``): it would be
  abandoned part-way, its compute wasted. Without this, under sustained overload every
  request waited in the queue until its batch could no longer finish in time, and the
  server computed almost only batches nobody received (scripts/soak.py at 2x capacity: 67
  answers in 10 minutes against a capacity of 7.9 per second; docs/service.md, Soak).
- A running batch is abandoned once all its callers are gone (cancelled, or past their
  deadline): ``compute`` is given ``should_stop``, which the projection asks between steps,
  so abandoned work stops within one step instead of running to its end.
- A batch that fails fails each of its requests with that error. So does a bug in the batcher's
  own bookkeeping: the worker logs it and goes on with the next batch, so one bad batch can
  never leave the server answering health checks while its queue is never served again.

The batcher is built whole: it is given the function that computes a batch (normally
``Engine.project``) and the executor to run it in. With ``metrics`` it records queue
depth, queue time, refusals (``rejected{reason}``: queue_full, shutdown; deadline and
cancelled: dropped from the queue before compute, its deadline passed or its caller gone;
backlog: refused on arrival, the work ahead of it longer than its deadline;
abandoned: a request of a batch stopped because none of its callers waited), each batch's
size and compute time, and (``batch_done``) how many requests shared it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
import torch

from ..errors import DeadlineError, OverloadedError
from ..projection import Abandoned, ProjectionConfig

# compute(x, cfg, should_stop=...) -> (images, errors); should_stop() -> True: abandon the batch
Compute = Callable[..., "tuple[np.ndarray, np.ndarray]"]

log = logging.getLogger("purifier.batcher")


@dataclass(eq=False)   # compared by identity: field-wise == would compare the image tensors
class _Item:
    x: torch.Tensor            # (b, C, H, W)
    cfg: ProjectionConfig
    key: Hashable
    deadline: float | None     # time.monotonic() by which the answer is due
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


# How long a batch's compute time predicts the next one's (see Batcher._estimate).
ESTIMATE_TTL_S = 30.0


class Batcher:
    def __init__(self, compute: Compute, executor: Executor, *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, metrics=None):
        self.compute = compute
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self._queue: list[_Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._last_batch_requests = 0
        self._compute_s = 0.0   # the last batch's compute time, set in the executor thread
        # options (seed aside) -> images in a batch -> (its last compute time, when), for _estimate
        self._took: dict[ProjectionConfig, dict[int, tuple[float, float]]] = {}
        self._running: tuple[ProjectionConfig, int, float] | None = None  # options, images, start

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="purifier-batcher")

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, x: torch.Tensor, cfg: ProjectionConfig, deadline: float | None = None):
        """Queue a validated batch x (b, C, H, W); returns (images (b, C, H, W), errors (b,))."""
        if self._closed:
            self._reject("shutdown")
            raise OverloadedError("server is shutting down; retry on another replica")
        if len(self._queue) >= self.max_queue_size:
            self._reject("queue_full")
            raise OverloadedError(f"queue full ({self.max_queue_size} requests waiting); retry later")
        if deadline is not None:
            self._admit(x.shape[0], cfg, deadline)
        key = cfg if cfg.seed is None else (cfg, object())
        item = _Item(x, cfg, key, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._depth_changed()
        self._wake.set()
        return await item.future

    def _admit(self, images: int, cfg: ProjectionConfig, deadline: float) -> None:
        """Refuse now a request that cannot finish in time (see the module's docstring)."""
        now = time.monotonic()
        left = deadline - now
        own = self._estimate(cfg, images) or 0.0
        if own > left:   # what _drop_stale would decide at dispatch with an empty queue, decided now
            self._reject("deadline")
            raise DeadlineError(f"{left:.2f} s of its deadline left, and a batch like this one takes about {own:.2f} s; "
                                "refused on arrival (retry with a longer deadline, or fewer images or steps)")
        groups: dict[Hashable, list] = {}   # in the order their first request arrived
        for it in self._queue:
            g = groups.setdefault(it.key, [it.cfg, 0])
            g[1] += it.x.shape[0]
        mine = cfg if cfg.seed is None else None
        if mine in groups:   # it joins that group's batches: the groups after it need not run first
            keys = list(groups)
            groups = {k: groups[k] for k in keys[:keys.index(mine) + 1]}
            groups[mine][1] += images
            own = 0.0
        def takes(c: ProjectionConfig, n: int) -> float:   # a batch of n images; 0 when unknown
            return (self._estimate(c, n) or 0.0) if n else 0.0

        m = self.max_batch_size
        ahead = sum(takes(c, m) * (n // m) + takes(c, n % m) for c, n in groups.values())
        running = self._running
        if running is not None:
            ahead += max(0.0, takes(running[0], running[1]) - (now - running[2]))
        if ahead + own > left:
            self._reject("backlog")
            raise OverloadedError(f"about {ahead:.2f} s of work is queued ahead ({len(self._queue)} requests) and "
                                  f"{left:.2f} s of its deadline left; refused on arrival: retry on another "
                                  "replica or later")

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop the worker."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_Item] = []
            try:
                batch = await self._next_batch()
                await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - a bug here: fail this batch, keep serving the queue
                # Failed before a batch was taken: fail the oldest request, so the loop moves on
                # instead of meeting the same error again and again.
                failed = batch or self._queue[:1]
                log.exception("batcher: %d request(s) failed outside the computation", len(failed))
                for it in failed:
                    if it in self._queue:
                        self._queue.remove(it)
                        self._depth_changed()
                    if not it.future.done():
                        it.future.set_exception(exc)

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = self._drop_stale(batch)
        if not live:
            return
        x = torch.cat([it.x for it in live])                     # (N, C, H, W)
        try:
            images, errors = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._compute, x, live[0].cfg, _nobody_waits(live))
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            if isinstance(exc, Abandoned):  # counted once per request nobody waited for
                for _ in live:
                    self._reject("abandoned")
            for it in live:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        if self.metrics is not None:   # each request is charged the whole batch, as Triton counts it
            self.metrics.batch_done(len(live), x.shape[0], self._compute_s)
        start = 0
        for it in live:
            b = it.x.shape[0]
            if not it.future.done():
                it.future.set_result((images[start:start + b], errors[start:start + b]))
            start += b

    async def _next_batch(self) -> list[_Item]:
        first = self._queue[0]
        alone = len(self._queue) == 1 and self._last_batch_requests <= 1
        while not self._closed and not alone:
            images = sum(it.x.shape[0] for it in self._queue if it.key == first.key)
            wait = first.enqueued + self.max_delay - time.monotonic()
            if images >= self.max_batch_size or wait <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                break
        batch, total = [], 0
        for it in self._queue:
            if it.key != first.key:
                continue
            b = it.x.shape[0]
            if batch and total + b > self.max_batch_size:
                break
            batch.append(it)
            total += b
        taken = {id(it) for it in batch}
        self._queue = [it for it in self._queue if id(it) not in taken]
        self._last_batch_requests = len(batch)
        self._depth_changed()
        return batch

    def _compute(self, x: torch.Tensor, cfg: ProjectionConfig, should_stop: Callable[[], bool]):
        """One batch, in the executor's thread (timed there, so queueing is not counted)."""
        start = time.perf_counter()
        self._running = (cfg, x.shape[0], time.monotonic())
        took = self._took.setdefault(cfg.with_(seed=None), {})
        try:
            out = self.compute(x, cfg, should_stop=should_stop)
        except Abandoned:
            # It ran this long and was not done: a lower bound that keeps the estimate alive.
            # Without it, under overload every batch was abandoned, none renewed the estimate,
            # it expired, and from then on nothing was refused on arrival or dropped at dispatch
            # (a 15-minute soak at ~4x capacity: 10,183 requests abandoned part-way).
            ran, now = time.perf_counter() - start, time.monotonic()
            last = took.get(x.shape[0])
            fresh = last is not None and now - last[1] <= ESTIMATE_TTL_S
            took[x.shape[0]] = (max(ran, last[0]) if fresh else ran, now)
            raise
        finally:
            self._running = None
        self._compute_s = time.perf_counter() - start
        took[x.shape[0]] = (self._compute_s, time.monotonic())
        if self.metrics is not None:
            self.metrics.projection_seconds.observe(self._compute_s)
            self.metrics.batch_size.observe(x.shape[0])
        return out

    def _estimate(self, cfg: ProjectionConfig, images: int) -> float | None:
        """Seconds a batch of ``images`` with these options will likely take: the last time of
        the smallest batch with the same options and at least as many images (never more
        optimistic than a batch that size did); None before one ran, or when that time is
        older than ESTIMATE_TTL_S: dropped requests compute nothing, so without the expiry one
        slow batch (a load spike) would refuse every shorter-deadline request from then on."""
        took = dict(self._took.get(cfg.with_(seed=None), {}))   # a copy: the compute thread adds to it
        now = time.monotonic()
        sizes = [n for n, (_, at) in took.items() if n >= images and now - at <= ESTIMATE_TTL_S]
        return took[min(sizes)][0] if sizes else None

    def _drop_stale(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        need = self._estimate(batch[0].cfg, sum(it.x.shape[0] for it in batch)) if batch else None
        live = []
        for it in batch:
            if it.future.done():  # the caller went away, or gRPC ended the call at its deadline
                # (its timer may fire a little early: 50 ms slack, as status.rpc allows)
                expired = it.deadline is not None and now >= it.deadline - 0.05
                self._reject("deadline" if expired else "cancelled")
                continue
            if it.deadline is not None and now >= it.deadline:
                self._reject("deadline")
                it.future.set_exception(DeadlineError(
                    f"deadline passed after {1000 * (now - it.enqueued):.0f} ms in the queue; nothing was computed"))
                continue
            if it.deadline is not None and need is not None and it.deadline - now < need:
                self._reject("deadline")
                it.future.set_exception(DeadlineError(
                    f"{it.deadline - now:.2f} s of its deadline left after {now - it.enqueued:.2f} s in the queue, and "
                    f"a batch like this one takes about {need:.2f} s; dropped before compute (retry later, or "
                    "with a longer deadline)"))
                continue
            if self.metrics is not None:
                self.metrics.queue_seconds.observe(now - it.enqueued)
            live.append(it)
        return live

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def _depth_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))


def _nobody_waits(items: list[_Item]) -> Callable[[], bool]:
    """A should_stop for a batch: True once every request in it is answered or cancelled,
    or past its deadline. Asked from the compute thread: it only reads each future's state
    and the clock, never touches the loop."""
    def should_stop() -> bool:
        now = time.monotonic()
        return all(it.future.done() or (it.deadline is not None and now >= it.deadline) for it in items)
    return should_stop
