"""What both APIs call: purify a batch (through the batcher), classify it downstream, or
pass a V2 request through. Servicers only decode, call this, and encode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import Batcher, Engine
from ..errors import InvalidInputError, NotFoundError
from ..projection import ProjectionConfig
from ..proto.inference import grpc_service_pb2 as pb
from . import codec, v2
from .downstream import Downstream

PURIFIER_MODEL = "purifier"
# V2 request parameters read by purifier (and stripped before forwarding).
OPTION_PARAMS = {"purifier_steps": "steps", "purifier_restarts": "restarts", "purifier_seed": "seed"}


@dataclass
class Purified:
    images: np.ndarray      # (B, C, H, W) float32 in [0, 1]: G(z*)
    errors: np.ndarray      # (B,) reconstruction error
    flags: np.ndarray       # (B,) bool: error above the calibrated threshold
    threshold: float | None
    cfg: ProjectionConfig


@dataclass
class InputSpec:
    """How a downstream model wants its image input."""
    name: str = "input"
    datatype: str = "FP32"
    layout: str = "NCHW"


class DataPlane:
    def __init__(self, engine: Engine, batcher: Batcher, downstream: Downstream | None = None,
                 metrics=None, default_model: str = "classifier"):
        self.engine = engine
        self.batcher = batcher
        self.downstream = downstream
        self.metrics = metrics
        self.default_model = default_model
        self._specs: dict[str, InputSpec] = {}

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

    async def input_spec(self, model: str, deadline: float | None) -> InputSpec:
        """The downstream model's first input: name, datatype and layout (cached)."""
        if model not in self._specs:
            meta = await self.need_downstream(model).model_metadata(model, deadline=deadline)
            spec = InputSpec()
            if meta.inputs:
                first = meta.inputs[0]
                spec.name = first.name or spec.name
                spec.datatype = first.datatype if first.datatype in codec.IMAGE_DTYPES else "FP32"
                c, h, w = self.engine.image_shape
                shape = tuple(first.shape[-3:])
                if len(shape) == 3 and shape == (h, w, c) and shape != (c, h, w):
                    spec.layout = "NHWC"
            self._specs[model] = spec
        return self._specs[model]

    async def classify(self, images, options: dict | None, model: str = "", deadline: float | None = None,
                       request_id: str = "") -> tuple[Purified, pb.ModelInferResponse]:
        """Purify, then ask the downstream ``model`` (default: --model_name) to classify."""
        model = model or self.default_model
        downstream = self.need_downstream(model)
        spec = await self.input_spec(model, deadline)
        purified = await self.purify(images, options, deadline)
        arr = codec.to_dtype(codec.from_nchw(purified.images, spec.layout), spec.datatype)
        request = pb.ModelInferRequest(model_name=model, id=request_id)
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(arr.shape))
        request.raw_input_contents.append(codec.to_raw(arr))
        response = await downstream.infer(request, deadline)
        return purified, v2.to_raw_outputs(response)

    async def pass_through(self, request: pb.ModelInferRequest, deadline: float | None = None) -> pb.ModelInferResponse:
        """Purify the image input of a V2 request for another model, forward it downstream,
        and return the downstream's answer with the purification results as parameters."""
        downstream = self.need_downstream(request.model_name)
        given = v2.params(request.parameters)
        index = self.image_input(request, given.get("purifier_input"))
        inp = request.inputs[index]
        images = v2.input_array(request, index, self.engine.image_shape)
        layout = v2.params(inp.parameters).get("layout")
        nchw, layout = (images, "NCHW") if inp.datatype == "BYTES" else codec.to_nchw(
            images, self.engine.image_shape, layout)
        purified = await self.purify(nchw, options_from(given), deadline)
        forward = pb.ModelInferRequest()
        forward.CopyFrom(request)
        for key in list(forward.parameters):
            if key.startswith("purifier_"):
                del forward.parameters[key]
        if inp.datatype == "BYTES":  # the downstream wants files: send PNGs of the purified images
            v2.set_input(forward, index, codec.encode_pngs(codec.to_dtype(purified.images, "UINT8")), "BYTES")
        else:
            arr = codec.to_dtype(codec.from_nchw(purified.images, layout), inp.datatype)
            v2.set_input(forward, index, arr, inp.datatype)
        response = v2.to_raw_outputs(await downstream.infer(forward, deadline))
        annotate(response.parameters, purified)
        return response

    def image_input(self, request: pb.ModelInferRequest, name: str | None = None) -> int:
        """Which input holds the images: the one named by ``purifier_input``, the only one, or
        the first whose shape fits the model's image in either layout."""
        if not request.inputs:
            raise InvalidInputError("the request has no inputs")
        names = [i.name for i in request.inputs]
        if name:
            if name not in names:
                raise InvalidInputError(f"purifier_input {name!r} is not among the inputs {names}")
            return names.index(name)
        if len(names) == 1:
            return 0
        c, h, w = self.engine.image_shape
        for i, inp in enumerate(request.inputs):
            if inp.datatype == "BYTES" or tuple(inp.shape[1:]) in ((c, h, w), (h, w, c)):
                return i
        raise InvalidInputError(f"cannot tell which of the inputs {names} holds the images; "
                                "name it with the request parameter purifier_input")


def options_from(given: dict) -> dict:
    """Projection options from V2 request parameters (purifier_steps/_restarts/_seed)."""
    options = {}
    for key, field in OPTION_PARAMS.items():
        value = given.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"parameter {key} must be an integer, got {value!r}")
        options[field] = value
    return options


def annotate(parameters, purified: Purified) -> None:
    """Purification results as V2 response parameters (InferParameter holds scalars only,
    so per-image lists travel as comma-separated strings)."""
    v2.set_param(parameters, "purifier_reconstruction_error", ",".join(f"{e:.6g}" for e in purified.errors))
    v2.set_param(parameters, "purifier_adversarial", ",".join("1" if f else "0" for f in purified.flags))
    v2.set_param(parameters, "purifier_flagged", int(purified.flags.sum()))
    v2.set_param(parameters, "purifier_threshold_calibrated", purified.threshold is not None)
    if purified.threshold is not None:
        v2.set_param(parameters, "purifier_threshold", float(purified.threshold))
    v2.set_param(parameters, "purifier_steps", purified.cfg.steps)
    v2.set_param(parameters, "purifier_restarts", purified.cfg.restarts)
