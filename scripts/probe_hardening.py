"""Issue 11's hostile-client probes against a real `purifier serve` subprocess, timed.

    .venv/bin/python scripts/probe_hardening.py [--model-dir models/fashion-mnist]

1. 12 PNGs of 12000x12000 pixels in one V2 request: time to the refusal, the slowest health
   check answered meanwhile (polled every 20 ms from another thread), server RSS before/after.
2. A request at the step/restart caps (64 images x 1000 steps x 20 restarts; the server is
   started with --max-compute high enough to let it in) with a 2 s deadline, then a 1-image
   request: its latency. The same with a client cancel after 1 s.
3. SIGTERM (--grace-seconds 5) one second into such a request: time to process exit; and
   the same with no request running (the process's own exit cost).

``--only abandon --repeat 5`` runs probe 2 alone, five times (the machine's load average is
recorded before and after each probe: on a shared CPU it decides every latency here).

Prints one JSON object. Needs nothing but the venv and a model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from purifier.proto.inference import grpc_service_pb2 as v2_pb  # noqa: E402
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc  # noqa: E402
from purifier.proto.purifier.v1 import purifier_pb2 as pb  # noqa: E402
from purifier.proto.purifier.v1 import purifier_pb2_grpc as pb_grpc  # noqa: E402

CAPS = dict(max_steps=1000, max_restarts=20, max_batch_size=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_png(side: int) -> bytes:
    """A real, decodable side x side 8-bit grey PNG of zeros (~140 KB for 12000)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(bytes(side + 1) * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class ServerProcess:
    def __init__(self, model_dir: str, **flags):
        self.port = free_port()
        args = [sys.executable, "-m", "purifier.cli", "serve", "--model-dir", model_dir, "--host", "127.0.0.1",
                "--grpc-port", str(self.port), "--metrics-port", "-1", "--downstream", "none",
                "--log-level", "warning"]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.v2 = v2_grpc.GRPCInferenceServiceStub(self.channel)
        self.v1 = pb_grpc.PurifierStub(self.channel)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if self.health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def close(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def one_image_latency(server: ServerProcess) -> float:
    x = np.full((1, 1, 28, 28), 0.5, np.float32)
    start = time.perf_counter()
    server.v1.Purify(pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1, 28, 28], data=x.tobytes())),
                     timeout=60)
    return time.perf_counter() - start


def at_caps() -> pb.PurifyRequest:
    x = np.full((64, 1, 28, 28), 0.5, np.float32)
    return pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[64, 1, 28, 28], data=x.tobytes()),
                            options=pb.ProjectionOptions(steps=1000, restarts=20))


def probe_big_pngs(server: ServerProcess) -> dict:
    png = big_png(12000)
    request = v2_pb.ModelInferRequest(model_name="purifier")
    request.inputs.add(name="images", datatype="BYTES", shape=[12]).contents.bytes_contents.extend([png] * 12)
    worst, stop = [0.0], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.perf_counter()
            server.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            worst[0] = max(worst[0], time.perf_counter() - t)
            time.sleep(0.02)

    before = rss_mb(server.proc.pid)
    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.1)
    start = time.perf_counter()
    try:
        server.v2.ModelInfer(request, timeout=60)
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details()
    refused_s = time.perf_counter() - start
    time.sleep(0.1)
    stop.set()
    poller.join()
    return dict(request_bytes=request.ByteSize(), code=code, details=details, refused_s=round(refused_s, 3),
                worst_health_s=round(worst[0], 3), rss_before_mb=round(before, 1),
                rss_after_mb=round(rss_mb(server.proc.pid), 1))


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def probe_abandon(server: ServerProcess, repeat: int = 1) -> dict:
    out = {"load_before": load(),
           "first_1_image_s": round(one_image_latency(server), 3),      # a first request's own cost
           "baseline_1_image_s": [], "deadline_code": [], "deadline_returned_s": [],
           "after_deadline_1_image_s": [], "after_cancel_1_image_s": []}
    for _ in range(repeat):
        out["baseline_1_image_s"].append(round(one_image_latency(server), 3))
        start = time.perf_counter()
        try:
            server.v1.Purify(at_caps(), timeout=2)
            out["deadline_code"].append("OK")
        except grpc.RpcError as e:
            out["deadline_code"].append(e.code().name)
        out["deadline_returned_s"].append(round(time.perf_counter() - start, 3))
        out["after_deadline_1_image_s"].append(round(one_image_latency(server), 3))
        call = server.v1.Purify.future(at_caps(), timeout=120)
        time.sleep(1)
        call.cancel()
        out["after_cancel_1_image_s"].append(round(one_image_latency(server), 3))
    out["load_after"] = load()
    return out


def probe_sigterm(model_dir: str, busy: bool = True) -> dict:
    server = ServerProcess(model_dir, grace_seconds=5, max_compute=64 * 1000 * 20, **CAPS)
    try:
        call = server.v1.Purify.future(at_caps() if busy else pb.PurifyRequest(), timeout=120)
        time.sleep(1)
        start = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        exit_s = time.perf_counter() - start
        try:
            call.result()
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        return dict(grace_seconds=5, exit_s=round(exit_s, 3), returncode=server.proc.returncode, caller_code=code)
    finally:
        server.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--only", choices=["big_pngs", "abandon", "sigterm"], help="run one probe")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the abandon probe")
    args = p.parse_args()
    result = {"cpu_count": os.cpu_count(), "load_start": load()}
    if args.only in (None, "big_pngs", "abandon"):
        server = ServerProcess(args.model_dir, max_compute=64 * 1000 * 20, **CAPS)
        try:
            if args.only in (None, "big_pngs"):
                result["big_pngs"] = probe_big_pngs(server)
            if args.only in (None, "abandon"):
                result["abandon"] = probe_abandon(server, args.repeat)
        finally:
            server.close()
    if args.only in (None, "sigterm"):
        result["sigterm_idle"] = probe_sigterm(args.model_dir, busy=False)  # exit cost alone, for comparison
        result["sigterm"] = probe_sigterm(args.model_dir)
    result["load_end"] = load()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
