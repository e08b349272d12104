"""Readiness that tells the truth: NOT_SERVING until warm-up ends (the port is open by then),
NOT_SERVING while the downstream has been unreachable longer than the configured time and
SERVING again when it answers; ModelReady of a pass-through model is the downstream's."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from purifier.engine import Engine
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb
from purifier.server import Server
from purifier.server.readiness import Readiness

from .conftest import Clients, images, running, running_classifier, settings_for, tensor
from .test_downstream import free_port
from .test_rest import call

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_readiness_follows_warm_up_the_downstream_and_draining():
    clock, told = Clock(), []

    async def on_change(ready):
        told.append(ready)

    async def scenario():
        r = Readiness(unready_after_s=5, on_change=on_change, clock=clock)
        assert not r.ready and not r.model_ready          # not warmed up yet
        await r.downstream(True)
        r.warm = True
        await r.changed()
        assert r.ready
        await r.downstream(False)                           # outage starts at 100
        clock.now = 104.9
        await r.downstream(False)
        assert r.ready                                      # a blip shorter than the limit changes nothing
        clock.now = 105.0
        await r.downstream(False)
        assert not r.ready and r.model_ready                # model purifier itself can still purify
        clock.now = 300.0
        await r.downstream(True)
        assert r.ready and r.down_since is None             # back at the first good probe
        await r.downstream(False)                           # a new outage counts from its own start
        assert r.ready
        r.draining = True
        await r.changed()
        assert not r.ready and not r.model_ready
        return told

    assert asyncio.run(scenario()) == [False, True, False, True, False]


def test_without_a_limit_the_downstream_does_not_matter():
    async def scenario():
        clock = Clock()
        r = Readiness(unready_after_s=0, clock=clock)
        r.warm = True
        await r.downstream(False)
        clock.now += 1e6
        return r.ready

    assert asyncio.run(scenario())


def wait_for_health(channel, status, limit_s: float = 30) -> None:
    """Poll health until it reports ``status`` (the limit only ends a broken test)."""
    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + limit_s
    while True:
        got = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        if got == status:
            return
        assert time.monotonic() < end, f"health stayed {health_pb2.HealthCheckResponse.ServingStatus.Name(got)}"
        time.sleep(0.05)


@pytest.mark.integration
def test_not_serving_while_the_downstream_is_down_and_back_when_it_returns(aloop, tiny_model_dir):
    port = free_port()
    settings = settings_for(tiny_model_dir, downstream=f"127.0.0.1:{port}", downstream_unready_seconds=0.3,
                            downstream_probe_seconds=0.05, http_port=0)
    with running_classifier(aloop, tiny_model_dir, port=port) as cls:
        with running(aloop, settings) as server:
            clients = Clients(server.port)
            wait_for_health(clients.channel, SERVING)
            assert clients.v2.ServerReady(v2_pb.ServerReadyRequest()).ready
            assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier")).ready

            aloop.run(cls.stop(grace=0))                                    # the downstream dies
            wait_for_health(clients.channel, NOT_SERVING)
            health = health_pb2_grpc.HealthStub(clients.channel)
            for service in ("purifier.v1.Purifier", "inference.GRPCInferenceService"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == NOT_SERVING
            assert not clients.v2.ServerReady(v2_pb.ServerReadyRequest()).ready
            assert call(server, "/v2/health/ready")[0] == 400                   # REST says the same
            assert not clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier"), timeout=30).ready
            assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="purifier")).ready
            assert clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)   # still works

            with running_classifier(aloop, tiny_model_dir, port=port):       # and comes back
                wait_for_health(clients.channel, SERVING)
                assert clients.v2.ServerReady(v2_pb.ServerReadyRequest()).ready
                assert call(server, "/v2/health/ready")[0] == 200
                assert clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="classifier"), timeout=30).ready
            clients.close()


@pytest.mark.integration
def test_port_opens_before_warm_up_and_health_says_not_serving_until_it_ends(aloop, tiny_model_dir, monkeypatch):
    gate, warming = threading.Event(), threading.Event()
    real = Engine.warm_up

    def held_warm_up(self, *args, **kwargs):
        warming.set()
        assert gate.wait(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "warm_up", held_warm_up)
    server = Server(settings_for(tiny_model_dir))
    started = asyncio.run_coroutine_threadsafe(server.start(), aloop.loop)
    try:
        assert warming.wait(60)
        clients = Clients(server.port)                       # the port is bound and answering
        health = health_pb2_grpc.HealthStub(clients.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == NOT_SERVING
        assert not clients.v2.ServerReady(v2_pb.ServerReadyRequest(), timeout=10).ready
        assert not clients.v2.ModelReady(v2_pb.ModelReadyRequest(name="purifier"), timeout=10).ready
        gate.set()
        started.result(60)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == SERVING
        assert clients.v2.ServerReady(v2_pb.ServerReadyRequest(), timeout=10).ready
        clients.close()
    finally:
        gate.set()
        started.result(60)
        aloop.run(server.stop(grace=0))
