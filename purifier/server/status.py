"""The one place where purifier's exceptions become gRPC status codes, and where every
RPC is counted, timed and shielded: unexpected exceptions answer INTERNAL with a generic
message; the traceback goes to the log, never to the client."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from .. import errors
from . import logs

log = logging.getLogger("purifier.rpc")

CODES: dict[type[errors.PurifierError], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.OverloadedError: grpc.StatusCode.UNAVAILABLE,       # as Triton does: retry later
    errors.DeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.DownstreamError: grpc.StatusCode.UNAVAILABLE,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DataError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    # well-formed images the detector flagged, under --on-flagged reject: not retryable as sent,
    # and apart from INVALID_ARGUMENT (malformed input); see docs/service.md
    errors.FlaggedInputError: grpc.StatusCode.FAILED_PRECONDITION,
}


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def trailing_metadata(exc: errors.PurifierError) -> tuple[tuple[str, str], ...]:
    """Machine-readable details of an error, beside its message: the flagged images' indices
    (``purifier-flagged-indices: 0,2``) of a rejected request."""
    if isinstance(exc, errors.FlaggedInputError):
        return (("purifier-flagged-indices", ",".join(map(str, exc.indices))),)
    return ()


def deadline_of(context) -> float | None:
    """The caller's deadline as a time.monotonic() instant (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _request_id(request, context) -> str:
    rid = getattr(request, "request_id", "") or getattr(request, "id", "")
    if not rid:
        rid = dict(context.invocation_metadata() or ()).get("x-request-id", "")
    return str(rid)[:128] or logs.new_request_id()


def rpc(method: str):
    """Wrap an async servicer method ``(self, request, context)``; ``self.metrics`` counts it
    (before the answer leaves, so a scrape right after an RPC already sees it)."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            rid = _request_id(request, context)
            token = logs.request_id.set(rid)
            start = time.perf_counter()

            def record(code: grpc.StatusCode) -> None:
                if self.metrics is not None:
                    self.metrics.requests.labels(method, code.name).inc()
                    self.metrics.request_seconds.labels(method).observe(time.perf_counter() - start)

            try:
                context.set_trailing_metadata((("x-request-id", rid),))
                response = await fn(self, request, context)
                record(grpc.StatusCode.OK)
                return response
            except errors.PurifierError as exc:
                code = code_for(exc)
                record(code)
                logs.log(log, logging.INFO, f"{method} failed: {exc}", method=method, code=code.name)
                await context.abort(code, str(exc), trailing_metadata=(
                    ("x-request-id", rid), *trailing_metadata(exc)))
            except asyncio.CancelledError:
                # the caller went away, or its deadline passed while we worked
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                record(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
                raise
            except Exception:
                record(grpc.StatusCode.INTERNAL)
                log.exception(f"{method}: unexpected error")
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"internal error (request id {rid}); the server log has details")
            finally:
                logs.request_id.reset(token)

        return handler

    return wrap
