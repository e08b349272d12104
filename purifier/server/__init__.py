"""The transport around the serving engine (``purifier.engine``: the compute, the limits,
the batcher, no gRPC): gRPC, and the V2 API over HTTP/REST.

- ``dataplane``: what both APIs call (purify, classify, forward); no gRPC servicer code.
- ``v2`` / ``v1``: the codecs between each API's messages and images, options and results.
- ``codec``: tensors <-> bytes (raw little-endian, V2 contents, PNG/JPEG).
- ``downstream``: the V2 gRPC client to the classifier behind us.
- ``purifier_servicer`` / ``v2_servicer``: decode, await the data plane, encode
  (``v2_servicer.V2``: the V2 answers, free of any transport, for gRPC and REST).
- ``rest`` / ``v2json``: V2 over HTTP (Starlette on uvicorn) and its JSON/binary bodies.
- ``status``: purifier.errors -> gRPC status codes, in one place.
- ``metrics``, ``logs``: Prometheus metrics and structured logs; ``statistics``: model
  ``purifier``'s Triton-style statistics (ModelStatistics).
- ``readiness``: what "ready" means (warm, not draining, downstream reachable), in one place.
- ``app``: ``create_server(settings)`` and ``serve(settings)`` (health, reflection, TLS, SIGTERM).
- ``classifier``: the reference downstream classifier server.
"""

from .app import Server, create_server, serve

__all__ = ["Server", "create_server", "serve"]
