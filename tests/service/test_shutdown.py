"""Graceful stop: NOT_SERVING, accepted requests finish, new ones are refused; SIGTERM
through the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from purifier.projection import FAST
from purifier.proto.inference import grpc_service_pb2 as v2_pb
from purifier.proto.purifier.v1 import purifier_pb2 as pb

from .conftest import Clients, hold_batches, images, running, settings_for, tensor
from .test_downstream import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_stop_drains_every_accepted_request(aloop, tiny_model_dir):
    settings = settings_for(tiny_model_dir, max_batch_size=1, max_queue_delay_ms=0)
    with running(aloop, settings) as server:
        gate = hold_batches(server)
        clients = Clients(server.port)
        results = []

        def call():
            r = clients.purifier.Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)
            results.append(len(r.purification.reconstruction_error))

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while server.plane.batcher.depth < 4:            # one batch held at the gate, four queued
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=30), aloop.loop)
        deadline = time.monotonic() + 20
        while server.state.ready:                         # NOT_SERVING first
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = None
        while refused is None:                            # then new work is refused while draining
            probe = Clients(server.port)
            try:
                probe.v2.ServerLive(v2_pb.ServerLiveRequest(), timeout=2)
            except grpc.RpcError as e:
                refused = e.code()
            finally:
                probe.close()
            assert time.monotonic() < deadline
        assert refused == grpc.StatusCode.UNAVAILABLE
        gate.set()
        for t in threads:
            t.join()
        stopping.result(40)
        assert results == [1] * 5                         # none of the accepted requests was lost
        clients.close()


@pytest.mark.slow
def test_cli_serve_sigterm_stops_gracefully(tiny_model_dir, tmp_path):
    port = free_port()
    env = dict(os.environ, PURIFIER_PROJECTION="fast", PURIFIER_GRPC_PORT=str(port), PURIFIER_METRICS_PORT="-1",
               PURIFIER_DOWNSTREAM="none", PURIFIER_THREADS="1", PYTHONPATH=str(ROOT))
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "purifier.cli", "serve", "--model-dir", str(tiny_model_dir),
                             "--host", "127.0.0.1", "--grace-seconds", "5"], env=env, stdout=log, stderr=log)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        r = pb_grpc_stub(channel).Purify(pb.PurifyRequest(tensor=tensor(images(1))), timeout=30)
        assert r.purification.steps == FAST.steps          # PURIFIER_PROJECTION=fast took effect
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        channel.close()
        lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
        messages = [entry["msg"] for entry in lines]
        assert "serving" in messages and "draining" in messages and messages[-1] == "stopped"
        assert all({"ts", "level", "request_id"} <= set(entry) for entry in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def pb_grpc_stub(channel):
    from purifier.proto.purifier.v1 import purifier_pb2_grpc

    return purifier_pb2_grpc.PurifierStub(channel)
