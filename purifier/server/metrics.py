"""Prometheus metrics, declared once per server in their own registry (two servers in one
process, as in the tests, do not mix their counts) and served on their own HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ERRORS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("purifier_requests", "RPCs answered, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("purifier_request_seconds", "Time from an RPC's arrival to its answer",
                                         ["method"], buckets=LATENCY, registry=r)
        self.queue_seconds = Histogram("purifier_queue_seconds",
                                       "Time a request waited in the batch queue before its projection started",
                                       buckets=LATENCY, registry=r)
        self.projection_seconds = Histogram("purifier_projection_seconds", "Time of one projection batch",
                                            buckets=LATENCY, registry=r)
        self.downstream_seconds = Histogram("purifier_downstream_seconds",
                                            "Time of one call to the downstream server, retries included",
                                            ["method"], buckets=LATENCY, registry=r)
        self.batch_size = Histogram("purifier_batch_size", "Images per projection batch", buckets=BATCH, registry=r)
        self.reconstruction_error = Histogram("purifier_reconstruction_error",
                                              "Per-image reconstruction error ||G(z*) - x||^2 / (C*H*W)",
                                              buckets=ERRORS, registry=r)
        self.images = Counter("purifier_images", "Images purified", registry=r)
        self.flagged = Counter("purifier_flagged", "Images flagged adversarial (error above the calibrated threshold)",
                               registry=r)
        self.queue_depth = Gauge("purifier_queue_depth", "Requests waiting for a projection batch", registry=r)
        self.rejected = Counter("purifier_rejected",
                                "Requests refused before compute, by reason (queue_full, deadline, shutdown)",
                                ["reason"], registry=r)
        self.policy_rejected = Counter("purifier_policy_rejected",
                                       "Requests failed by the flagged-input policy (--on-flagged reject), by the "
                                       "model they were for and reason (flagged: an image above the threshold)",
                                       ["model", "reason"], registry=r)
        self.downstream_retries = Counter("purifier_downstream_retries",
                                          "Downstream calls retried after UNAVAILABLE", registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the HTTP exporter in a thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, server.server_port
