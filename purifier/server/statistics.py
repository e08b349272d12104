"""Model ``purifier``'s statistics in the shape of Triton's statistics extension (what
``tritonclient``'s ``get_inference_statistics`` and ``perf_analyzer`` read): cumulative
counts and nanoseconds since the server started, no gRPC.

Every purification counts, whichever API asked for it (V2 ``purifier``, purifier.v1
Purify/Classify, or a V2 pass-through), since each runs the purifier model once:

- ``success`` / ``fail``: per request, from the data plane's start to its answer; a
  request refused by validation, the queue or the policy is a failure. What success
  holds beyond queue and compute_infer is checking the images and waking the caller
  (``compute_input``/``compute_output`` are not measured apart and stay 0).
- ``queue``: per request that reached compute, its wait in the batch queue (read from
  the ``purifier_queue_seconds`` histogram, which counts exactly that).
- ``compute_infer``: per request that reached compute, the time of the batch it ran in
  (several requests share one batch, each is charged its whole duration, as Triton does).
- ``inference_count``: images purified; ``execution_count``: batches run;
  ``batches``: per batch size (images), how many ran and their total compute time.

Updated from the event loop and the projection thread, so behind one lock; ``snapshot``
returns a consistent copy.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += n * int(seconds * 1e9)


@dataclass
class Statistics:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0     # ms since the epoch of the last batch's end; 0: none yet

    def __post_init__(self):
        self._lock = threading.Lock()

    def request(self, ok: bool, seconds: float) -> None:
        with self._lock:
            (self.success if ok else self.fail).add(seconds)

    def batch(self, requests: int, images: int, seconds: float) -> None:
        """A batch of ``images`` from ``requests`` requests ran in ``seconds``."""
        with self._lock:
            self.compute_infer.add(seconds, requests)
            self.batches.setdefault(images, Duration()).add(seconds)
            self.inference_count += images
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)

    def snapshot(self) -> "Statistics":
        with self._lock:
            fields_ = {k: copy.deepcopy(v) for k, v in vars(self).items() if k != "_lock"}
        return Statistics(**fields_)
