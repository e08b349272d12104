"""purifier.v1.Purifier: decode the request, await the data plane, encode the answer
(the codec is ``v1``)."""

from __future__ import annotations

from ..proto.purifier.v1 import purifier_pb2 as pb
from ..proto.purifier.v1 import purifier_pb2_grpc as pb_grpc
from . import logs, v1
from .dataplane import DataPlane
from .status import deadline_of, rpc


class PurifierServicer(pb_grpc.PurifierServicer):
    def __init__(self, plane: DataPlane, metrics=None, max_message_bytes: int | None = None):
        self.plane = plane
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes   # answers above it: RESOURCE_EXHAUSTED (status.rpc)

    @rpc("Purify")
    async def Purify(self, request: pb.PurifyRequest, context) -> pb.PurifyResponse:
        served = self.plane.models.named(request.model)
        images = await self.plane.decode(v1.images_of, request, model=served)
        purified = await self.plane.purify(images, v1.options_of(request), deadline_of(context),
                                           v1.on_flagged_of(request), served=served)
        return v1.purify_response(purified, logs.request_id.get())

    @rpc("Classify")
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        served = self.plane.models.for_name(request.model_name or self.plane.default_model)
        images = await self.plane.decode(v1.images_of, request, model=served)
        rid = logs.request_id.get()
        purified, answer = await self.plane.classify(images, v1.options_of(request), request.model_name,
                                                     deadline_of(context), rid, v1.on_flagged_of(request))
        return v1.classify_response(purified, answer, rid, request.model_name)
