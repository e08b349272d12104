"""A black box's answers over the wire: labels from a model served over the Open Inference
Protocol (V2 gRPC), e.g. a running purifier in front of its classifier, the way a real
black-box attacker sees the defence (``purifier eval --attacks blackbox --blackbox-oracle``).

The attacker knows the address, the model name and nothing else. The input's name and
datatype come from ``ModelMetadata`` (the first input; FP32 in [0, 1] or UINT8 images,
NCHW); images per request: ``batch_size`` (64, `purifier serve`'s default limit), lowered to
``ModelConfig``'s ``max_batch_size`` where the server answers ModelConfig (purifier does when
its downstream does; the reference classifier, like MLServer, does not); the answer is the ``label`` output when the model has one (the shipped classifier and
a purifier in front of it do), else the arg-max of the first output (logits or
probabilities, [B, classes]).
"""

from __future__ import annotations

import grpc
import numpy as np
import torch

from ..errors import ConfigError
from ..proto.inference import grpc_service_pb2 as pb
from ..proto.inference import grpc_service_pb2_grpc as pb_grpc

DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "INT64": np.dtype("<i8"), "INT32": np.dtype("<i4"),
          "UINT8": np.dtype("u1"), "FP16": np.dtype("<f2")}


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
        meta = self._call("ModelMetadata", pb.ModelMetadataRequest(name=model))
        if not meta.inputs or not meta.outputs:
            raise ConfigError(f"oracle {address} model {model!r}: its metadata names no inputs or no outputs")
        self.input_name, self.input_datatype = meta.inputs[0].name, meta.inputs[0].datatype or "FP32"
        if self.input_datatype not in ("FP32", "UINT8"):
            raise ConfigError(f"oracle {address} model {model!r}: input {self.input_name!r} is "
                              f"{self.input_datatype}; images are sent as FP32 or UINT8")
        names = [o.name for o in meta.outputs]
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
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i:i + self.batch_size].clamp(0, 1).numpy()
            if self.input_datatype == "UINT8":
                raw = np.rint(batch * 255).astype(np.uint8).tobytes()
            else:
                raw = batch.astype("<f4").tobytes()
            request = pb.ModelInferRequest(
                model_name=self.model,
                inputs=[pb.ModelInferRequest.InferInputTensor(name=self.input_name, datatype=self.input_datatype,
                                                              shape=list(batch.shape))],
                outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=self.output_name)],
                raw_input_contents=[raw])
            response = self._call("ModelInfer", request)
            out.append(self._labels(response, len(batch)))
            self.queries += len(batch)
        return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0, dtype=torch.int64)

    def _labels(self, response, n: int) -> np.ndarray:
        index = next((i for i, o in enumerate(response.outputs) if o.name == self.output_name), None)
        if index is None or index >= len(response.raw_output_contents):
            raise ConfigError(f"oracle {self.address}: the answer has no raw output {self.output_name!r}")
        spec = response.outputs[index]
        if spec.datatype not in DTYPES:
            raise ConfigError(f"oracle {self.address}: output {spec.name!r} is {spec.datatype}, not a number type")
        values = np.frombuffer(response.raw_output_contents[index], dtype=DTYPES[spec.datatype])
        if values.size % n:
            raise ConfigError(f"oracle {self.address}: output {spec.name!r} has {values.size} values for {n} images")
        values = values.reshape(n, -1)
        labels = values[:, 0] if values.shape[1] == 1 else values.argmax(1)
        return labels.astype(np.int64)

    def close(self) -> None:
        self._channel.close()
