"""The reference downstream: a shipped classifier behind the Open Inference Protocol (V2 gRPC).

Model ``<model_name>``: input ``input`` (FP32 in [0, 1] or UINT8; NCHW or NHWC as in
``codec``), outputs ``logits`` (FP32 [B, classes]) and ``label`` (INT64 [B]).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import __version__, checkpoint, validation
from ..hardware import choose_device
from ..errors import InvalidInputError, NotFoundError
from ..proto.inference import grpc_service_pb2 as pb
from ..proto.inference import grpc_service_pb2_grpc as pb_grpc
from ..settings import ClassifierSettings
from . import codec, logs, v2
from .app import grpc_options
from .metrics import Metrics
from .status import rpc

log = logging.getLogger("purifier.classifier")
MAX_BATCH = 1024
OUTPUTS = ("logits", "label")


class ClassifierServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, classifier: torch.nn.Module, image_shape, name: str, device, executor, metrics):
        self.classifier = classifier
        self.image_shape = tuple(image_shape)
        self.name = name
        self.device = device
        self.executor = executor
        self.metrics = metrics
        self.ready = False

    def _model(self, name: str) -> None:
        if name != self.name:
            raise NotFoundError(f"unknown model {name!r}; this server serves {self.name!r}")

    def predict(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.classifier(x.to(self.device)).float().cpu().numpy()   # (B, classes)

    @rpc("ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="purifier-classifier", version=__version__)

    @rpc("ModelReady")
    async def ModelReady(self, request, context):
        self._model(request.name)
        return pb.ModelReadyResponse(ready=self.ready)

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request, context):
        self._model(request.name)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name, versions=["1"], platform="pytorch_safetensors",
            inputs=[T(name="input", datatype="FP32", shape=[-1, *self.image_shape])],
            outputs=[T(name="logits", datatype="FP32", shape=[-1, -1]), T(name="label", datatype="INT64", shape=[-1])])

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        self._model(request.model_name)
        if len(request.inputs) != 1:
            raise InvalidInputError(f"model {self.name!r} takes one input, got {len(request.inputs)}")
        wanted = v2.wanted_outputs(request, self.name, OUTPUTS)
        images, _, _ = v2.images_in(request, 0, self.image_shape)
        x = validation.to_float_images(images, self.image_shape, MAX_BATCH)
        logits = await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, x)
        response = pb.ModelInferResponse(model_name=self.name, model_version="1", id=request.id)
        v2.add_outputs(response, {"logits": logits.astype(np.float32),
                                  "label": logits.argmax(axis=1).astype(np.int64)}, wanted)
        return response


class ClassifierServer:
    def __init__(self, settings: ClassifierSettings):
        self.settings = settings
        self.port: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifier")
        self._health = health.aio.HealthServicer()
        self._grpc: aio.Server | None = None

    async def start(self) -> "ClassifierServer":
        s = self.settings
        device = choose_device(s.device)
        loop = asyncio.get_running_loop()
        bundle = await loop.run_in_executor(self._executor, lambda: checkpoint.load_bundle(
            s.model_dir, device, need_classifier=True))
        servicer = self.servicer = ClassifierServicer(bundle.classifier, bundle.image_shape, s.model_name,
                                                      torch.device(device), self._executor, Metrics())
        server = self._grpc = aio.server(options=grpc_options(64 * 1024 * 1024))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        await server.start()
        await loop.run_in_executor(self._executor, codec.preload)
        await loop.run_in_executor(self._executor, servicer.predict, torch.zeros(1, *bundle.image_shape))
        servicer.ready = True
        for name in ("", "inference.GRPCInferenceService"):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logs.log(log, logging.INFO, "serving classifier", port=self.port, model_name=s.model_name,
                 model_dir=s.model_dir, device=device)
        return self

    async def stop(self, grace: float = 5.0) -> None:
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        self._executor.shutdown(wait=False)


async def _serve(settings: ClassifierSettings) -> None:
    server = await ClassifierServer(settings).start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.stop()


def serve(settings: ClassifierSettings) -> int:
    logs.configure("info")
    asyncio.run(_serve(settings))
    return 0
