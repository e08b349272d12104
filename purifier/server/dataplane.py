"""What both APIs call: purify a batch (through the batcher), classify it downstream, or
pass a V2 request through. Servicers only decode, call this, and encode; the V2 messages
the downstream exchanges are built by the V2 codec (``v2``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import Batcher, Engine
from ..errors import NotFoundError
from ..projection import ProjectionConfig
from ..proto.inference import grpc_service_pb2 as pb
from . import v2
from .downstream import Downstream

PURIFIER_MODEL = "purifier"


@dataclass
class Purified:
    images: np.ndarray      # (B, C, H, W) float32 in [0, 1]: G(z*)
    errors: np.ndarray      # (B,) reconstruction error
    flags: np.ndarray       # (B,) bool: error above the calibrated threshold
    threshold: float | None
    cfg: ProjectionConfig


class DataPlane:
    def __init__(self, engine: Engine, batcher: Batcher, downstream: Downstream | None = None,
                 metrics=None, default_model: str = "classifier"):
        self.engine = engine
        self.batcher = batcher
        self.downstream = downstream
        self.metrics = metrics
        self.default_model = default_model
        self._specs: dict[str, v2.InputSpec] = {}

    async def purify(self, images, options: dict | None = None, deadline: float | None = None) -> Purified:
        """images: (B, C, H, W) float in [0, 1] or uint8, as an array or tensor."""
        cfg = self.engine.config(**(options or {}))
        x = self.engine.validate(images)                                 # (B, C, H, W) float32
        out, errors = await self.batcher.submit(x, cfg, deadline)
        flags = self.engine.flags(errors)
        if self.metrics is not None:
            self.metrics.images.inc(len(errors))
            self.metrics.flagged.inc(int(flags.sum()))
            for e in errors:
                self.metrics.reconstruction_error.observe(float(e))
        return Purified(out, errors, flags, self.engine.threshold, cfg)

    def need_downstream(self, model: str) -> Downstream:
        if self.downstream is None:
            raise NotFoundError(f"unknown model {model!r}: this server serves {PURIFIER_MODEL!r} and has no "
                                "downstream to forward other models to (set --downstream)")
        return self.downstream

    async def input_spec(self, model: str, deadline: float | None) -> v2.InputSpec:
        """The downstream model's first input: name, datatype and layout (cached)."""
        if model not in self._specs:
            meta = await self.need_downstream(model).model_metadata(model, deadline=deadline)
            self._specs[model] = v2.input_spec(meta, self.engine.image_shape)
        return self._specs[model]

    async def classify(self, images, options: dict | None, model: str = "", deadline: float | None = None,
                       request_id: str = "") -> tuple[Purified, pb.ModelInferResponse]:
        """Purify, then ask the downstream ``model`` (default: --model_name) to classify."""
        model = model or self.default_model
        downstream = self.need_downstream(model)
        spec = await self.input_spec(model, deadline)
        purified = await self.purify(images, options, deadline)
        request = v2.infer_request(model, spec.name, v2.images_out(purified.images, spec.layout, spec.datatype),
                                   spec.datatype, request_id)
        response = await downstream.infer(request, deadline)
        return purified, v2.to_raw_outputs(response)

    async def pass_through(self, request: pb.ModelInferRequest,
                           deadline: float | None = None) -> tuple[Purified, pb.ModelInferResponse]:
        """Purify the image input of a V2 request for another model and forward it downstream
        (in the form it came: files stay files, layouts and datatypes are kept); returns the
        purification and the downstream's answer."""
        downstream = self.need_downstream(request.model_name)
        index = v2.image_index(request, self.engine.image_shape)
        images, layout, _ = v2.images_in(request, index, self.engine.image_shape)
        purified = await self.purify(images, v2.options(request.parameters), deadline)
        forward = pb.ModelInferRequest()
        forward.CopyFrom(request)
        for key in list(forward.parameters):
            if key.startswith("purifier_"):
                del forward.parameters[key]
        v2.replace_images(forward, index, purified.images, layout)
        return purified, v2.to_raw_outputs(await downstream.infer(forward, deadline))
