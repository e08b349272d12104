"""Every RPC of a real server (in-process, port 0) with the tiny model."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from purifier.projection import FAST
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb

from .conftest import images, tensor, to_array, v2_outputs, v2_request

pytestmark = pytest.mark.integration


def mse(a, b):
    return ((a - b) ** 2).reshape(len(a), -1).mean(1)


def test_purify_returns_projection_error_and_flag(clients):
    x = images(3)
    r = clients.purifier.Purify(pb.PurifyRequest(request_id="abc", tensor=tensor(x)), timeout=30)
    p = r.purification
    out = to_array(p.images)
    assert r.request_id == "abc"
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(p.reconstruction_error, mse(out, x), rtol=1e-4, atol=1e-7)
    assert p.threshold_calibrated and p.threshold == pytest.approx(0.05)
    assert list(p.adversarial) == [e > 0.05 for e in p.reconstruction_error]
    assert (p.steps, p.restarts) == (FAST.steps, FAST.restarts)  # the preset the test server defaults to


def test_purify_flags_images_off_the_generator_range(clients):
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1] = (np.indices((8, 8)).sum(0) % 2)[None]  # a checkerboard no tiny generator draws
    r = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x)), timeout=30)
    errors = list(r.purification.reconstruction_error)
    assert errors[1] > 0.05 and r.purification.adversarial[1]


def test_purify_options_and_seed_are_honoured(clients):
    x = images(2)
    opts = pb.ProjectionOptions(steps=5, restarts=2, seed=7)
    a = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x), options=opts), timeout=30).purification
    b = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x), options=opts), timeout=30).purification
    assert (a.steps, a.restarts) == (5, 2)
    assert a.images.data == b.images.data  # same seed, same answer


def test_purify_accepts_uint8_and_png(clients):
    from purifier.server.codec import encode_pngs

    x8 = (images(2) * 255).round().astype(np.uint8)
    r = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x8)), timeout=30).purification
    assert tuple(r.images.shape) == (2, 1, 8, 8)
    pngs = encode_pngs(x8)
    r2 = clients.purifier.Purify(pb.PurifyRequest(encoded=pb.EncodedImages(images=pngs)), timeout=30).purification
    assert tuple(r2.images.shape) == (2, 1, 8, 8)
    assert max(r2.reconstruction_error) < 0.05


def test_v2_server_and_model_endpoints(clients):
    v2 = clients.v2
    assert v2.ServerLive(v2_pb.ServerLiveRequest()).live
    assert v2.ServerReady(v2_pb.ServerReadyRequest()).ready
    assert v2.ModelReady(v2_pb.ModelReadyRequest(name="purifier")).ready
    meta = v2.ServerMetadata(v2_pb.ServerMetadataRequest())
    assert meta.name == "purifier" and meta.version
    mm = v2.ModelMetadata(v2_pb.ModelMetadataRequest(name="purifier"))
    assert [i.name for i in mm.inputs] == ["images"] and list(mm.inputs[0].shape) == [-1, 1, 8, 8]
    assert [o.name for o in mm.outputs] == ["purified", "reconstruction_error", "adversarial"]


def test_v2_model_infer_fp32_nchw(clients):
    x = images(3)
    r = clients.v2.ModelInfer(v2_request(x, purifier_steps=20, purifier_restarts=2), timeout=30)
    out = v2_outputs(r)
    assert r.id == "req-1" and r.model_name == "purifier"
    assert out["purified"].shape == x.shape and out["purified"].dtype == np.float32
    np.testing.assert_allclose(out["reconstruction_error"], mse(out["purified"], x), rtol=1e-4, atol=1e-7)
    assert out["adversarial"].dtype == np.bool_ and not out["adversarial"].any()
    assert r.parameters["purifier_steps"].int64_param == 20
    assert r.parameters["purifier_threshold_calibrated"].bool_param


def test_v2_model_infer_uint8_nhwc_keeps_layout_and_dtype(clients):
    x = (images(2) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1).copy()   # (2, 8, 8, 1)
    r = clients.v2.ModelInfer(v2_request(x), timeout=30)
    out = v2_outputs(r)
    assert out["purified"].shape == (2, 8, 8, 1) and out["purified"].dtype == np.uint8
    assert r.outputs[0].datatype == "UINT8"


def test_v2_model_infer_typed_contents_and_requested_outputs(clients):
    x = images(1)
    req = v2_pb.ModelInferRequest(model_name="purifier")
    inp = req.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    inp.contents.fp32_contents.extend(x.reshape(-1).tolist())
    req.outputs.add(name="reconstruction_error")
    r = clients.v2.ModelInfer(req, timeout=30)
    assert [o.name for o in r.outputs] == ["reconstruction_error"]
    assert len(r.raw_output_contents) == 1  # answers travel raw, as tritonclient reads them


def test_v2_model_infer_png_bytes_and_3d_input(clients):
    from purifier.server.codec import encode_pngs, join_bytes_elements

    x8 = (images(2) * 255).round().astype(np.uint8)
    req = v2_pb.ModelInferRequest(model_name="purifier")
    req.inputs.add(name="images", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(join_bytes_elements(encode_pngs(x8)))
    out = v2_outputs(clients.v2.ModelInfer(req, timeout=30))
    assert out["purified"].shape == (2, 1, 8, 8) and out["purified"].dtype == np.float32
    out3 = v2_outputs(clients.v2.ModelInfer(v2_request(images(2)[:, 0]), timeout=30))    # (B, H, W)
    assert out3["purified"].shape == (2, 8, 8)


def test_unknown_model_without_downstream_is_not_found(clients):
    for call, req in [(clients.v2.ModelInfer, v2_request(images(1), model="resnet")),
                      (clients.v2.ModelReady, v2_pb.ModelReadyRequest(name="resnet")),
                      (clients.v2.ModelMetadata, v2_pb.ModelMetadataRequest(name="resnet"))]:
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "resnet" in e.value.details() and "--downstream" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Classify(pb.ClassifyRequest(tensor=tensor(images(1))), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(clients):
    h = health_pb2_grpc.HealthStub(clients.channel)
    for service in ("", "purifier.v1.Purifier", "inference.GRPCInferenceService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(clients.channel)
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"purifier.v1.Purifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="inference.GRPCInferenceService")])))
    assert answers[0].file_descriptor_response.file_descriptor_proto


def scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_images_and_errors(server, clients):
    clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(2))), timeout=30)
    with pytest.raises(grpc.RpcError):
        clients.purifier.Purify(pb.PurifyRequest(), timeout=30)
    text = scrape(server)
    assert metric(text, "purifier_requests_total", method="Purify", code="OK") == 1
    assert metric(text, "purifier_requests_total", method="Purify", code="INVALID_ARGUMENT") == 1
    assert metric(text, "purifier_images_total", model="default") == 2
    assert metric(text, "purifier_reconstruction_error_count", model="default") == 2
    for name in ("purifier_queue_seconds_count", "purifier_projection_seconds_count", "purifier_batch_size_count"):
        assert metric(text, name, model="default") >= 1, name
    assert "purifier_queue_depth" in text and "purifier_downstream_seconds" in text


def test_without_a_calibrated_threshold_nothing_is_flagged_and_the_answer_says_so(aloop, tmp_path):
    from .conftest import Clients, make_model_dir, running, settings_for

    with running(aloop, settings_for(make_model_dir(tmp_path, threshold=None))) as server:
        clients = Clients(server.port)
        x = np.zeros((1, 1, 8, 8), np.float32)
        x[0] = (np.indices((8, 8)).sum(0) % 2)[None]                  # far off the generator's range
        p = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(x)), timeout=30).purification
        assert p.reconstruction_error[0] > 0.05
        assert not p.threshold_calibrated and list(p.adversarial) == [False]
        r = clients.v2.ModelInfer(v2_request(x), timeout=30)
        assert not r.parameters["purifier_threshold_calibrated"].bool_param
        assert "purifier_threshold" not in r.parameters
        clients.close()
