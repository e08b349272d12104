"""Assemble and run the purifier server: gRPC (purifier.v1, KServe V2, health, reflection),
Prometheus metrics on their own port, TLS, and a graceful stop on SIGTERM.

The port opens once the weights are loaded and before the warm-up batch; health says
NOT_SERVING until warm-up ends, and afterwards whatever ``readiness`` decides (draining,
a downstream unreachable for too long).

Several models (``settings.models``): each loads into its own engine and batcher (one
projection thread runs every batch, one at a time). A model that fails to load or to warm
up is logged and reported per model (``engine.ServedModel.error``) while the others serve;
the server fails to start only when no model loads.

Tests and embedders use the async context manager::

    async with create_server(ServeSettings(grpc_port=0, metrics_port=0, ...)) as server:
        channel = grpc.aio.insecure_channel(f"localhost:{server.port}")
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..engine import Batcher, Limits, Repository, ServedModel, choose_device
from ..errors import ModelLoadError
from ..proto import POOL
from ..proto.inference import grpc_service_pb2_grpc as v2_grpc
from ..proto.purifier.v1 import purifier_pb2_grpc
from ..settings import ServeSettings
from . import codec, logs
from .dataplane import DataPlane
from .downstream import Downstream
from .metrics import Metrics
from .purifier_servicer import PurifierServicer
from .readiness import Readiness
from .rest import RestApp, RestServer
from .v2_servicer import V2, V2Servicer

log = logging.getLogger("purifier.server")

SERVICES = ("purifier.v1.Purifier", "inference.GRPCInferenceService")
# Reflection reads our private descriptor pool; the health service's file joins it there.
POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0)]


class Server:
    """One running purifier server; ``port`` and ``metrics_port`` are the bound ports."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        # ready: warm, not draining, downstream not unreachable too long; flips set gRPC health
        self.state = Readiness(settings.downstream_unready_seconds if settings.downstream else 0,
                               on_change=self._set_health)
        self.port: int | None = None
        self.http_port: int | None = None      # REST, when --http-port is given
        self._rest: RestServer | None = None
        self.metrics_port: int | None = None
        self.metrics: Metrics | None = None   # built in start(), once the device is known
        self._watch: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="purifier-projection")
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._metrics_http = None
        self.models: Repository | None = None
        self._downstream: Downstream | None = None
        self._decoder: codec.DecodePool | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> "Server":
        s = self.settings
        loop = asyncio.get_running_loop()
        device = choose_device(s.device, s.threads)
        self.metrics = Metrics(device=device)
        self.models = await self._load_models(device)
        default = self.models.default
        if s.downstream:
            self._downstream = Downstream(s.downstream, timeout_s=s.downstream_timeout_s,
                                          retries=s.downstream_retries, max_message_bytes=s.max_message_bytes,
                                          metrics=self.metrics)
        # Decoding is a brief stage before the batch queue, not a second queue: a wait bound as
        # small as the queue's refused bursts there (decode_busy) that the queue would have taken
        # or refused as queue_full. Waiting decodes hold only the request bytes they arrived with.
        shape = next(m for m in self.models if m.loaded).engine.image_shape   # each request names its own
        self._decoder = codec.DecodePool(shape, codec.DecodeLimits(s.max_batch_size, s.max_decode_bytes),
                                        s.decode_threads, max(256, s.max_queue_size))
        self.plane = DataPlane(self.models, self._downstream, self.metrics, s.model_name, self._decoder)
        for served in self.models:
            if served.batcher is not None:
                served.batcher.start()

        self.v2 = V2(self.plane, self.state, self.metrics)     # the V2 answers, for gRPC and REST alike
        server = self._grpc = grpc.aio.server(options=grpc_options(s.max_message_bytes))
        purifier_pb2_grpc.add_PurifierServicer_to_server(
            PurifierServicer(self.plane, self.metrics, s.max_message_bytes), server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(V2Servicer(self.v2, self.metrics, s.max_message_bytes),
                                                           server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            server, pool=POOL)
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{s.host}:{s.grpc_port}"
        if s.tls:
            key, cert = Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes()
            ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        if s.http_port is not None:
            tls = (s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls else None
            self._rest = RestServer(RestApp(self.v2, self.metrics, s.max_message_bytes), s.host, s.http_port, tls)
            await self._rest.start()
            self.http_port = self._rest.port
        if s.metrics_port >= 0:
            self._metrics_http, self.metrics_port = self.metrics.serve(s.metrics_port, s.host)
        if self._downstream is not None:   # probing starts now, so readiness knows at warm-up's end
            self._watch = loop.create_task(self.state.watch(self._downstream.probe, s.downstream_probe_seconds),
                                           name="purifier-readiness")

        # Ready only once a batch has run end to end (weights paged in, kernels chosen).
        await loop.run_in_executor(self._executor, codec.preload)
        for served in self.models:
            if not served.loaded:
                continue
            try:
                await loop.run_in_executor(self._executor, served.engine.warm_up)
                served.warm = True
                served.metrics.ready.set(1)
            except Exception as exc:  # noqa: BLE001 - one model's failure is its own
                if len(self.models) == 1:
                    raise
                await served.batcher.close()
                self._failed(served, exc, "warm-up")
        if not any(m.ready for m in self.models):
            raise ModelLoadError("no model warmed up: " + "; ".join(f"{m.name}: {m.error}" for m in self.models))
        self.state.warm = True
        await self.state.changed()
        logs.log(log, logging.INFO, "serving", ready=self.state.ready, port=self.port, http_port=self.http_port,
                 metrics_port=self.metrics_port, device=device, model_dir=default.model_dir,
                 projection=s.projection, downstream=s.downstream or None,
                 on_flagged=default.policy.on_flagged if default.policy else None,
                 threshold=default.policy.threshold if default.policy else None,
                 default_model=default.name,
                 models={m.name: {"dir": m.model_dir, "ready": m.ready, "error": m.error,
                                  **({"downstream_name": m.downstream_name} if m.downstream_name else {}),
                                  **({"threshold": m.policy.threshold, "on_flagged": m.policy.on_flagged,
                                      "steps": m.engine.default.steps, "restarts": m.engine.default.restarts}
                                     if m.policy else {})}
                         for m in self.models} if len(self.models) > 1 else None,
                 tls=s.tls, mtls=bool(s.tls_client_ca))
        return self

    async def _load_models(self, device) -> Repository:
        """Every model of the settings, loaded one after another in the projection thread; each
        gets its own batcher and model-labelled metrics. One model alone fails the start as it
        always did; in a repository a failure is logged and kept for that model's requests,
        unless no model loads at all."""
        s, loop = self.settings, asyncio.get_running_loop()
        limits = Limits(s.max_batch_size, s.max_steps, s.max_restarts, s.max_compute)
        served_models = []
        for spec in s.models:
            served = await loop.run_in_executor(          # spec.threshold None: the card's
                self._executor, ServedModel.load, spec.name, spec.model_dir, device, spec.projection or s.projection,
                limits, s.cuda_graphs, spec.on_flagged or s.on_flagged, spec.threshold, spec.downstream_name)
            served.metrics = self.metrics.for_model(spec.name)
            served.metrics.ready.set(0)
            differ = served.engine.threshold_settings_differ if served.loaded and spec.threshold is None else []
            if differ:
                logs.log(log, logging.WARNING, "the card's detection threshold was calibrated for another projection: "
                         "clean inputs will be flagged at another rate than the card says; run `purifier calibrate "
                         "--projection` with this server's projection", model=spec.name,
                         projection=spec.projection or s.projection, differ=differ)
            if served.loaded:
                served.batcher = Batcher(served.engine.project, self._executor, max_batch_size=s.max_batch_size,
                                         max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
                                         max_queue_size=s.max_queue_size, metrics=served.metrics)
            elif len(s.models) == 1:
                raise served.exception      # the single-model server fails as it always did
            else:
                self._failed(served, served.exception, "load")
            served_models.append(served)
        if not any(m.loaded for m in served_models):
            raise ModelLoadError("no model loaded: " + "; ".join(f"{m.name} ({m.model_dir}): {m.error}"
                                                                 for m in served_models))
        return Repository(served_models, s.default_model)

    def _failed(self, served: ServedModel, exc: BaseException, stage: str) -> None:
        if stage != "load":
            served.fail(exc)
        logs.log(log, logging.ERROR, f"model failed to {stage}; the other models serve", model=served.name,
                 model_dir=served.model_dir, error=served.error)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let accepted ones finish within ``grace`` seconds."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_seconds if grace is None else grace
        self.state.draining = True
        if self._watch is not None:
            self._watch.cancel()
        queued = sum(m.batcher.depth for m in self.models if m.batcher is not None) if self.models else 0
        logs.log(log, logging.INFO, "draining", grace_s=grace, queued=queued)
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await asyncio.gather(self._grpc.stop(grace), *([self._rest.stop(grace)] if self._rest else []))
        for served in self.models or ():
            if served.batcher is not None:
                await served.batcher.close()
        if self._downstream is not None:
            await self._downstream.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._executor.shutdown(wait=False)
        if self._decoder is not None:
            self._decoder.close()
        self._stopped.set()
        logs.log(log, logging.INFO, "stopped")

    async def wait(self) -> None:
        await self._stopped.wait()

    async def _set_health(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self._health.set(name, status)


@asynccontextmanager
async def create_server(settings: ServeSettings):
    """Start a server (port 0 picks a free port; read ``server.port``), stop it on exit."""
    server = Server(settings)
    try:
        await server.start()
        yield server
    finally:
        await server.stop(grace=0)


async def _serve(settings: ServeSettings) -> None:
    server = Server(settings)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        logs.log(log, logging.INFO, f"{signal.Signals(signum).name}: stopping")
        if not stopping:
            stopping.append(asyncio.ensure_future(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    await server.wait()


def serve(settings: ServeSettings) -> int:
    logs.configure(settings.log_level)
    asyncio.run(_serve(settings))
    # The server has stopped and logged it; nothing is left to finalise. The interpreter's own
    # teardown of torch, grpc and their threads took 2.2-4 s more on a loaded 2-core machine
    # (docs/service.md), time a SIGTERM'd pod spends past its grace period: leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
