"""Generated stubs are fresh, and our V2 messages are wire-compatible with Triton's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ["ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
          "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
          "ModelMetadataRequest", "ModelMetadataResponse", "InferParameter", "InferTensorContents",
          "ModelInferRequest", "ModelInferResponse"]


def test_committed_stubs_match_a_fresh_generation():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the stubs")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def fields(descriptor) -> dict:
    """name -> (number, type, label, message type) for a message and its nested messages."""
    out = {}
    for f in descriptor.fields:
        out[f.name] = (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label,
                       f.message_type.full_name if f.message_type else None)
    for nested in descriptor.nested_types:
        out[nested.name] = fields(nested)
    return out


def test_v2_messages_match_tritonclient_field_for_field():
    triton = pytest.importorskip("tritonclient.grpc.service_pb2", reason="tritonclient[grpc] is in the test extra")
    from purifier.proto.inference import grpc_service_pb2 as ours

    for name in SHARED:
        assert fields(getattr(ours, name).DESCRIPTOR) == fields(getattr(triton, name).DESCRIPTOR), name
    ours_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_service.methods:
        assert theirs.methods_by_name[method.name].input_type.full_name == method.input_type.full_name


def test_infer_parameter_has_double_and_uint64():
    from purifier.proto.inference import grpc_service_pb2 as ours

    numbers = {f.name: f.number for f in ours.InferParameter.DESCRIPTOR.fields}
    assert numbers == {"bool_param": 1, "int64_param": 2, "string_param": 3, "double_param": 4, "uint64_param": 5}
