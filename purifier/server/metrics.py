"""Prometheus metrics, declared once per server in their own registry (two servers in one
process, as in the tests, do not mix their counts) and served on their own HTTP port.

Names follow Prometheus' conventions: a ``purifier_`` prefix, base units as a suffix
(``_seconds``, ``_bytes``), counters ending in ``_total`` (the client adds it). The
registry also holds prometheus_client's process (``process_*``), platform
(``python_info``) and garbage-collector (``python_gc_*``) collectors and, on CUDA, the
GPU memory torch holds (``purifier_cuda_memory_*_bytes``). The list, with what each is
good for on a dashboard, is in docs/service.md.

``model`` labels carry the model a request names (V2 ``model_name``/``name``, purifier.v1
Classify's ``model_name``; "" when it names none). Clients choose those names, so only the
first ``MAX_MODEL_LABELS`` distinct ones become label values; later ones count as
``_other`` (an unbounded label would let a client grow the scrape without end).

The compute metrics (queue, projection, batch size, images, flags, errors, refusals) carry a
``model`` label too: the repository model that purified (its name in ``--model-config`` /
``--model``; ``default`` for ``--model-dir``'s). Their values are the configured names, so
they are bounded by the repository. The batcher and the data plane of one model record
through its view, ``Metrics.for_model(name)``.

Model ``purifier``'s Triton-style statistics (``statistics.Statistics``) are fed here too,
so the batcher and the data plane report each event once.
"""

from __future__ import annotations

import threading

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, start_http_server)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector

from .statistics import Duration, Statistics

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ERRORS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5)
MAX_MODEL_LABELS = 32
OTHER_MODEL = "_other"


class CudaMemoryCollector:
    """The memory torch's caching allocator holds on one CUDA device, read at scrape time."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def collect(self):
        cuda, label = self.torch.cuda, str(self.device)
        allocated = GaugeMetricFamily("purifier_cuda_memory_allocated_bytes",
                                      "GPU memory occupied by tensors (torch.cuda.memory_allocated)",
                                      labels=["device"])
        allocated.add_metric([label], cuda.memory_allocated(self.device))
        reserved = GaugeMetricFamily("purifier_cuda_memory_reserved_bytes",
                                     "GPU memory held by torch's caching allocator, tensors included "
                                     "(torch.cuda.memory_reserved); what nvidia-smi shows, less the CUDA context",
                                     labels=["device"])
        reserved.add_metric([label], cuda.memory_reserved(self.device))
        return [allocated, reserved]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, device=None):
        """``device``: the engine's torch device; a CUDA one adds the GPU memory gauges."""
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        if device is not None and str(device).startswith("cuda"):
            r.register(CudaMemoryCollector(device))
        self.statistics = Statistics()
        self._models: set[str] = set()
        self._models_lock = threading.Lock()
        self.requests = Counter("purifier_requests", "RPCs answered, by method, gRPC status code and the model "
                                "the request names", ["method", "code", "model"], registry=r)
        self.request_seconds = Histogram("purifier_request_seconds", "Time from an RPC's arrival to its answer",
                                         ["method", "model"], buckets=LATENCY, registry=r)
        self.queue_seconds = Histogram("purifier_queue_seconds",
                                       "Time a request waited in the batch queue before its projection started, "
                                       "by the model that purified it", ["model"], buckets=LATENCY, registry=r)
        self.projection_seconds = Histogram("purifier_projection_seconds", "Time of one projection batch",
                                            ["model"], buckets=LATENCY, registry=r)
        self.downstream_seconds = Histogram("purifier_downstream_seconds",
                                            "Time of one call to the downstream server, retries included",
                                            ["method", "model"], buckets=LATENCY, registry=r)
        self.batch_size = Histogram("purifier_batch_size", "Images per projection batch", ["model"],
                                    buckets=BATCH, registry=r)
        self.reconstruction_error = Histogram("purifier_reconstruction_error",
                                              "Per-image reconstruction error ||G(z*) - x||^2 / (C*H*W)", ["model"],
                                              buckets=ERRORS, registry=r)
        self.images = Counter("purifier_images", "Images purified", ["model"], registry=r)
        self.flagged = Counter("purifier_flagged", "Images flagged adversarial (error above the calibrated threshold)",
                               ["model"], registry=r)
        self.queue_depth = Gauge("purifier_queue_depth", "Requests waiting for a projection batch", ["model"],
                                 registry=r)
        self.rejected = Counter("purifier_rejected",
                                "Requests refused before compute, by reason (queue_full, deadline, cancelled, "
                                "shutdown, compute_budget, decode_busy, abandoned) and the model asked for",
                                ["reason", "model"], registry=r)
        self.policy_rejected = Counter("purifier_policy_rejected",
                                       "Requests failed by the flagged-input policy (--on-flagged reject), by the "
                                       "model they were for and reason (flagged: an image above the threshold)",
                                       ["model", "reason"], registry=r)
        self.model_ready = Gauge("purifier_model_ready",
                                 "1 when the repository model has loaded and run its warm-up batch; 0 while it "
                                 "loads, or after it failed to load or warm up (the log says why)",
                                 ["model"], registry=r)
        self.downstream_retries = Counter("purifier_downstream_retries",
                                          "Downstream calls retried after UNAVAILABLE", registry=r)

    def for_model(self, name: str) -> "ModelMetrics":
        """The metrics of one repository model (their ``model`` label set to ``name``)."""
        return ModelMetrics(self, name)

    def model_label(self, name: str) -> str:
        """The ``model`` label value for a model name a client sent (bounded, see above)."""
        if not name:
            return ""
        with self._models_lock:
            if name in self._models or len(self._models) < MAX_MODEL_LABELS:
                self._models.add(name)
                return name
        return OTHER_MODEL

    def rpc_done(self, method: str, code: str, seconds: float, model: str = "") -> None:
        model = self.model_label(model)
        self.requests.labels(method, code, model).inc()
        self.request_seconds.labels(method, model).observe(seconds)

    def purification_done(self, ok: bool, seconds: float) -> None:
        """One request through the purifier model, from the data plane's start to its answer."""
        self.statistics.request(ok, seconds)

    def batch_done(self, requests: int, images: int, seconds: float) -> None:
        """A projection batch of ``images`` from ``requests`` requests finished in ``seconds``."""
        self.statistics.batch(requests, images, seconds)

    def model_statistics(self) -> Statistics:
        """Model ``purifier``'s statistics now; the queue part is the queue histogram's
        (one observation per request that reached compute)."""
        snap = self.statistics.snapshot()
        count = total = 0.0
        for s in self.queue_seconds.collect()[0].samples:   # every model's
            if s.name == "purifier_queue_seconds_count":
                count += s.value
            elif s.name == "purifier_queue_seconds_sum":
                total += s.value
        snap.queue = Duration(int(count), int(total * 1e9))
        return snap

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the HTTP exporter in a thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, server.server_port


class _Reasons:
    """``rejected`` as one model sees it: ``.labels(reason)`` -> its (reason, model) counter."""

    def __init__(self, counter: Counter, model: str):
        self.counter, self.model = counter, model

    def labels(self, reason: str):
        return self.counter.labels(reason, self.model)


class ModelMetrics:
    """One repository model's view of ``Metrics``: what its batcher and the data plane record
    for it (the same attribute names, bound to its ``model`` label); the server-wide parts
    (statistics, requests) are the shared ones."""

    def __init__(self, metrics: Metrics, model: str):
        self.shared, self.model = metrics, model
        self.queue_seconds = metrics.queue_seconds.labels(model)
        self.projection_seconds = metrics.projection_seconds.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self.reconstruction_error = metrics.reconstruction_error.labels(model)
        self.images = metrics.images.labels(model)
        self.flagged = metrics.flagged.labels(model)
        self.queue_depth = metrics.queue_depth.labels(model)
        self.rejected = _Reasons(metrics.rejected, model)
        self.policy_rejected = metrics.policy_rejected
        self.ready = metrics.model_ready.labels(model)

    def batch_done(self, requests: int, images: int, seconds: float) -> None:
        self.shared.batch_done(requests, images, seconds)

    def purification_done(self, ok: bool, seconds: float) -> None:
        self.shared.purification_done(ok, seconds)
