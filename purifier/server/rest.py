"""The Open Inference Protocol over HTTP/REST (KServe V2 REST, Triton's HTTP API), served
with Starlette on uvicorn in the server's own event loop when ``--http-port`` is given.

Every route converts its body to the V2 message (``v2json``), awaits the same ``V2``
answer the gRPC servicer gives (purification, pass-through forwarding, batching, limits,
policy), and converts the answer back; errors go through the one mapping of
``status.code_for`` and become HTTP statuses here (``HTTP_STATUS``), with a JSON body
``{"error": "..."}``. Routes (``/versions/{version}`` may follow ``/models/{model}``):

    GET  /v2/health/live, /v2/health/ready       200, or 400 when not ready (as the spec says)
    GET  /v2                                      server metadata
    GET  /v2/models/{model}                       model metadata
    GET  /v2/models/{model}/ready                 200, or 400 when not ready
    POST /v2/models/{model}/infer                 JSON tensors, or Triton's binary tensor data
    GET  /v2/models/{model}/config                Triton: the model configuration
    GET  /v2/models/{model}/stats, /v2/models/stats   Triton: statistics

Request ids: an infer body's ``id``, else the ``x-request-id`` header, else a new one, echoed
in the ``x-request-id`` response header. One that is not printable ASCII or is longer than
128 characters answers 400 before any work, with a new id in that header
(``status.checked_request_id``, the rule the gRPC servicers use).

REST has no deadline of its own: a request waits as long as the client keeps it open
(and the downstream's ``--downstream-timeout``). Metrics count each route as method
``rest:<RPC name>`` (``rest:ModelInfer``) beside the gRPC methods.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from contextlib import contextmanager

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import MessageTooLargeError, PurifierError
from . import logs, v2json
from .status import checked_request_id, code_for, trailing_metadata
from .v2_servicer import V2

log = logging.getLogger("purifier.rest")

# gRPC status -> HTTP status, as Google's API design maps them (the V2 REST spec only asks
# for 4xx/5xx with a JSON error). 413 is the body limit (MessageTooLargeError), checked here.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}


def endpoint(method: str):
    """Wrap a route: request id, error mapping, metrics (as ``status.rpc`` does for gRPC)."""
    def wrap(fn):
        async def handler(self: "RestApp", request: Request) -> Response:
            # the x-request-id header, checked as gRPC checks its metadata (one rule, in status)
            rid, bad_id = checked_request_id(request.headers.get("x-request-id", ""), "header x-request-id")
            token = logs.request_id.set(rid)
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if bad_id is not None:
                    raise bad_id  # before any work
                response = await fn(self, request)
            except PurifierError as exc:
                code = code_for(exc)
                logs.log(log, logging.INFO, f"rest {method} failed: {exc}", method=method, code=code.name)
                response = JSONResponse({"error": str(exc)}, HTTP_STATUS.get(code, 500),
                                        headers=dict(trailing_metadata(exc)))
            except Exception:  # noqa: BLE001 - the traceback goes to the log, never to the client
                code = grpc.StatusCode.INTERNAL
                log.exception(f"rest {method}: unexpected error")
                response = JSONResponse({"error": f"internal error (request id {rid}); the server log has details"},
                                        500)
            finally:
                rid = logs.request_id.get()   # infer may have taken the body's id instead
                logs.request_id.reset(token)
            response.headers["x-request-id"] = rid
            if self.metrics is not None:
                self.metrics.rpc_done(f"rest:{method}", code.name, time.perf_counter() - start,
                                      request.path_params.get("model", ""))
            return response
        return handler
    return wrap


def _ready(ready: bool, key: str = "ready") -> Response:
    return JSONResponse({key: ready}, 200 if ready else 400)


class RestApp:
    """The Starlette application over one ``V2``."""

    def __init__(self, api: V2, metrics=None, max_body_bytes: int = 16 * 1024 * 1024):
        self.api = api
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        model = "/v2/models/{model}"
        routes = [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models/stats", self.stats, methods=["GET"]),
        ]
        for prefix in (model, model + "/versions/{version}"):
            routes += [Route(prefix, self.model_metadata, methods=["GET"]),
                       Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                       Route(prefix + "/infer", self.infer, methods=["POST"]),
                       Route(prefix + "/config", self.model_config, methods=["GET"]),
                       Route(prefix + "/stats", self.stats, methods=["GET"])]
        self.app = Starlette(routes=routes)

    @endpoint("ServerLive")
    async def live(self, request: Request) -> Response:
        return _ready(True, "live")

    @endpoint("ServerReady")
    async def ready(self, request: Request) -> Response:
        return _ready(self.api.server_ready())

    @endpoint("ServerMetadata")
    async def server_metadata(self, request: Request) -> Response:
        meta = self.api.server_metadata()
        return JSONResponse({"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)})

    @endpoint("ModelMetadata")
    async def model_metadata(self, request: Request) -> Response:
        p = request.path_params
        return JSONResponse(v2json.message_json(await self.api.model_metadata(p["model"], p.get("version", ""))))

    @endpoint("ModelReady")
    async def model_ready(self, request: Request) -> Response:
        p = request.path_params
        return _ready(await self.api.model_ready(p["model"], p.get("version", "")))

    @endpoint("ModelConfig")
    async def model_config(self, request: Request) -> Response:
        p = request.path_params
        answer = await self.api.model_config(p["model"], p.get("version", ""))
        return JSONResponse(v2json.message_json(answer.config))     # Triton answers the config itself

    @endpoint("ModelStatistics")
    async def stats(self, request: Request) -> Response:
        p = request.path_params
        answer = await self.api.model_statistics(p.get("model", ""), p.get("version", ""))
        return JSONResponse({"model_stats": [v2json.message_json(m) for m in answer.model_stats]})

    @endpoint("ModelInfer")
    async def infer(self, request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise MessageTooLargeError(f"request body of {declared} bytes is over the limit of {self.max_body_bytes} "
                                       "(--max-message-bytes)")
        body = bytearray()
        async for chunk in request.stream():     # bounded even when no length was declared
            body += chunk
            if len(body) > self.max_body_bytes:
                raise MessageTooLargeError(f"request body is over the limit of {self.max_body_bytes} bytes "
                                           "(--max-message-bytes)")
        p = request.path_params
        v2_request, wanted, binary_all = v2json.infer_request(p["model"], p.get("version", ""), bytes(body),
                                                              request.headers.get(v2json.HEADER_LENGTH))
        if v2_request.id:  # the body's id wins over the header's, as gRPC's field wins over its metadata
            rid, bad_id = checked_request_id(v2_request.id, "field 'id'")
            logs.request_id.set(rid)
            if bad_id is not None:
                raise bad_id  # before any decoding or compute
        answer = await self.api.infer(v2_request)
        content, header_length = v2json.infer_response(answer, wanted, binary_all)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})


class _Uvicorn(uvicorn.Server):
    @contextmanager
    def capture_signals(self):
        # purifier's own SIGTERM handler drains gRPC and REST together; uvicorn's would
        # replace it and re-raise the signal after its own shutdown.
        yield


class RestServer:
    """uvicorn serving a ``RestApp`` on an already-bound socket (port 0 picks a free port)."""

    def __init__(self, app: RestApp, host: str, port: int, tls: tuple[str, str, str | None] | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(128)
        self.port = self.socket.getsockname()[1]
        options = {}
        if tls is not None:
            cert, key, client_ca = tls
            options = dict(ssl_certfile=cert, ssl_keyfile=key)
            if client_ca:
                options.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app.app, lifespan="off", access_log=False, log_config=None,
                                timeout_graceful_shutdown=30, **options)
        self._server = _Uvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self.socket]),
                                                            name="purifier-rest")
        while not self._server.started:
            if self._task.done():
                self._task.result()      # raises what stopped it
                raise RuntimeError("the REST server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        """Refuse new connections, let requests in flight finish within ``grace`` seconds."""
        if self._task is None:
            return
        # uvicorn logs an error when a zero timeout expires even with nothing in flight
        self._server.config.timeout_graceful_shutdown = max(grace, 0.05)
        self._server.should_exit = True
        await self._task
