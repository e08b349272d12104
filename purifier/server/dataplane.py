"""What both APIs call: purify a batch (through the batcher), classify it downstream, or
pass a V2 request through. Servicers only decode, call this, and encode; the V2 messages
the downstream exchanges are built by the V2 codec (``v2``).

Every purification goes through the flagged-input policy (``purifier.policy``): under
``reject`` a request with a flagged image fails here, after its projection and before
anything is forwarded."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numpy as np

from ..engine import Batcher, Engine
from ..errors import FlaggedInputError, InvalidInputError, NotFoundError, OverloadedError
from ..policy import REASON_FLAGGED, Policy
from ..projection import ProjectionConfig
from ..proto.inference import grpc_service_pb2 as pb
from . import codec, logs, v2
from .downstream import Downstream

PURIFIER_MODEL = "purifier"
log = logging.getLogger("purifier.policy")


@dataclass
class Purified:
    images: np.ndarray      # (B, C, H, W) float32 in [0, 1]: G(z*)
    errors: np.ndarray      # (B,) reconstruction error
    flags: np.ndarray       # (B,) bool: error above the calibrated threshold
    threshold: float | None
    cfg: ProjectionConfig


def _counted(purify):
    """Model ``purifier``'s success/fail statistics (``Metrics.purification_done``): every
    purification, from here to its answer or its error."""
    @functools.wraps(purify)
    async def counted(self, *args, **kwargs):
        start, ok = time.perf_counter(), False
        try:
            result = await purify(self, *args, **kwargs)
            ok = True
            return result
        finally:
            if self.metrics is not None:
                self.metrics.purification_done(ok, time.perf_counter() - start)
    return counted


class DataPlane:
    def __init__(self, engine: Engine, batcher: Batcher, downstream: Downstream | None = None,
                 metrics=None, default_model: str = "classifier", policy: Policy | None = None,
                 decoder: codec.DecodePool | None = None):
        self.engine = engine
        self.batcher = batcher
        self.downstream = downstream
        self.metrics = metrics
        self.default_model = default_model
        self.policy = policy or Policy.build(card_threshold=engine.threshold)
        self._specs: dict[str, v2.InputSpec] = {}
        self.decoder = decoder or codec.DecodePool(engine.image_shape,
                                                   codec.DecodeLimits(max_images=engine.limits.max_batch_size))

    async def decode(self, fn, *args):
        """A request's images through its codec, off the event loop and within the decode
        limits: ``decode(v2.images_in, request, index)``, ``decode(v1.images_of, request)``."""
        try:
            return await self.decoder.run(fn, *args)
        except OverloadedError:
            self._refused("decode_busy")
            raise

    def _refused(self, reason: str) -> None:
        """A request refused before compute, counted in ``rejected{reason}`` beside the batcher's."""
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    @_counted
    async def purify(self, images, options: dict | None = None, deadline: float | None = None,
                     on_flagged: str | None = None, model: str = PURIFIER_MODEL) -> Purified:
        """images: (B, C, H, W) float in [0, 1] or uint8, as an array or tensor. ``on_flagged``:
        the request's policy (None: the server's); ``model``: whom the images are for, as
        rejections are counted. Raises FlaggedInputError when the policy rejects them."""
        policy = self.policy.for_request(on_flagged)      # a bad choice fails before the compute
        cfg = self.engine.config(**(options or {}))
        x = self.engine.validate(images)                                 # (B, C, H, W) float32
        try:
            self.engine.check_compute(cfg, x.shape[0])
        except InvalidInputError:
            self._refused("compute_budget")
            raise
        out, errors = await self.batcher.submit(x, cfg, deadline)
        flags = policy.flags(errors)
        if self.metrics is not None:
            self.metrics.images.inc(len(errors))
            self.metrics.flagged.inc(int(flags.sum()))
            for e in errors:
                self.metrics.reconstruction_error.observe(float(e))
        try:
            policy.check(errors, flags)
        except FlaggedInputError as exc:
            if self.metrics is not None:
                self.metrics.policy_rejected.labels(model, REASON_FLAGGED).inc()
            logs.log(log, logging.INFO, "rejected flagged input", model=model, reason=REASON_FLAGGED,
                     flagged=list(exc.indices), errors=list(exc.errors), threshold=exc.threshold,
                     images=len(flags))
            raise
        return Purified(out, errors, flags, policy.threshold, cfg)

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
                       request_id: str = "", on_flagged: str | None = None
                       ) -> tuple[Purified, pb.ModelInferResponse]:
        """Purify, then ask the downstream ``model`` (default: --model_name) to classify."""
        model = model or self.default_model
        downstream = self.need_downstream(model)
        spec = await self.input_spec(model, deadline)
        purified = await self.purify(images, options, deadline, on_flagged, model)
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
        images, layout, _ = await self.decode(v2.images_in, request, index)
        purified = await self.purify(images, v2.options(request.parameters), deadline,
                                     v2.on_flagged(request.parameters), request.model_name)
        forward = pb.ModelInferRequest()
        forward.CopyFrom(request)
        for key in list(forward.parameters):
            if key.startswith("purifier_"):
                del forward.parameters[key]
        v2.replace_images(forward, index, purified.images, layout)
        return purified, v2.to_raw_outputs(await downstream.infer(forward, deadline))
