"""A black box's answers over the wire: labels from a model served over the Open Inference
Protocol (V2 gRPC), e.g. a running purifier in front of its classifier, the way a real
black-box attacker sees the defence (``purifier eval --attacks blackbox --blackbox-oracle``).

The attacker knows the address, the model name and nothing else. The input's name, datatype
and layout come from ``ModelMetadata`` as purifier reads its own downstream's
(:func:`v2.input_spec`); requests are built and answers decoded by the same V2 helpers;
images per request: ``batch_size`` (64, `purifier serve`'s default limit), lowered to
``ModelConfig``'s ``max_batch_size`` where the server answers ModelConfig (purifier does when
its downstream does; the reference classifier, like MLServer, does not). The answer is the
``label`` output when the model has one (the shipped classifier and a purifier in front of
it do), else the arg-max of the first output (logits or probabilities, [B, classes]).
"""

from __future__ import annotations

import grpc
import numpy as np
import torch

from ..errors import ConfigError, InvalidInputError
from ..proto.inference import grpc_service_pb2 as pb
from ..proto.inference import grpc_service_pb2_grpc as pb_grpc
from . import v2


class RemoteLabels:
    """``labels = RemoteLabels("host:port", "classifier")(x)``: x (N, C, H, W) float in [0, 1]
    -> (N,) int64, asked ``batch_size`` images per request. ``queries`` counts the images asked."""

    def __init__(self, address: str, model: str = "classifier", *, timeout_s: float = 300.0,
                 batch_size: int = 64, max_message_bytes: int = 64 * 1024 * 1024):
        if batch_size < 1:
            raise ConfigError(f"oracle batch size must be >= 1, got {batch_size}")
        self.address, self.model, self.timeout_s, self.batch_size = address, model, timeout_s, batch_size
        self.queries = 0
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._meta = self._call("ModelMetadata", pb.ModelMetadataRequest(name=model))
        if not self._meta.inputs or not self._meta.outputs:
            raise ConfigError(f"oracle {address} model {model!r}: its metadata names no inputs or no outputs")
        names = [o.name for o in self._meta.outputs]
        self.output_name = "label" if "label" in names else names[0]
        try:  # ask no more images per request than the server takes (its config's max_batch_size)
            limit = self._stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=timeout_s).config.max_batch_size
        except grpc.RpcError:  # a server without ModelConfig: batch_size as given
            limit = 0
        if limit > 0:
            self.batch_size = min(self.batch_size, limit)

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as e:  # the attacker's tool: say what the server answered, and where
            raise ConfigError(f"oracle {self.address} model {self.model!r}: {method} answered "
                              f"{e.code().name}: {e.details()}") from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32)
        if x.dim() != 4:
            raise ConfigError(f"oracle: images must be (N, C, H, W), got shape {tuple(x.shape)}")
        spec = v2.input_spec(self._meta, tuple(x.shape[1:]))
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = v2.images_out(x[i:i + self.batch_size].clamp(0, 1).numpy(), spec.layout, spec.datatype)
            request = v2.infer_request(self.model, spec.name, batch, spec.datatype)
            request.outputs.add(name=self.output_name)
            out.append(self._labels(self._call("ModelInfer", request), len(batch)))
            self.queries += len(batch)
        return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, dtype=torch.int64)

    def _labels(self, response, n: int) -> np.ndarray:
        try:
            arrays = {name: data for name, _, data in v2.output_arrays(response)}
        except InvalidInputError as e:
            raise ConfigError(f"oracle {self.address}: {e}") from None
        values = arrays.get(self.output_name)
        if not isinstance(values, np.ndarray) or values.size % n:
            raise ConfigError(f"oracle {self.address}: no numeric output {self.output_name!r} with a value per "
                              f"image for {n} images")
        values = values.reshape(n, -1)
        labels = values[:, 0] if values.shape[1] == 1 else values.argmax(1)
        return labels.astype(np.int64)

    def close(self) -> None:
        self._channel.close()
