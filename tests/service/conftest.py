"""Fixtures for service tests: real servers in-process on port 0, driven from a background
event loop, so tests use ordinary blocking gRPC clients (and threads for concurrency)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
import torch

from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.proto.purifier.v1 import purifier_pb2_grpc as pb_grpc
from purifier.server import Server
from purifier.server.classifier import ClassifierServer
from purifier.settings import ClassifierSettings, ServeSettings


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` waits for the result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-loop")
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def aloop():
    lt = LoopThread()
    yield lt
    lt.close()


def settings_for(model_dir, **overrides) -> ServeSettings:
    """Fast settings for the tiny model: free ports, short projection, no downstream."""
    base = dict(model_dir=str(model_dir), host="127.0.0.1", grpc_port=0, metrics_port=0, downstream="none",
                projection="fast", max_batch_size=16, max_queue_delay_ms=5, max_queue_size=64,
                max_steps=200, max_restarts=8, grace_seconds=5, downstream_retries=2)
    base.update(overrides)
    return ServeSettings(**base)


@contextmanager
def running(aloop: LoopThread, settings: ServeSettings):
    server = Server(settings)
    try:
        aloop.run(server.start())
        yield server
    finally:
        aloop.run(server.stop(grace=0))


@contextmanager
def running_classifier(aloop: LoopThread, model_dir, port: int = 0, name: str = "classifier"):
    server = ClassifierServer(ClassifierSettings(model_dir=str(model_dir), host="127.0.0.1", port=port,
                                                 model_name=name, device="cpu"))
    try:
        aloop.run(server.start())
        yield server
    finally:
        aloop.run(server.stop(grace=0))


class Clients:
    def __init__(self, port: int, max_message_bytes: int = 64 * 1024 * 1024):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.purifier = pb_grpc.PurifierStub(self.channel)
        self.v2 = v2_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self):
        self.channel.close()


def make_model_dir(parent, threshold: float | None = 0.05):
    """Like tests/conftest.py's tiny_model_dir, for module-scoped servers (and without a threshold)."""
    from purifier import checkpoint
    from purifier.models import Encoder
    from tests.conftest import TINY_LATENT, TINY_SHAPE, tiny_classifier, tiny_generator

    d = parent / "tiny-model"
    checkpoint.save_module(tiny_generator(), d / "generator.safetensors", "generator")
    checkpoint.save_module(tiny_classifier(), d / "classifier.safetensors", "classifier")
    torch.manual_seed(1)
    checkpoint.save_module(Encoder(TINY_LATENT, *TINY_SHAPE, dim=4), d / "encoder.safetensors", "encoder")
    card = {"dataset": "tiny"}
    if threshold is not None:
        card["detection"] = {"threshold": threshold}
    checkpoint.write_card(d, card)
    return d


@pytest.fixture
def server(aloop, tiny_model_dir):
    with running(aloop, settings_for(tiny_model_dir)) as s:
        yield s


@pytest.fixture
def clients(server):
    c = Clients(server.port)
    yield c
    c.close()


def hold_batches(server, seen: list | None = None) -> threading.Event:
    """Hold every projection batch of ``server`` at the returned gate until it is set (then
    they run as before); ``seen`` collects each batch's steps as it reaches the gate."""
    real = server.plane.batcher.compute
    gate = threading.Event()

    def gated(x, cfg, **kw):
        if seen is not None:
            seen.append(cfg.steps)
        gate.wait(30)
        return real(x, cfg, **kw)

    server.plane.batcher.compute = gated
    return gate


def images(n: int, seed: int = 0, shape=(1, 8, 8)) -> np.ndarray:
    """Images the tiny generator can reach: G(z) for random z, float32 (n, C, H, W)."""
    from tests.conftest import tiny_generator

    g = tiny_generator()
    torch.manual_seed(seed)
    with torch.no_grad():
        return g(torch.randn(n, g.latent_dim) * 0.35).numpy().astype(np.float32)


def tensor(arr: np.ndarray) -> pb.Tensor:
    dtype = pb.UINT8 if arr.dtype == np.uint8 else pb.FLOAT32
    return pb.Tensor(dtype=dtype, shape=list(arr.shape), data=np.ascontiguousarray(arr).tobytes())


def to_array(t: pb.Tensor) -> np.ndarray:
    dt = {pb.FLOAT32: "<f4", pb.UINT8: "u1", pb.INT64: "<i8"}[t.dtype]
    return np.frombuffer(t.data, dtype=dt).reshape(tuple(t.shape)).copy()


def v2_request(arr: np.ndarray, model: str = "purifier", name: str = "images", **params) -> v2_pb.ModelInferRequest:
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}[arr.dtype]
    req = v2_pb.ModelInferRequest(model_name=model, id="req-1")
    req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
    req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    for k, v in params.items():
        req.parameters[k].int64_param = v
    return req


def v2_outputs(resp: v2_pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dts = {"FP32": "<f4", "UINT8": "u1", "BOOL": "?", "INT64": "<i8"}
    return {o.name: np.frombuffer(raw, dtype=dts[o.datatype]).reshape(tuple(o.shape))
            for o, raw in zip(resp.outputs, resp.raw_output_contents)}


SERVE_ENV_PROBE = """
import json, os, sys, types
seen = {}
fake = types.ModuleType("purifier.server")
def serve(settings):
    seen.update({name: os.environ.get(name) for name in sys.argv[2:]})
    seen["torch_loaded"] = "torch" in sys.modules
    return 0
fake.serve = serve
sys.modules["purifier.server"] = fake
from purifier import cli
assert cli.main(["serve", "--model-dir", sys.argv[1], "--downstream", "none"]) == 0
print(json.dumps(seen))
"""


def environment_serve_runs_with(tmp_path, env: dict, names) -> dict:
    """The values of environment variables ``names`` when ``purifier serve`` (in a fresh
    process with ``env``) hands over to the server, and whether torch was imported by then:
    what the process-wide settings serve makes before torch loads end up as."""
    import json
    import subprocess
    import sys

    d = make_model_dir(tmp_path)
    out = subprocess.run([sys.executable, "-c", SERVE_ENV_PROBE, str(d), *names], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
