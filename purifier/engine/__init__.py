"""The serving engine: everything the service computes, with no gRPC, so a notebook or a
batch job can purify exactly as the server does::

    from purifier.engine import Batcher, Engine, Limits, choose_device

    engine = Engine.load("models/fashion-mnist", choose_device(), projection="fast")
    images, errors = engine.project(engine.validate(uint8_images), engine.config(steps=50))

- ``engine``: :class:`Engine` (one model bundle on one device, the projection defaults,
  request overrides within :class:`Limits`, validation, the CUDA-graph buckets, warm-up).
- ``batching``: :class:`Batcher`, which merges concurrent requests into one projection batch;
  built with the function it runs (``engine.project``).
- ``repository``: :class:`Repository` of :class:`ServedModel` (several models in one server,
  each with its own engine and batcher, chosen by the requested model name).
- device choice: :func:`purifier.hardware.choose_device`, re-exported here.

Transports (``purifier.server``: gRPC purifier.v1 and KServe V2) wrap this package; it never
imports them, nor grpc (a test keeps it so).
"""

from ..hardware import choose_device
from .batching import Batcher
from .engine import Engine, Limits
from .repository import Repository, ServedModel

__all__ = ["Batcher", "Engine", "Limits", "Repository", "ServedModel", "choose_device"]
