"""inference.GRPCInferenceService (Open Inference Protocol, KServe V2).

Model ``purifier`` purifies: one image input (FP32 in [0, 1], UINT8, or BYTES holding
PNG/JPEG files; layout NCHW or NHWC, see ``codec``), outputs ``purified`` (same datatype
and layout as the input; FP32 NCHW for BYTES), ``reconstruction_error`` (FP32 [B]) and
``adversarial`` (BOOL [B]). Any other model name passes through to the downstream server.
"""

from __future__ import annotations

import numpy as np

from .. import __version__
from ..errors import DownstreamError, InvalidInputError
from ..proto.inference import grpc_service_pb2 as pb
from ..proto.inference import grpc_service_pb2_grpc as pb_grpc
from . import v2
from .dataplane import PURIFIER_MODEL, DataPlane
from .status import deadline_of, rpc

OUTPUTS = ("purified", "reconstruction_error", "adversarial")


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, state, metrics=None):
        self.plane = plane
        self.state = state        # .ready: model loaded, warmed up, not draining
        self.metrics = metrics

    @rpc("ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.ready)

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="purifier", version=__version__, extensions=[])

    @rpc("ModelReady")
    async def ModelReady(self, request, context):
        if request.name == PURIFIER_MODEL:
            return pb.ModelReadyResponse(ready=self.state.ready)
        downstream = self.plane.need_downstream(request.name)
        try:
            ready = await downstream.model_ready(request.name, request.version, deadline_of(context))
        except DownstreamError:
            ready = False  # a model behind an unreachable server is not ready; not an error to probes
        return pb.ModelReadyResponse(ready=ready)

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request, context):
        if request.name != PURIFIER_MODEL:
            downstream = self.plane.need_downstream(request.name)
            return await downstream.model_metadata(request.name, request.version, deadline_of(context))
        c, h, w = self.plane.engine.image_shape
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=PURIFIER_MODEL, versions=["1"], platform="purifier_defense_gan",
            inputs=[T(name="images", datatype="FP32", shape=[-1, c, h, w])],
            outputs=[T(name="purified", datatype="FP32", shape=[-1, c, h, w]),
                     T(name="reconstruction_error", datatype="FP32", shape=[-1]),
                     T(name="adversarial", datatype="BOOL", shape=[-1])])

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        if request.model_name != PURIFIER_MODEL:
            purified, response = await self.plane.pass_through(request, deadline_of(context))
            response.id = request.id
            v2.annotate(response.parameters, purified)
            return response
        if len(request.inputs) != 1:
            raise InvalidInputError(f"model {PURIFIER_MODEL!r} takes one input (the images), "
                                    f"got {len(request.inputs)}")
        wanted = v2.wanted_outputs(request, PURIFIER_MODEL, OUTPUTS)
        images, layout, datatype = v2.images_in(request, 0, self.plane.engine.image_shape)
        purified = await self.plane.purify(images, v2.options(request.parameters), deadline_of(context),
                                           v2.on_flagged(request.parameters))
        response = pb.ModelInferResponse(model_name=PURIFIER_MODEL, model_version="1", id=request.id)
        v2.add_outputs(response, {"purified": v2.images_out(purified.images, layout, datatype),
                                  "reconstruction_error": purified.errors.astype(np.float32),
                                  "adversarial": purified.flags.astype(bool)}, wanted)
        v2.annotate(response.parameters, purified)
        return response
