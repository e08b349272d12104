"""inference.GRPCInferenceService (Open Inference Protocol, KServe V2).

Model ``purifier`` purifies: one image input (FP32 in [0, 1], UINT8, or BYTES holding
PNG/JPEG files; layout NCHW or NHWC, see ``codec``), outputs ``purified`` (same datatype
and layout as the input; FP32 NCHW for BYTES), ``reconstruction_error`` (FP32 [B]) and
``adversarial`` (BOOL [B]). Any other model name passes through to the downstream server.

Triton's ModelConfig and ModelStatistics extensions: ``purifier`` describes itself
(``purifier_config``: batch limit, tensors, dynamic batching) and reports its statistics
(``statistics_message``, from ``Metrics.model_statistics``); other models' are the
downstream's answer, passed on unchanged (UNIMPLEMENTED where the downstream has none,
as MLServer and KServe's model server do not). ModelStatistics with no name lists
``purifier`` and then every model the downstream reports.

Several models (``--model-config``): ``purifier`` is the default model (its ``purifier_model``
request parameter picks another by its repository name). Every other name is purified by the
model listed under it (else the default) and forwarded under its ``downstream_name``; its
ModelReady is false, and its ModelMetadata, ModelConfig and ModelInfer are UNAVAILABLE with
the reason, while that model failed to load or warms up.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import __version__
from ..errors import DownstreamError, InvalidInputError, ModelUnavailableError, PurifierError
from ..proto.inference import grpc_service_pb2 as pb
from ..proto.inference import grpc_service_pb2_grpc as pb_grpc
from ..proto.inference import model_config_pb2 as mc
from . import logs, v2
from .dataplane import PURIFIER_MODEL, DataPlane
from .statistics import Duration, Statistics
from .status import deadline_of, rpc

log = logging.getLogger("purifier.v2")
OUTPUTS = ("purified", "reconstruction_error", "adversarial")


def purifier_config(plane: DataPlane) -> mc.ModelConfig:
    """Model ``purifier`` (the default model) as Triton describes a model. The input is listed
    as FP32 NCHW, the form every client can send; UINT8, NHWC and BYTES (PNG/JPEG files) are
    accepted too (parameter ``input_datatypes``); parameter ``models`` lists the repository."""
    default = plane.models.default.check()
    engine, batcher = default.engine, default.batcher
    c, h, w = engine.image_shape
    cfg = mc.ModelConfig(
        name=PURIFIER_MODEL, platform="purifier_defense_gan", backend="purifier",
        max_batch_size=batcher.max_batch_size,
        input=[mc.ModelInput(name="images", data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                             dims=[c, h, w])],
        output=[mc.ModelOutput(name="purified", data_type=mc.TYPE_FP32, dims=[c, h, w]),
                mc.ModelOutput(name="reconstruction_error", data_type=mc.TYPE_FP32, dims=[1]),
                mc.ModelOutput(name="adversarial", data_type=mc.TYPE_BOOL, dims=[1])],
        dynamic_batching=mc.ModelDynamicBatching(
            # on CUDA, the batch sizes with a captured graph run fastest
            preferred_batch_size=engine.buckets if engine.graphs else [],
            max_queue_delay_microseconds=int(batcher.max_delay * 1e6)),
        instance_group=[mc.ModelInstanceGroup(
            name="purifier", count=1,
            kind=mc.ModelInstanceGroup.KIND_GPU if engine.device.type == "cuda" else mc.ModelInstanceGroup.KIND_CPU,
            gpus=[engine.device.index or 0] if engine.device.type == "cuda" else [])])
    for out in cfg.output[1:]:
        out.reshape.SetInParent()          # dims [1] reshaped to []: the output is [B], Triton's idiom
    params = {"input_datatypes": "FP32,UINT8,BYTES", "input_layouts": "NCHW,NHWC",
              "steps": str(engine.default.steps), "restarts": str(engine.default.restarts),
              "max_queue_size": str(batcher.max_queue_size),
              "default_model": default.name, "models": ",".join(m.name for m in plane.models)}
    if default.policy.threshold is not None:   # the threshold in force (--threshold, else the card's)
        params["threshold"] = repr(float(default.policy.threshold))
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def statistics_message(stats: Statistics) -> pb.ModelStatistics:
    """Model ``purifier``'s statistics (``statistics.Statistics``) as Triton's message."""
    return pb.ModelStatistics(
        name=PURIFIER_MODEL, version="1", last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
            compute_infer=_duration(stats.compute_infer)),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
                     for size, d in sorted(stats.batches.items())])


class V2:
    """The Open Inference Protocol's answers, free of any transport: each method takes the
    request message and the caller's deadline and returns the response message. The gRPC
    servicer below and the REST front end (``rest``) both call it."""

    def __init__(self, plane: DataPlane, state, metrics=None):
        self.plane = plane
        self.state = state        # .ready (the server), .model_ready (model purifier): see readiness
        self.metrics = metrics
        self._config: mc.ModelConfig | None = None

    @property
    def config(self) -> mc.ModelConfig:
        if self._config is None:             # once the default model has loaded
            self._config = purifier_config(self.plane)
        return self._config

    def _target(self, name: str) -> str:
        """The downstream name of a requested model (after its repository model is checked:
        a model that failed to load or is warming up is UNAVAILABLE, with the reason)."""
        served = self.plane.models.for_name(name)
        if not served.ready:
            served.check()
            raise ModelUnavailableError(f"model {served.name!r} is warming up")
        return served.forward_name(name)

    def server_ready(self) -> bool:
        return self.state.ready

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="purifier", version=__version__, extensions=[])

    async def model_ready(self, name: str, version: str = "", deadline: float | None = None) -> bool:
        if name == PURIFIER_MODEL:
            return self.state.model_ready and self.plane.models.default.ready
        downstream = self.plane.need_downstream(name)
        served = self.plane.models.for_name(name)
        if not served.ready:
            return False             # its purifier model failed to load, or warms up
        try:
            return await downstream.model_ready(served.forward_name(name), version, deadline)
        except DownstreamError:
            return False  # a model behind an unreachable server is not ready; not an error to probes

    async def model_metadata(self, name: str, version: str = "",
                             deadline: float | None = None) -> pb.ModelMetadataResponse:
        if name != PURIFIER_MODEL:
            downstream = self.plane.need_downstream(name)
            answer = await downstream.model_metadata(self._target(name), version, deadline)
            answer.name = name
            return answer
        c, h, w = self.plane.models.default.check().engine.image_shape
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=PURIFIER_MODEL, versions=["1"], platform="purifier_defense_gan",
            inputs=[T(name="images", datatype="FP32", shape=[-1, c, h, w])],
            outputs=[T(name="purified", datatype="FP32", shape=[-1, c, h, w]),
                     T(name="reconstruction_error", datatype="FP32", shape=[-1]),
                     T(name="adversarial", datatype="BOOL", shape=[-1])])

    async def model_config(self, name: str, version: str = "",
                           deadline: float | None = None) -> pb.ModelConfigResponse:
        if name != PURIFIER_MODEL:
            downstream = self.plane.need_downstream(name)
            response = await downstream.model_config(self._target(name), version, deadline)
            # Through purifier a pass-through model takes at most what purifier's batcher takes: a
            # client that sizes its requests by this config must not be refused for it.
            ours = self.plane.models.for_name(name).check().engine.limits.max_batch_size
            theirs = response.config.max_batch_size
            response.config.max_batch_size = min(theirs, ours) if theirs > 0 else ours
            return response
        return pb.ModelConfigResponse(config=self.config)

    async def model_statistics(self, name: str = "", version: str = "",
                               deadline: float | None = None) -> pb.ModelStatisticsResponse:
        if name and name != PURIFIER_MODEL:
            downstream = self.plane.need_downstream(name)
            return await downstream.model_statistics(self.plane.models.for_name(name).forward_name(name),
                                                     version, deadline)
        response = pb.ModelStatisticsResponse()
        if self.metrics is not None:
            response.model_stats.append(statistics_message(self.metrics.model_statistics()))
        if not name and self.plane.downstream is not None:
            try:
                theirs = await self.plane.downstream.model_statistics("", "", deadline)
                response.model_stats.extend(theirs.model_stats)
            except PurifierError as exc:   # purifier's own statistics are still worth answering
                logs.log(log, logging.WARNING, "ModelStatistics: the downstream's are left out", error=str(exc))
        return response

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None = None) -> pb.ModelInferResponse:
        if request.model_name != PURIFIER_MODEL:
            purified, response = await self.plane.pass_through(request, deadline)
            response.id = request.id
            v2.annotate(response.parameters, purified)
            return response
        if len(request.inputs) != 1:
            raise InvalidInputError(f"model {PURIFIER_MODEL!r} takes one input (the images), "
                                    f"got {len(request.inputs)}")
        wanted = v2.wanted_outputs(request, PURIFIER_MODEL, OUTPUTS)
        served = self.plane.models.named(v2.model_param(request.parameters))
        images, layout, datatype = await self.plane.decode(v2.images_in, request, 0, model=served)
        purified = await self.plane.purify(images, v2.options(request.parameters), deadline,
                                           v2.on_flagged(request.parameters), served=served)
        response = pb.ModelInferResponse(model_name=PURIFIER_MODEL, model_version="1", id=request.id)
        v2.add_outputs(response, {"purified": v2.images_out(purified.images, layout, datatype),
                                  "reconstruction_error": purified.errors.astype(np.float32),
                                  "adversarial": purified.flags.astype(bool)}, wanted)
        v2.annotate(response.parameters, purified)
        return response


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService: each RPC is ``V2``'s answer with the caller's deadline."""

    def __init__(self, api: V2, metrics=None, max_message_bytes: int | None = None):
        self.api = api
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes   # answers above it: RESOURCE_EXHAUSTED (status.rpc)

    @rpc("ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.api.server_ready())

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request, context):
        return self.api.server_metadata()

    @rpc("ModelReady")
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=await self.api.model_ready(request.name, request.version,
                                                                      deadline_of(context)))

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request, context):
        return await self.api.model_metadata(request.name, request.version, deadline_of(context))

    @rpc("ModelConfig")
    async def ModelConfig(self, request, context):
        return await self.api.model_config(request.name, request.version, deadline_of(context))

    @rpc("ModelStatistics")
    async def ModelStatistics(self, request, context):
        return await self.api.model_statistics(request.name, request.version, deadline_of(context))

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        return await self.api.infer(request, deadline_of(context))
