"""A bounded soak: mixed valid and hostile traffic at about twice the server's capacity, for
a set time, against a local `purifier serve` (started here, or at --address).

    .venv/bin/python scripts/soak.py --duration 600 --out docs/bench/soak.json
    .venv/bin/python scripts/soak.py --address 127.0.0.1:8081 --metrics-url http://127.0.0.1:8082/metrics

1. Capacity: a closed loop of the valid requests below (--calibrate-concurrency callers,
   --calibrate-seconds) measures the answers per second the server gives.
2. Soak: an open loop sends valid requests at --overload x that rate (2 by default), and
   hostile ones on top (--invalid-share of all requests), whatever the answers do; every
   request has a --deadline. At most --max-in-flight requests are outstanding; a send past
   that is counted as ``client_skipped`` rather than queued in the client.
3. Report (one JSON object, printed and written to --out): requests and answers per kind
   and status code, latency p50/p99 per kind and code, the server's RSS every --rss-every
   seconds with the 1-minute load average beside it (from /proc for a server started here,
   else process_resident_memory_bytes from --metrics-url), what the server itself counted in
   purifier_requests_total and purifier_rejected_total during the soak, and the load
   average before and after (on a shared CPU it decides every latency here).

Valid requests: purifier.v1 Purify of 1 FP32 image (server defaults, a seed, or steps=20
restarts=2); V2 ModelInfer of 4 UINT8 images; V2 of 2 PNG files. With --warmup-sweep, one
request of each batch size 1..64 (the shapes the CPU's oneDNN primitive cache must hold) goes
first, so the RSS samples show the plateau rather than the warm-up. Hostile (each must answer its code, never INTERNAL): NaN pixels, a wrong image
size, a request id with a newline, a PNG whose header claims 12000x12000, steps over the
cap, a message over --max-message-bytes (only against a server started here, whose limit
is known), a call cancelled after 20 ms, a 10 ms deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from purifier.proto.inference import grpc_service_pb2 as v2_pb  # noqa: E402
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc  # noqa: E402
from purifier.proto.purifier.v1 import purifier_pb2 as pb  # noqa: E402
from purifier.proto.purifier.v1 import purifier_pb2_grpc as pb_grpc  # noqa: E402

SHAPE = (1, 28, 28)
MAX_MESSAGE = 1 << 20     # the limit of a server started here


# --- requests ------------------------------------------------------------------------------

def _png(side: int, pixels: bytes | None = None) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = pixels or bytes(side * side)
    raw = zlib.compress(b"".join(b"\x00" + rows[i * side:(i + 1) * side] for i in range(side)), 6)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _huge_png_header() -> bytes:   # a 12000x12000 claim in 57 bytes; the body need not decode
    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + bytes(20))


def _v1(x: np.ndarray, **kw) -> pb.PurifyRequest:
    return pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(x.shape), data=x.tobytes()), **kw)


def _v2(datatype: str, shape, raw: bytes = b"", blobs=None) -> v2_pb.ModelInferRequest:
    r = v2_pb.ModelInferRequest(model_name="purifier")
    inp = r.inputs.add(name="images", datatype=datatype, shape=list(shape))
    if blobs is not None:
        inp.contents.bytes_contents.extend(blobs)
    else:
        r.raw_input_contents.append(raw)
    return r


class Traffic:
    """Builds one request of a kind: (rpc name, message, deadline override, cancel after s)."""

    # seeded and non-default options too: a queue that mixes options is where the batcher's
    # worker once died (scripts/serve_check.py found it; this soak sent only default options)
    VALID = {"v1_1_image": 4, "v2_4_uint8": 2, "v2_2_png": 1, "v1_seeded": 1, "v1_options": 1}
    HOSTILE = ["nan", "wrong_size", "bad_request_id", "huge_png_header", "steps_over_cap",
               "over_message_limit", "cancelled", "short_deadline"]

    def __init__(self, rng: random.Random, message_limit: int | None):
        self.rng = rng
        self.np = np.random.default_rng(rng.randrange(2 ** 32))
        self.hostile = [k for k in self.HOSTILE if k != "over_message_limit" or message_limit]
        self.message_limit = message_limit
        self.pngs = [_png(28, bytes(self.np.integers(0, 256, 784, dtype=np.uint8))) for _ in range(8)]

    def image(self, n: int) -> np.ndarray:
        return self.np.random((n, *SHAPE), dtype=np.float32)

    def valid_kind(self) -> str:
        return self.rng.choices(list(self.VALID), weights=list(self.VALID.values()))[0]

    def make(self, kind: str):
        if kind == "v1_1_image":
            return "Purify", _v1(self.image(1)), None, None
        if kind == "v1_seeded":
            return "Purify", _v1(self.image(1), options=pb.ProjectionOptions(seed=self.rng.randrange(2 ** 32))), None, None
        if kind == "v1_options":
            return "Purify", _v1(self.image(1), options=pb.ProjectionOptions(steps=20, restarts=2)), None, None
        if kind == "v2_4_uint8":
            x = (self.image(4) * 255).astype(np.uint8)
            return "ModelInfer", _v2("UINT8", x.shape, x.tobytes()), None, None
        if kind == "v2_2_png":
            return "ModelInfer", _v2("BYTES", [2], blobs=self.rng.sample(self.pngs, 2)), None, None
        if kind == "nan":
            x = self.image(1)
            x[0, 0, 3, 3] = np.nan
            return "Purify", _v1(x), None, None
        if kind == "wrong_size":
            x = self.np.random((1, 1, 27, 28), dtype=np.float32)
            return "ModelInfer", _v2("FP32", x.shape, x.tobytes()), None, None
        if kind == "bad_request_id":
            return "Purify", _v1(self.image(1), request_id="line\nbreak"), None, None
        if kind == "huge_png_header":
            return "ModelInfer", _v2("BYTES", [1], blobs=[_huge_png_header()]), None, None
        if kind == "steps_over_cap":
            return "Purify", _v1(self.image(1), options=pb.ProjectionOptions(steps=100_000)), None, None
        if kind == "over_message_limit":
            n = self.message_limit // (784 * 4) + 1
            return "Purify", _v1(np.zeros((n, *SHAPE), np.float32)), None, None
        if kind == "cancelled":
            return "Purify", _v1(self.image(1)), None, 0.02
        if kind == "short_deadline":
            return "Purify", _v1(self.image(1)), 0.01, None
        raise ValueError(kind)


# --- the server ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def counters(url: str | None) -> dict[str, dict[str, float]]:
    """The server's purifier_requests_total and purifier_rejected_total, by their labels."""
    if not url:
        return {}
    samples = scrape(url)
    return {name: {k.split("{", 1)[1].rstrip("}"): v for k, v in samples.items() if k.startswith(name + "{")}
            for name in ("purifier_requests_total", "purifier_rejected_total")}


def delta(after: dict, before: dict) -> dict:
    return {name: {k: v - before.get(name, {}).get(k, 0.0) for k, v in series.items()
                   if v != before.get(name, {}).get(k, 0.0)} for name, series in after.items()}


def scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, by its full name with labels."""
    out = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def start_server(model_dir: str, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    port, metrics = free_port(), free_port()
    args = [sys.executable, "-m", "purifier.cli", "serve", "--model-dir", model_dir, "--host", "127.0.0.1",
            "--grpc-port", str(port), "--metrics-port", str(metrics), "--downstream", "none",
            "--max-message-bytes", str(MAX_MESSAGE), "--log-level", "warning", *extra]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics"


def stop_server(proc: subprocess.Popen | None) -> None:
    """SIGTERM a server started here; SIGKILL it after 30 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(channel, seconds: float = 180) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub, end = health_pb2_grpc.HealthStub(channel), time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if (await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status == 1:
                return
        except grpc.RpcError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("server did not become ready")


# --- load ----------------------------------------------------------------------------------

def latency_stats(values) -> dict:
    a = np.asarray(values)
    return {"n": len(a), "p50_s": round(float(np.percentile(a, 50)), 4), "p99_s": round(float(np.percentile(a, 99)), 4)}


class Recorder:
    def __init__(self):
        self.latency: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.skipped = 0

    def add(self, kind: str, code: str, seconds: float) -> None:
        self.latency[(kind, code)].append(seconds)

    def report(self) -> dict:
        stats = latency_stats
        by_kind: dict[str, dict] = defaultdict(dict)
        codes: dict[str, int] = defaultdict(int)
        for (kind, code), values in sorted(self.latency.items()):
            by_kind[kind][code] = stats(values)
            codes[code] += len(values)
        valid = [v for (k, c), vs in self.latency.items() if k in Traffic.VALID and c == "OK" for v in vs]
        return {"codes": dict(codes), "client_skipped": self.skipped,
                "valid_ok_latency": stats(valid) if valid else None, "by_kind": by_kind}


async def one(stubs, traffic: Traffic, kind: str, deadline: float, rec: Recorder) -> None:
    rpc, message, short, cancel_after = traffic.make(kind)
    call = getattr(stubs[rpc], rpc)(message, timeout=short or deadline)
    start = time.perf_counter()
    try:
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            call.cancel()
        await call
        code = "OK"
    except asyncio.CancelledError:
        code = "CANCELLED"          # our own cancel
    except grpc.RpcError as e:
        code = e.code().name
    rec.add(kind, code, time.perf_counter() - start)


async def calibrate(stubs, traffic: Traffic, seconds: float, concurrency: int, deadline: float) -> float:
    """Valid requests answered OK per second by a closed loop of ``concurrency`` callers."""
    rec, end = Recorder(), time.monotonic() + seconds

    async def caller():
        while time.monotonic() < end:
            await one(stubs, traffic, traffic.valid_kind(), deadline, rec)

    start = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    ok = sum(len(v) for (k, c), v in rec.latency.items() if c == "OK")
    return ok / (time.monotonic() - start)


async def soak(stubs, traffic: Traffic, rate: float, invalid_share: float, seconds: float, deadline: float,
               max_in_flight: int, sample_rss, rss_every: float) -> tuple[Recorder, list]:
    rec, tasks, rss = Recorder(), set(), []
    total_rate = rate / (1 - invalid_share)
    start = time.monotonic()
    next_send, next_rss = start, start
    while (now := time.monotonic()) < start + seconds:
        if now >= next_rss:
            rss.append([round(now - start, 1), sample_rss(), round(os.getloadavg()[0], 2)])
            next_rss += rss_every
        if now < next_send:
            await asyncio.sleep(min(next_send, next_rss) - now)
            continue
        next_send += traffic.rng.expovariate(total_rate)      # Poisson arrivals
        if len(tasks) >= max_in_flight:
            rec.skipped += 1
            continue
        kind = (traffic.rng.choice(traffic.hostile) if traffic.rng.random() < invalid_share
                else traffic.valid_kind())
        task = asyncio.ensure_future(one(stubs, traffic, kind, deadline, rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=deadline + 5)
    rss.append([round(time.monotonic() - start, 1), sample_rss(), round(os.getloadavg()[0], 2)])
    return rec, rss


async def main_async(args) -> dict:
    proc = None
    address, metrics_url = args.address, args.metrics_url
    if address is None:
        proc, address, metrics_url = start_server(args.model_dir, args.serve_arg or [])
    limit = MAX_MESSAGE if proc is not None else None

    def sample_rss():
        if proc is not None:
            return rss_mb(proc.pid)
        if metrics_url:
            return round(scrape(metrics_url).get("process_resident_memory_bytes", float("nan")) / 2 ** 20, 1)
        return None

    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    try:
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            await wait_ready(channel)
            stubs = {"Purify": pb_grpc.PurifierStub(channel), "ModelInfer": v2_grpc.GRPCInferenceServiceStub(channel)}
            traffic = Traffic(random.Random(args.seed), limit)
            result = {"address": address, "started_here": proc is not None, "cpu_count": os.cpu_count(),
                      "load_before": [round(v, 2) for v in os.getloadavg()],
                      "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
            if args.warmup_sweep:
                t = time.monotonic()
                stub = stubs["Purify"]
                for n in range(1, 65):
                    await stub.Purify(_v1(traffic.image(n)), timeout=600)
                result["warmup_sweep"] = {"seconds": round(time.monotonic() - t, 1), "rss_mb_after": sample_rss()}
            capacity = await calibrate(stubs, traffic, args.calibrate_seconds, args.calibrate_concurrency,
                                       args.deadline)
            rate = max(capacity * args.overload, 0.5)
            result.update(capacity_ok_per_s=round(capacity, 2), valid_rate_per_s=round(rate, 2),
                          total_rate_per_s=round(rate / (1 - args.invalid_share), 2))
            rss_start, counted_before = sample_rss(), counters(metrics_url)
            rec, rss = await soak(stubs, traffic, rate, args.invalid_share, args.duration, args.deadline,
                                  args.max_in_flight, sample_rss, args.rss_every)
            result.update(rec.report())
            result["rss_mb"] = {"after_calibration": rss_start, "samples": rss}
            if metrics_url:   # what the server counted during the soak (calibration left out)
                result["server_counted"] = delta(counters(metrics_url), counted_before)
            result["load_after"] = [round(v, 2) for v in os.getloadavg()]
            result["server_alive"] = proc is None or proc.poll() is None
            return result
    finally:
        stop_server(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", help="a running server's gRPC HOST:PORT (default: start one here)")
    p.add_argument("--metrics-url", help="its /metrics URL, for RSS and its own counts")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "fashion-mnist"))
    p.add_argument("--serve-arg", action="append", help="extra flag for a server started here (repeatable)")
    p.add_argument("--duration", type=float, default=600, help="soak seconds (default 600)")
    p.add_argument("--overload", type=float, default=2.0, help="valid requests per second, as a multiple of capacity")
    p.add_argument("--invalid-share", type=float, default=0.25, help="share of hostile requests in the stream")
    p.add_argument("--calibrate-seconds", type=float, default=30)
    p.add_argument("--calibrate-concurrency", type=int, default=16)
    p.add_argument("--deadline", type=float, default=10.0, help="each request's deadline, seconds")
    p.add_argument("--max-in-flight", type=int, default=512)
    p.add_argument("--rss-every", type=float, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-sweep", action="store_true", help="first one request of each batch size 1..64")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if not 0 <= args.invalid_share < 1:
        p.error("--invalid-share must be in [0, 1)")
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["server_alive"] and not result["codes"].get("INTERNAL") else 1


if __name__ == "__main__":
    raise SystemExit(main())
