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
    errors.ModelUnavailableError: grpc.StatusCode.UNAVAILABLE,  # as Triton answers a model not loaded
    errors.OverloadedError: grpc.StatusCode.UNAVAILABLE,       # as Triton does: retry later
    errors.DeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.MessageTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,    # as gRPC answers it
    errors.DownstreamError: grpc.StatusCode.UNAVAILABLE,
    errors.UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
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


MAX_REQUEST_ID = 128


def model_named(request) -> str:
    """The model a request names: V2 ``model_name`` or ``name``, purifier.v1 Classify's
    ``model_name``; "" for none (health, server metadata, Purify)."""
    return getattr(request, "model_name", "") or getattr(request, "name", "")


def checked_request_id(rid: str, where: str) -> tuple[str, errors.InvalidInputError | None]:
    """A caller's request id (``where`` it came from, for the message), as every entry point
    (gRPC, REST) takes it: the id itself, or a new one when it is empty; and the error to
    answer with when it is unusable. It travels back in metadata and headers and in every log
    line, so it must be printable ASCII of at most ``MAX_REQUEST_ID`` characters. An unusable
    id is replaced by a new one, so even the refusal can be traced."""
    rid = str(rid)
    if len(rid) > MAX_REQUEST_ID:
        problem = f"request id ({where}) has {len(rid)} characters; at most {MAX_REQUEST_ID} are allowed"
    elif not all(" " <= ch <= "~" for ch in rid):
        problem = f"request id ({where}) must be printable ASCII (no control or non-ASCII characters)"
    else:
        return rid or logs.new_request_id(), None
    return logs.new_request_id(), errors.InvalidInputError(problem)


def _request_id(request, context) -> tuple[str, errors.InvalidInputError | None]:
    """The request's id: its ``request_id``/``id`` field, else the x-request-id header, else a
    new one (``checked_request_id``)."""
    field = "request_id" if getattr(request, "request_id", "") else "id" if getattr(request, "id", "") else ""
    rid = getattr(request, field) if field else dict(context.invocation_metadata() or ()).get("x-request-id", "")
    return checked_request_id(rid, f"field {field!r}" if field else "header x-request-id")


def check_answer_size(answer, limit: int | None) -> None:
    """Refuse an answer over ``limit`` bytes here, as RESOURCE_EXHAUSTED with a message that
    says what to do: gRPC would drop it on the way out and tell the caller the same code, after
    the RPC had been counted OK (nothing on the server sees that failure)."""
    if limit is not None and (size := answer.ByteSize()) > limit:
        raise errors.MessageTooLargeError(f"the answer is {size} bytes, above this server's limit of {limit} "
                                          "(--max-message-bytes); send fewer images per request")


def rpc(method: str):
    """Wrap an async servicer method ``(self, request, context)``; ``self.metrics`` counts it
    (before the answer leaves, so a scrape right after an RPC already sees it), and an answer
    over ``self.max_message_bytes`` is refused as RESOURCE_EXHAUSTED (``check_answer_size``).
    A *request* over that limit never reaches this wrapper: gRPC refuses it before any
    handler or done-callback runs, so it is not counted here (docs/service.md, Metrics)."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            rid, bad_id = _request_id(request, context)
            token = logs.request_id.set(rid)
            start = time.perf_counter()
            deadline = deadline_of(context)

            def record(code: grpc.StatusCode) -> None:
                if self.metrics is not None:
                    self.metrics.rpc_done(method, code.name, time.perf_counter() - start, model_named(request))

            try:
                context.set_trailing_metadata((("x-request-id", rid),))
                if bad_id is not None:
                    raise bad_id  # before any work
                response = await fn(self, request, context)
                check_answer_size(response, getattr(self, "max_message_bytes", None))
                record(grpc.StatusCode.OK)
                return response
            except errors.PurifierError as exc:
                code = code_for(exc)
                record(code)
                logs.log(log, logging.INFO, f"{method} failed: {exc}", method=method, code=code.name)
                await context.abort(code, str(exc), trailing_metadata=(
                    ("x-request-id", rid), *trailing_metadata(exc)))
            except asyncio.CancelledError:
                # the caller went away, or its deadline passed while we worked. gRPC's deadline
                # timer may fire a little before time_remaining() reaches 0 (one expiry was counted
                # CANCELLED, issue 11): compare with the deadline read on arrival, with 50 ms slack.
                expired = deadline is not None and time.monotonic() >= deadline - 0.05
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
