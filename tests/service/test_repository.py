"""Several models in one purifier (issue 14, item 3): the repository's settings, and a live
server holding a grey and an RGB tiny model and one broken directory, each requested name
purified by its own generator, the broken one reported while the others serve."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from purifier import checkpoint
from purifier.cli import build_parser
from purifier.engine import Repository, ServedModel
from purifier.errors import ConfigError, ModelLoadError, NotFoundError
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.settings import DEFAULT_ENTRY, ServeSettings, serve_settings
from tests.conftest import tiny_generator

from .conftest import Clients, make_model_dir, running, settings_for, tensor, to_array, v2_outputs, v2_request
from .test_rpcs import metric, scrape

RGB = (3, 8, 8)


def rgb_model_dir(parent, threshold=0.2):
    """A tiny RGB model (3x8x8, no encoder), apart from make_model_dir's grey one (1x8x8)."""
    d = parent / "rgb-model"
    checkpoint.save_module(tiny_generator(seed=3, shape=RGB), d / "generator.safetensors", "generator")
    checkpoint.write_card(d, {"dataset": "tiny-rgb", "detection": {"threshold": threshold}})
    return d


def parse(argv):
    return build_parser(only="serve").parse_args(["serve", *argv])


# --- settings --------------------------------------------------------------------------------

def test_one_model_dir_is_a_repository_of_one_default(tmp_path):
    s = ServeSettings(model_dir=str(tmp_path))
    assert [(m.name, m.model_dir) for m in s.models] == [(DEFAULT_ENTRY, str(tmp_path))]
    assert s.default_model == DEFAULT_ENTRY and not s.several_models


def test_config_file_relative_dirs_per_model_settings_and_default(tmp_path):
    cfg = tmp_path / "conf" / "models.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"default": "fashion", "models": {
        "fashion": {"dir": "/abs/fashion"},
        "shapes": {"dir": "shapes", "projection": "paper", "threshold": 0.02, "on_flagged": "reject",
                   "downstream_name": "shapes-net"},
        "short": "short-dir"}}))
    s = serve_settings(parse(["--model-config", str(cfg)]), environ={})
    by = {m.name: m for m in s.models}
    assert s.default_model == "fashion" and sorted(by) == ["fashion", "shapes", "short"]  # no extra default
    assert by["shapes"].model_dir == str(cfg.parent / "shapes") and by["short"].model_dir == str(cfg.parent / "short-dir")
    assert (by["shapes"].projection, by["shapes"].threshold, by["shapes"].on_flagged, by["shapes"].downstream_name) \
        == ("paper", 0.02, "reject", "shapes-net")
    assert by["fashion"].projection is None    # the server's --projection


def test_model_flags_and_environment_add_models_beside_the_default(tmp_path):
    s = serve_settings(parse(["--model", "a=/x/a", "--model", "b=/x/b", "--model-dir", "/x/d"]), environ={})
    assert [(m.name, m.model_dir) for m in s.models] == [("default", "/x/d"), ("a", "/x/a"), ("b", "/x/b")]
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"models": {"a": {"dir": "/cfg/a", "threshold": 0.5}}}))
    s = serve_settings(parse([]), environ={"PURIFIER_MODEL_CONFIG": str(cfg), "PURIFIER_MODEL": "a=/env/a, c=/env/c"})
    by = {m.name: m for m in s.models}
    assert by["a"].model_dir == "/env/a" and by["a"].threshold == 0.5     # the flag moves the dir, keeps the rest
    assert by["c"].model_dir == "/env/c" and s.default_model == "default" and by["default"].model_dir


@pytest.mark.parametrize("doc, words", [
    ({"default": "x", "models": {"a": {"dir": "a"}}}, "default 'x' is not among its models"),
    ({"models": {"a": {"dir": "a", "thresold": 1}}}, "unknown keys ['thresold']"),
    ({"models": {"purifier": {"dir": "a"}}}, "purifier's own V2 model"),
    ({"models": {"a": {"dir": "a", "projection": "slow"}}}, "projection 'slow'"),
    ({"models": {"a": {"dir": "a", "threshold": -1}}}, "threshold -1"),
    ({"models": {"a": {"dir": "a", "on_flagged": "drop"}}}, "on_flagged 'drop'"),
    ({"models": {"a": {}}}, "give its directory"),
    ({"modles": {}}, "unknown keys ['modles']"),
])
def test_bad_config_says_what_and_how(tmp_path, doc, words):
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as e:
        ServeSettings(model_config=str(cfg))
    assert words in str(e.value)


def test_bad_model_flag_missing_file_and_two_defaults(tmp_path):
    with pytest.raises(ConfigError, match="give NAME=DIR"):
        ServeSettings(model=("shapes",))
    with pytest.raises(ConfigError, match="no such file"):
        ServeSettings(model_config=str(tmp_path / "none.json"))
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"default": "a", "models": {"a": "a"}}))
    with pytest.raises(ConfigError, match="both name the default model"):
        ServeSettings(model_config=str(cfg), model_dir="/x")


def test_threshold_flag_is_the_model_dir_models_alone(tmp_path):
    s = ServeSettings(model_dir="/x/d", threshold=0.1, model=("a=/x/a",))
    assert {m.name: m.threshold for m in s.models} == {"default": 0.1, "a": None}    # a: its card's
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"default": "a", "models": {"a": "a"}}))
    with pytest.raises(ConfigError, match="give each model its \"threshold\""):
        ServeSettings(model_config=str(cfg), threshold=0.1)


def test_repository_lookup():
    a, b = ServedModel("a", "/a"), ServedModel("b", "/b")
    repo = Repository([a, b], "a")
    assert repo.for_name("b") is b and repo.for_name("anything") is a and repo.named("") is a
    with pytest.raises(NotFoundError, match=r"no model 'c'.*\['a', 'b'\]"):
        repo.named("c")


# --- a live server with three models --------------------------------------------------------

class AnyModel(v2_grpc.GRPCInferenceServiceServicer):
    """A downstream serving every model name: it records each request and answers the mean
    pixel of each image; its metadata says 3 channels for names with 'rgb' in them."""

    def __init__(self):
        self.seen: list[v2_pb.ModelInferRequest] = []

    def ServerReady(self, request, context):
        return v2_pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return v2_pb.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request, context):
        c = 3 if "rgb" in request.name else 1
        T = v2_pb.ModelMetadataResponse.TensorMetadata
        return v2_pb.ModelMetadataResponse(name=request.name, inputs=[T(name="input", datatype="FP32",
                                                                        shape=[-1, c, 8, 8])])

    def ModelInfer(self, request, context):
        self.seen.append(request)
        dtype = {"FP32": "<f4", "UINT8": "u1"}[request.inputs[0].datatype]
        x = np.frombuffer(request.raw_input_contents[0], dtype).reshape(tuple(request.inputs[0].shape))
        r = v2_pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        r.outputs.add(name="mean", datatype="FP32", shape=[x.shape[0], 1])
        r.raw_output_contents.append(x.reshape(x.shape[0], -1).mean(1, keepdims=True).astype("<f4").tobytes())
        return r


@pytest.fixture(scope="module")
def stack(aloop, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repo")
    grey, rgb = make_model_dir(tmp), rgb_model_dir(tmp)
    cfg = tmp / "models.json"
    cfg.write_text(json.dumps({"default": "grey", "models": {
        "grey": {"dir": str(grey)},
        "rgb": {"dir": str(rgb), "downstream_name": "rgb-net", "threshold": 0.3},
        "broken": {"dir": str(tmp / "no-such-model")}}}))
    servicer = AnyModel()
    downstream = grpc.server(futures.ThreadPoolExecutor(2))
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, downstream)
    port = downstream.add_insecure_port("127.0.0.1:0")
    downstream.start()
    settings = settings_for("", model_config=str(cfg), downstream=f"127.0.0.1:{port}", http_port=0)
    try:
        with running(aloop, settings) as server:
            clients = Clients(server.port)
            yield servicer, server, clients
            clients.close()
    finally:
        downstream.stop(0)


def rgb_images(n, seed=0):
    g = tiny_generator(seed=3, shape=RGB)
    torch.manual_seed(seed)
    with torch.no_grad():
        return g(torch.randn(n, g.latent_dim) * 0.35).numpy().astype(np.float32)


def grey_images(n):
    from .conftest import images
    return images(n)


def test_each_name_is_purified_by_its_own_generator_and_forwarded(stack):
    servicer, _, clients = stack
    servicer.seen.clear()
    r_rgb = clients.v2.ModelInfer(v2_request(rgb_images(2), model="rgb", name="input"), timeout=60)
    r_grey = clients.v2.ModelInfer(v2_request(grey_images(3), model="classifier", name="input"), timeout=60)
    sent = {req.model_name: tuple(req.inputs[0].shape) for req in servicer.seen}
    assert sent == {"rgb-net": (2, 3, 8, 8), "classifier": (3, 1, 8, 8)}    # rgb under its downstream name
    assert r_rgb.model_name == "rgb"                                        # the caller sees its own name
    assert r_rgb.parameters["purifier_model"].string_param == "rgb"
    assert r_grey.parameters["purifier_model"].string_param == "grey"      # a name not listed: the default
    assert r_rgb.parameters["purifier_threshold"].double_param == 0.3      # the config's, over the card's 0.2
    assert r_grey.parameters["purifier_threshold"].double_param == 0.05    # the grey card's
    assert v2_outputs(r_rgb)["mean"].shape == (2, 1) and v2_outputs(r_grey)["mean"].shape == (3, 1)
    assert len(r_rgb.parameters["purifier_reconstruction_error"].string_param.split(",")) == 2
    with pytest.raises(grpc.RpcError) as e:       # a grey image is not an image of the rgb model
        clients.v2.ModelInfer(v2_request(grey_images(1), model="rgb", name="input"), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_broken_model_is_reported_and_the_others_serve(stack):
    _, server, clients = stack
    assert clients.v2.ServerReady(v2_pb.ServerReadyRequest(), timeout=30).ready
    assert not clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="broken"), timeout=30).ready
    assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="rgb"), timeout=30).ready
    assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="purifier"), timeout=30).ready
    for call, req in [(clients.v2.ModelInfer, v2_request(grey_images(1), model="broken", name="input")),
                      (clients.v2.ModelMetadata, v2_pb.ModelMetadataRequest(name="broken")),
                      (clients.purifier.Purify, pb.PurifyRequest(tensor=tensor(grey_images(1)), model="broken"))]:
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'broken'" in e.value.details() and "does not exist" in e.value.details()
    assert clients.v2.ModelMetadata(v2_pb.ModelMetadataRequest(name="rgb"), timeout=30).inputs[0].shape[1] == 3
    assert {m.name: m.error is None for m in server.models} == {"grey": True, "rgb": True, "broken": False}


def test_rest_reports_the_broken_model_and_serves_the_others(stack):
    from .test_rest import call

    _, server, _ = stack
    assert call(server, "/v2/models/rgb/ready")[0] == 200
    assert call(server, "/v2/models/broken/ready")[0] == 400
    x = grey_images(1)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    status, _, answer = call(server, "/v2/models/broken/infer", body)
    assert status == 503 and "model 'broken'" in json.loads(answer)["error"]
    body["parameters"] = {"purifier_model": "grey"}
    status, _, answer = call(server, "/v2/models/purifier/infer", body)
    assert status == 200 and json.loads(answer)["parameters"]["purifier_model"] == "grey"


def test_purifier_v1_and_v2_purifier_name_the_model(stack):
    servicer, _, clients = stack
    r = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(rgb_images(1)), model="rgb"), timeout=60)
    assert to_array(r.purification.images).shape == (1, 3, 8, 8) and r.purification.model == "rgb"
    r = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(grey_images(1))), timeout=60)
    assert to_array(r.purification.images).shape == (1, 1, 8, 8) and r.purification.model == "grey"
    with pytest.raises(grpc.RpcError) as e:
        clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(grey_images(1)), model="nope"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in e.value.details()
    req = v2_request(rgb_images(1))
    req.parameters["purifier_model"].string_param = "rgb"
    out = v2_outputs(clients.v2.ModelInfer(req, timeout=60))
    assert out["purified"].shape == (1, 3, 8, 8)
    servicer.seen.clear()
    c = clients.purifier.Classify(pb.ClassifyRequest(tensor=tensor(rgb_images(2)), model_name="rgb"), timeout=60)
    assert c.purification.model == "rgb" and servicer.seen[0].model_name == "rgb-net"
    assert tuple(servicer.seen[0].inputs[0].shape) == (2, 3, 8, 8)
    config = clients.v2.ModelConfig(v2_pb.ModelConfigRequest(name="purifier"), timeout=30).config
    assert config.parameters["models"].string_value == "grey,rgb,broken"
    assert config.parameters["default_model"].string_value == "grey"


def test_metrics_are_labelled_by_the_model_that_purified(stack):
    _, server, clients = stack
    before = {m: metric(scrape(server), "purifier_images_total", model=m) for m in ("grey", "rgb")}
    clients.v2.ModelInfer(v2_request(rgb_images(2), model="rgb", name="input"), timeout=60)
    clients.v2.ModelInfer(v2_request(grey_images(1), model="other", name="input"), timeout=60)
    text = scrape(server)
    assert metric(text, "purifier_images_total", model="rgb") == before["rgb"] + 2
    assert metric(text, "purifier_images_total", model="grey") == before["grey"] + 1
    assert metric(text, "purifier_batch_size_count", model="rgb") >= 1
    assert metric(text, "purifier_requests_total", method="ModelInfer", code="OK", model="other") == 1
    assert [metric(text, "purifier_model_ready", model=m) for m in ("grey", "rgb", "broken")] == [1, 1, 0]
    assert 'purifier_model_ready{model="broken"} 0.0' in text          # present, so an alert can see it


def test_policy_and_warm_up_failures_are_the_models_own(aloop, tmp_path, monkeypatch):
    from purifier.engine import Engine

    grey = make_model_dir(tmp_path)
    (tmp_path / "b").mkdir()
    no_threshold = make_model_dir(tmp_path / "b", threshold=None)
    (tmp_path / "c").mkdir()
    flaky = make_model_dir(tmp_path / "c")
    real = Engine.warm_up

    def warm_up(self):
        if self.bundle.path == flaky:
            raise RuntimeError("graph capture failed")
        return real(self)

    monkeypatch.setattr(Engine, "warm_up", warm_up)
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"default": "grey", "models": {
        "grey": str(grey), "strict": {"dir": str(no_threshold), "on_flagged": "reject"}, "flaky": str(flaky)}}))
    with running(aloop, settings_for("", model_config=str(cfg))) as server:
        errors = {m.name: m.error for m in server.models}
        assert errors["grey"] is None and "needs a detection threshold" in errors["strict"]
        assert "RuntimeError: graph capture failed" in errors["flaky"]
        clients = Clients(server.port)
        assert clients.v2.ServerReady(v2_pb.ServerReadyRequest(), timeout=30).ready
        for name in ("strict", "flaky"):
            with pytest.raises(grpc.RpcError) as e:
                clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(grey_images(1)), model=name), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and f"model {name!r}" in e.value.details()
        assert clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(grey_images(1))), timeout=60).purification.model \
            == "grey"
        clients.close()


def test_no_model_loads_fails_the_start(aloop, tmp_path):
    from purifier.server import Server

    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"default": "a", "models": {"a": "missing-a", "b": "missing-b"}}))
    server = Server(settings_for("", model_config=str(cfg)))
    try:
        with pytest.raises(ModelLoadError, match=r"no model loaded: a .*missing-a.*; b .*missing-b"):
            aloop.run(server.start())
    finally:
        aloop.run(server.stop(grace=0))
