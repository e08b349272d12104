"""What both APIs call: purify a batch (through the batcher), classify it downstream, or
pass a V2 request through. Servicers only decode, call this, and encode; the V2 messages
the downstream exchanges are built by the V2 codec (``v2``).

Several models (``engine.Repository``): a request is purified by the model listed under the
name it asks for (a pass-through's or Classify's downstream model name; Purify's ``model``, V2
``purifier``'s ``purifier_model`` parameter), else by the default model, each through its own
batcher, so a batch never mixes generators. A model that failed to load answers UNAVAILABLE
with its reason; the others serve.

Every purification goes through its model's flagged-input policy (``purifier.policy``): under
``reject`` a request with a flagged image fails here, after its projection and before
anything is forwarded."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numpy as np

from ..engine import Batcher, Engine, Repository, ServedModel
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
    model: str = ""         # the repository model that purified


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
    def __init__(self, models: Repository, downstream: Downstream | None = None,
                 metrics=None, default_model: str = "classifier", decoder: codec.DecodePool | None = None):
        self.models = models
        self.downstream = downstream
        self.metrics = metrics
        self.default_model = default_model     # the downstream model Classify calls when none is named
        self._specs: dict[tuple[str, str], v2.InputSpec] = {}
        if decoder is None:      # each request decodes at its own model's shape; this is the pool's default
            engine = next(m.engine for m in models if m.loaded)
            decoder = codec.DecodePool(engine.image_shape, codec.DecodeLimits(max_images=engine.limits.max_batch_size))
        self.decoder = decoder

    # The default model's parts, as a single-model server had them.
    @property
    def engine(self) -> Engine | None:
        return self.models.default.engine

    @property
    def batcher(self) -> Batcher | None:
        return self.models.default.batcher

    @property
    def policy(self) -> Policy | None:
        return self.models.default.policy

    async def decode(self, fn, *args, model: ServedModel | None = None):
        """A request's images through its codec, off the event loop and within the decode
        limits, for ``model``'s image shape (default: the default model's):
        ``decode(v2.images_in, request, index)``, ``decode(v1.images_of, request)``."""
        model = (model or self.models.default).check()
        try:
            return await self.decoder.run(fn, *args, image_shape=model.engine.image_shape)
        except OverloadedError:
            self._refused("decode_busy", model)
            raise

    def _refused(self, reason: str, model: ServedModel) -> None:
        """A request refused before compute, counted in ``rejected{reason}`` beside the batcher's."""
        if model.metrics is not None:
            model.metrics.rejected.labels(reason).inc()

    @_counted
    async def purify(self, images, options: dict | None = None, deadline: float | None = None,
                     on_flagged: str | None = None, model: str = PURIFIER_MODEL,
                     served: ServedModel | None = None) -> Purified:
        """images: (B, C, H, W) float in [0, 1] or uint8, as an array or tensor. ``on_flagged``:
        the request's policy (None: the model's); ``model``: whom the images are for, as
        rejections are counted; ``served``: the repository model that purifies (default: the
        default one). Raises FlaggedInputError when the policy rejects them."""
        served = (served or self.models.default).check()
        engine, m = served.engine, served.metrics
        policy = served.policy.for_request(on_flagged)      # a bad choice fails before the compute
        cfg = engine.config(**(options or {}))
        x = engine.validate(images)                                      # (B, C, H, W) float32
        try:
            engine.check_compute(cfg, x.shape[0])
        except InvalidInputError:
            self._refused("compute_budget", served)
            raise
        out, errors = await served.batcher.submit(x, cfg, deadline)
        flags = policy.flags(errors)
        if m is not None:
            m.images.inc(len(errors))
            m.flagged.inc(int(flags.sum()))
            for e in errors:
                m.reconstruction_error.observe(float(e))
        try:
            policy.check(errors, flags)
        except FlaggedInputError as exc:
            if self.metrics is not None:
                self.metrics.policy_rejected.labels(model, REASON_FLAGGED).inc()
            logs.log(log, logging.INFO, "rejected flagged input", model=model, purified_by=served.name,
                     reason=REASON_FLAGGED, flagged=list(exc.indices), errors=list(exc.errors),
                     threshold=exc.threshold, images=len(flags))
            raise
        return Purified(out, errors, flags, policy.threshold, cfg, served.name)

    def need_downstream(self, model: str) -> Downstream:
        if self.downstream is None:
            raise NotFoundError(f"unknown model {model!r}: this server serves {PURIFIER_MODEL!r} and has no "
                                "downstream to forward other models to (set --downstream)")
        return self.downstream

    async def input_spec(self, model: str, served: ServedModel, deadline: float | None) -> v2.InputSpec:
        """The downstream model's first input: name, datatype and layout (cached)."""
        key = (model, served.name)
        if key not in self._specs:
            meta = await self.need_downstream(model).model_metadata(model, deadline=deadline)
            self._specs[key] = v2.input_spec(meta, served.engine.image_shape)
        return self._specs[key]

    async def classify(self, images, options: dict | None, model: str = "", deadline: float | None = None,
                       request_id: str = "", on_flagged: str | None = None
                       ) -> tuple[Purified, pb.ModelInferResponse]:
        """Purify with ``model``'s repository model, then ask the downstream ``model`` (default:
        --model_name) to classify."""
        model = model or self.default_model
        served = self.models.for_name(model).check()
        target = served.forward_name(model)
        downstream = self.need_downstream(model)
        spec = await self.input_spec(target, served, deadline)
        purified = await self.purify(images, options, deadline, on_flagged, model, served)
        request = v2.infer_request(target, spec.name, v2.images_out(purified.images, spec.layout, spec.datatype),
                                   spec.datatype, request_id)
        response = await downstream.infer(request, deadline)
        return purified, v2.to_raw_outputs(response)

    async def pass_through(self, request: pb.ModelInferRequest,
                           deadline: float | None = None) -> tuple[Purified, pb.ModelInferResponse]:
        """Purify the image input of a V2 request for another model with that model's repository
        model, and forward it downstream (in the form it came: files stay files, layouts and
        datatypes are kept); returns the purification and the downstream's answer."""
        downstream = self.need_downstream(request.model_name)
        served = self.models.for_name(request.model_name).check()
        if "purifier_model" in request.parameters:
            raise InvalidInputError("parameter purifier_model chooses the model of V2 model "
                                    f"{PURIFIER_MODEL!r} only; a pass-through is purified by the model configured "
                                    f"for its name ({request.model_name!r} -> {served.name!r})")
        index = v2.image_index(request, served.engine.image_shape)
        images, layout, _ = await self.decode(v2.images_in, request, index, model=served)
        purified = await self.purify(images, v2.options(request.parameters), deadline,
                                     v2.on_flagged(request.parameters), request.model_name, served)
        forward = pb.ModelInferRequest()
        forward.CopyFrom(request)
        forward.model_name = served.forward_name(request.model_name)
        for key in list(forward.parameters):
            if key.startswith("purifier_"):
                del forward.parameters[key]
        v2.replace_images(forward, index, purified.images, layout)
        response = v2.to_raw_outputs(await downstream.infer(forward, deadline))
        if forward.model_name != request.model_name:   # the caller sees the name it asked for
            response.model_name = request.model_name
        return purified, response
