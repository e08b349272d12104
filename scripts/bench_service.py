#!/usr/bin/env python
"""Benchmark the service against the in-process engine (a benchmark, not a test).

    python scripts/bench_service.py [--model-dir models/fashion-mnist] [--steps 20 --restarts 4]

1. In-process: ``Engine.project`` on batches of ``--batch`` images (fixed L and R), images/s.
2. Service: ``purifier serve`` in a subprocess (max batch = ``--batch``); ``--clients``
   threads each send single-image Purify requests for ``--seconds``; images/s and the
   ratio to (1).
3. Overhead at L=1 (R=1): p50 latency of single-image requests through the service minus
   the p50 of the same projection in-process: decode, queue, batching, encode and gRPC.
   Measured twice: with the model of (1)-(2), and with a narrow generator (dim 4) of the same
   latent size and image shape, whose ~1 ms projection keeps compute jitter on a busy
   machine from drowning the overhead (the request and answer bytes are the same).

Without ``--model-dir`` (or when the shipped model is not there yet) a generator of the
shipped architecture (latent 128, 1x28x28) with random weights is used: the cost of a
projection does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from purifier import checkpoint  # noqa: E402
from purifier.models import Generator  # noqa: E402
from purifier.projection import PAPER  # noqa: E402
from purifier.engine import Engine, Limits  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(arg: str | None, tmp: Path) -> str:
    if arg:
        return arg
    shipped = ROOT / "models" / "fashion-mnist"
    if (shipped / "generator.safetensors").exists():
        return str(shipped)
    torch.manual_seed(0)
    checkpoint.save_module(Generator(128, 1, 28, 28), tmp / "generator.safetensors", "generator")
    checkpoint.write_card(tmp, {"dataset": "random-weights (benchmark)"})
    return str(tmp)


def narrow_model_dir(tmp: Path, like: Engine) -> str:
    torch.manual_seed(0)
    c, h, w = like.image_shape
    checkpoint.save_module(Generator(like.bundle.latent_dim, c, h, w, dim=4), tmp / "generator.safetensors",
                           "generator")
    return str(tmp)


def overhead(mdir: str, threads: int, samples: int, delay_ms: float) -> tuple[float, float]:
    """(in-process p50, service p50) seconds for one image at L=1, R=1."""
    engine = Engine.load(mdir, "cpu", "paper")
    local = in_process_latency(engine, samples)
    port = free_port()
    proc = start_server(mdir, port, 32, delay_ms, threads)  # a lone client skips the delay
    try:
        served = service_latency(port, engine.image_shape, samples)
    finally:
        proc.terminate()
        proc.wait(30)
    return local, served


def codec_cost(shape, samples: int = 2000) -> float:
    """p50 seconds to decode, validate and encode one single-image Purify round (no network)."""
    from purifier import validation
    from purifier.proto.purifier.v1 import purifier_pb2 as pb
    from purifier.server.dataplane import Purified
    from purifier.server.v1 import fill_purification, images_of, options_of

    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    wire = pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=x.shape, data=x.tobytes())).SerializeToString()
    def once():
        request = pb.PurifyRequest.FromString(wire)
        images = validation.to_float_images(images_of(request, shape), shape, 64)
        options_of(request)
        p = Purified(images.numpy(), np.zeros(1, np.float32), np.zeros(1, bool), 0.05, PAPER)
        response = pb.PurifyResponse(request_id="r")
        fill_purification(response.purification, p)
        return response.SerializeToString()

    for _ in range(100):
        once()
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process(engine: Engine, batch: int, steps: int, restarts: int, repeats: int) -> float:
    x = torch.rand(batch, *engine.image_shape)
    cfg = engine.config(steps=steps, restarts=restarts)
    engine.project(x, cfg)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        engine.project(x, cfg)
    return batch * repeats / (time.perf_counter() - start)


def in_process_latency(engine: Engine, n: int) -> float:
    x = torch.rand(1, *engine.image_shape)
    cfg = engine.config(steps=1, restarts=1)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        engine.project(x, cfg)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def start_server(mdir: str, port: int, batch: int, delay_ms: float, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "purifier.cli", "serve", "--model-dir", mdir, "--host", "127.0.0.1",
           "--grpc-port", str(port), "--metrics-port", "-1", "--downstream", "none", "--device", "cpu",
           "--threads", str(threads), "--max-batch-size", str(batch), "--max-queue-delay-ms", str(delay_ms),
           "--max-queue-size", "1024", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                channel.close()
                return proc
        except grpc.RpcError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def service_throughput(port: int, shape, clients: int, seconds: float, steps: int, restarts: int) -> float:
    import grpc
    from purifier.proto.purifier.v1 import purifier_pb2 as pb
    from purifier.proto.purifier.v1 import purifier_pb2_grpc

    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    request = pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=x.shape, data=x.tobytes()),
                               options=pb.ProjectionOptions(steps=steps, restarts=restarts))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = purifier_pb2_grpc.PurifierStub(channel)
    stub.Purify(request, timeout=120)
    done = [0] * clients
    stop = time.perf_counter() + seconds
    measure_from = time.perf_counter() + min(2.0, seconds / 4)   # skip the ramp-up
    counted = [0] * clients

    def worker(i):
        while time.perf_counter() < stop:
            stub.Purify(request, timeout=120)
            done[i] += 1
            if time.perf_counter() >= measure_from:
                counted[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - measure_from
    channel.close()
    return sum(counted) / elapsed


def service_latency(port: int, shape, n: int) -> float:
    import grpc
    from purifier.proto.purifier.v1 import purifier_pb2 as pb
    from purifier.proto.purifier.v1 import purifier_pb2_grpc

    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    request = pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=x.shape, data=x.tobytes()),
                               options=pb.ProjectionOptions(steps=1, restarts=1))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = purifier_pb2_grpc.PurifierStub(channel)
    for _ in range(10):
        stub.Purify(request, timeout=60)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        stub.Purify(request, timeout=60)
        times.append(time.perf_counter() - t)
    channel.close()
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None)
    p.add_argument("--steps", type=int, default=20, help="L for the throughput runs")
    p.add_argument("--restarts", type=int, default=4, help="R for the throughput runs")
    p.add_argument("--batch", type=int, default=32, help="in-process batch = service max batch size")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server")
    p.add_argument("--delay-ms", type=float, default=5.0, help="server --max-queue-delay-ms")
    p.add_argument("--latency-samples", type=int, default=200)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp2:
        mdir = model_dir(args.model_dir, Path(tmp))
        engine = Engine.load(mdir, "cpu", "paper", Limits(max_batch_size=max(64, args.batch)))
        shape = engine.image_shape
        local = in_process(engine, args.batch, args.steps, args.restarts, args.repeats)
        port = free_port()
        proc = start_server(mdir, port, args.batch, args.delay_ms, args.threads)
        try:
            served = service_throughput(port, shape, args.clients, args.seconds, args.steps, args.restarts)
        finally:
            proc.terminate()
            proc.wait(30)
        local_l1, served_l1 = overhead(mdir, args.threads, args.latency_samples, args.delay_ms)
        narrow_l1, narrow_served_l1 = overhead(narrow_model_dir(Path(tmp2), engine), args.threads,
                                               args.latency_samples, args.delay_ms)

    ms = lambda seconds: round(1000 * seconds, 3)  # noqa: E731
    result = {
        "model_dir": mdir, "image_shape": list(shape), "L": args.steps, "R": args.restarts, "batch": args.batch,
        "clients": args.clients, "torch_threads": args.threads, "seconds": args.seconds,
        "in_process_images_per_s": round(local, 2),
        "service_images_per_s": round(served, 2),
        "service_over_in_process": round(served / local, 3),
        "L1_in_process_p50_ms": ms(local_l1),
        "L1_service_p50_ms": ms(served_l1),
        "L1_service_overhead_p50_ms": ms(served_l1 - local_l1),
        "L1_narrow_generator_in_process_p50_ms": ms(narrow_l1),
        "L1_narrow_generator_service_p50_ms": ms(narrow_served_l1),
        "L1_narrow_generator_overhead_p50_ms": ms(narrow_served_l1 - narrow_l1),
        "codec_p50_ms": ms(codec_cost(shape)),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
