"""The client to the downstream V2 (Open Inference Protocol) gRPC server.

One channel for the server's lifetime (gRPC multiplexes calls over it and reconnects by
itself). Each call gets the caller's remaining deadline; UNAVAILABLE is retried a bounded
number of times with exponential backoff, within that deadline; downstream statuses map
to purifier's errors (NOT_FOUND stays NOT_FOUND, a downstream's INVALID_ARGUMENT stays
INVALID_ARGUMENT, UNIMPLEMENTED stays UNIMPLEMENTED (a server without Triton's ModelConfig
or ModelStatistics), anything else is UNAVAILABLE to our caller).

``probe()`` is the readiness check (one ServerReady call, no retries, a short timeout);
``server.readiness`` calls it on a schedule.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from ..errors import DeadlineError, DownstreamError, InvalidInputError, NotFoundError, UnsupportedError
from ..proto.inference import grpc_service_pb2 as pb
from ..proto.inference import grpc_service_pb2_grpc as pb_grpc
from . import logs

log = logging.getLogger("purifier.downstream")


class Downstream:
    def __init__(self, target: str, *, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.05,
                 max_message_bytes: int = 16 * 1024 * 1024, metrics=None):
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.metrics = metrics
        self._channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # reconnect quickly once the downstream is back (gRPC's default backoff reaches minutes)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def call(self, method: str, request, deadline: float | None = None, what: str = "", model: str = ""):
        """Call ``method`` (ModelInfer, ModelReady, ...) for ``model`` within ``deadline``
        (time.monotonic())."""
        end = deadline if deadline is not None else time.monotonic() + self.timeout_s
        start = time.monotonic()
        rpc = getattr(self._stub, method)
        try:
            for attempt in range(self.retries + 1):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise DeadlineError(f"deadline passed before the downstream {method} call could finish")
                try:
                    return await rpc(request, timeout=remaining,
                                     metadata=(("x-request-id", logs.request_id.get()),))
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                        raise self._error(exc, method, what, attempt + 1) from None
                    if self.metrics is not None:
                        self.metrics.downstream_retries.inc()
                    pause = min(self.backoff_s * 2 ** attempt, max(0.0, end - time.monotonic()))
                    logs.log(log, logging.WARNING, f"downstream {self.target} unavailable; retrying",
                             attempt=attempt + 1, pause_s=round(pause, 3))
                    await asyncio.sleep(pause)
        finally:
            if self.metrics is not None:
                self.metrics.downstream_seconds.labels(method, self.metrics.model_label(model)).observe(
                    time.monotonic() - start)

    def _error(self, exc: grpc.aio.AioRpcError, method: str, what: str, tries: int):
        """The caller's error: no address, resolver or transport text (those are logged here,
        with the request id); a downstream's own NOT_FOUND/INVALID_ARGUMENT words are kept,
        as they are meant for the caller."""
        code, details = exc.code(), exc.details()
        logs.log(log, logging.WARNING, f"downstream {method}{what} failed", target=self.target,
                 code=code.name, details=details, tries=tries)
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFoundError(f"downstream: {details or 'model not found'}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInputError(f"the downstream model rejected the request: {details}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return UnsupportedError(f"the downstream model server does not implement {method}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineError("deadline passed waiting for the downstream model server")
        if code == grpc.StatusCode.UNAVAILABLE:
            return DownstreamError(f"the downstream model server is unavailable (after {tries} tries); retry later")
        return DownstreamError(f"the downstream model server failed {method}{what} ({code.name})")

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None = None) -> pb.ModelInferResponse:
        return await self.call("ModelInfer", request, deadline, f" for model {request.model_name!r}",
                               request.model_name)

    async def model_ready(self, name: str, version: str = "", deadline: float | None = None) -> bool:
        resp = await self.call("ModelReady", pb.ModelReadyRequest(name=name, version=version), deadline,
                               model=name)
        return resp.ready

    async def model_metadata(self, name: str, version: str = "",
                             deadline: float | None = None) -> pb.ModelMetadataResponse:
        return await self.call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), deadline,
                               model=name)

    async def model_config(self, name: str, version: str = "",
                           deadline: float | None = None) -> pb.ModelConfigResponse:
        return await self.call("ModelConfig", pb.ModelConfigRequest(name=name, version=version), deadline,
                               model=name)

    async def model_statistics(self, name: str, version: str = "",
                               deadline: float | None = None) -> pb.ModelStatisticsResponse:
        return await self.call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version), deadline,
                               model=name)

    async def probe(self, timeout_s: float) -> bool:
        """True when the downstream answers ServerReady with ready=true within ``timeout_s``;
        False when it is unreachable, fails, or says it is not ready. One try: the schedule
        that calls it is the retry."""
        try:
            resp = await self._stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return resp.ready
