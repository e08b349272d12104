"""Assemble and run the purifier server: gRPC (purifier.v1, KServe V2, health, reflection),
Prometheus metrics on their own port, TLS, and a graceful stop on SIGTERM.

Tests and embedders use the async context manager::

    async with create_server(ServeSettings(grpc_port=0, metrics_port=0, ...)) as server:
        channel = grpc.aio.insecure_channel(f"localhost:{server.port}")
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..engine import Batcher, Engine, Limits, choose_device
from ..policy import Policy
from ..proto import POOL
from ..proto.inference import grpc_service_pb2_grpc as v2_grpc
from ..proto.purifier.v1 import purifier_pb2_grpc
from ..settings import ServeSettings
from . import codec, logs
from .dataplane import DataPlane
from .downstream import Downstream
from .metrics import Metrics
from .purifier_servicer import PurifierServicer
from .v2_servicer import V2Servicer

log = logging.getLogger("purifier.server")

SERVICES = ("purifier.v1.Purifier", "inference.GRPCInferenceService")
# Reflection reads our private descriptor pool; the health service's file joins it there.
POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0)]


class _State:
    ready = False


class Server:
    """One running purifier server; ``port`` and ``metrics_port`` are the bound ports."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.state = _State()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics = Metrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="purifier-projection")
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._http = None
        self._batcher: Batcher | None = None
        self._downstream: Downstream | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> "Server":
        s = self.settings
        loop = asyncio.get_running_loop()
        device = choose_device(s.device, s.threads)
        limits = Limits(s.max_batch_size, s.max_steps, s.max_restarts)
        engine = await loop.run_in_executor(self._executor, Engine.load, s.model_dir, device, s.projection, limits,
                                            s.cuda_graphs)
        policy = Policy.build(s.on_flagged, s.threshold, engine.threshold)   # reject needs a threshold
        self._batcher = Batcher(engine.project, self._executor, max_batch_size=s.max_batch_size,
                                max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
                                max_queue_size=s.max_queue_size, metrics=self.metrics)
        if s.downstream:
            self._downstream = Downstream(s.downstream, timeout_s=s.downstream_timeout_s,
                                          retries=s.downstream_retries, max_message_bytes=s.max_message_bytes,
                                          metrics=self.metrics)
        self.plane = DataPlane(engine, self._batcher, self._downstream, self.metrics, s.model_name, policy)
        self._batcher.start()

        server = self._grpc = grpc.aio.server(options=grpc_options(s.max_message_bytes))
        purifier_pb2_grpc.add_PurifierServicer_to_server(PurifierServicer(self.plane, self.metrics), server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(V2Servicer(self.plane, self.state, self.metrics), server)
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
        if s.metrics_port >= 0:
            self._http, self.metrics_port = self.metrics.serve(s.metrics_port, s.host)

        # Ready only once a batch has run end to end (weights paged in, kernels chosen).
        await loop.run_in_executor(self._executor, codec.preload)
        await loop.run_in_executor(self._executor, engine.warm_up)
        self.state.ready = True
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logs.log(log, logging.INFO, "serving", port=self.port, metrics_port=self.metrics_port, device=device,
                 model_dir=s.model_dir, projection=s.projection, downstream=s.downstream or None,
                 on_flagged=policy.on_flagged, threshold=policy.threshold,
                 tls=s.tls, mtls=bool(s.tls_client_ca), http_port_ignored=s.http_port)
        return self

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let accepted ones finish within ``grace`` seconds."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_seconds if grace is None else grace
        self.state.ready = False
        logs.log(log, logging.INFO, "draining", grace_s=grace, queued=self._batcher.depth if self._batcher else 0)
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._batcher is not None:
            await self._batcher.close()
        if self._downstream is not None:
            await self._downstream.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._executor.shutdown(wait=False)
        self._stopped.set()
        logs.log(log, logging.INFO, "stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


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
    return 0
