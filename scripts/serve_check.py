#!/usr/bin/env python
"""Correctness of `purifier serve` under concurrent load (issue 11, item 7: the CUDA serving
path with its per-bucket CUDA graphs). A check, not a benchmark: it fails on a wrong answer.

    python scripts/serve_check.py --dataset fashion-mnist --serve-arg=--device --serve-arg=cuda \
        --clients 32 --seconds 60 --out docs/bench/serve-check-gpu.json

1. Starts a local `purifier serve` (--model-dir, extra flags from --serve-arg), or uses --address.
2. Reference: each of --images test images purified alone with a seed (seed 1000 + i), twice;
   the two must agree (a seeded request runs alone, so its answer cannot depend on the load).
3. Load: --clients closed-loop callers for --seconds, mixing
   - `seeded`: 1 image with its reference seed -> must equal the reference (max |diff| <= --tol);
   - `default`: 1 image, server defaults (batched with other callers' images; the CUDA-graph
     path on a GPU);
   - `batch`: 2-8 images in one request, server defaults;
   - `options`: 1 image at steps=20, restarts=2 (not the default: the eager path);
   - `v2_batch`, `v2_seeded`: the same over V2 ModelInfer (model `purifier`, FP32 NCHW raw,
     `purifier_seed`): a V2 answer with a seed must equal Purify's with that seed;
   - `rest_batch`, `rest_seeded`: the same over V2 REST (JSON), when the server has an HTTP
     port (one started here gets one; with --address, give --http-url).
   Every answer is checked: shape, finite values in [0, 1], the reported reconstruction error
   equal to the mean squared error of the returned image to its input (--err-tol, relative),
   and each returned image closer to its own input than to any other test image in the set
   (no answer handed to the wrong caller or the wrong slot of a batch).
4. Report (JSON): answers and images per kind and code, failures by check (with examples),
   latency p50/p99 per kind, images/s, the GPU's memory in use over time (nvidia-smi, when
   there), and what the server counted. Exit 1 on any failure, any INTERNAL, or a dead server.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from purifier import data  # noqa: E402
from purifier.proto.inference import grpc_service_pb2_grpc as v2_grpc  # noqa: E402
from purifier.proto.purifier.v1 import purifier_pb2 as pb  # noqa: E402
from purifier.server import v2  # noqa: E402
from purifier.proto.purifier.v1 import purifier_pb2_grpc as pb_grpc  # noqa: E402
from soak import (counters, delta, free_port, latency_stats, rss_mb, start_server, stop_server,  # noqa: E402
                  wait_ready)

KINDS = {"seeded": 3, "default": 4, "batch": 2, "options": 1, "v2_batch": 2, "v2_seeded": 1,
         "rest_batch": 1, "rest_seeded": 1}
SEEDED = ("seeded", "v2_seeded", "rest_seeded")
OWNER_MARGIN = 2.0  # unseeded answers: another input must be this many times nearer to fail "owner"


def request(x: np.ndarray, **options) -> pb.PurifyRequest:
    return pb.PurifyRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(x.shape), data=x.tobytes()),
                            options=pb.ProjectionOptions(**options))


def images_of(answer: pb.PurifyResponse) -> tuple[np.ndarray, np.ndarray]:
    t = answer.purification.images
    return (np.frombuffer(t.data, np.float32).reshape(tuple(t.shape)),
            np.asarray(answer.purification.reconstruction_error, np.float32))


def v2_request(x: np.ndarray, seed: int | None = None):
    r = v2.infer_request("purifier", "images", x, "FP32")
    if seed is not None:
        v2.set_param(r.parameters, "purifier_seed", seed)
    return r


def v2_images_of(answer) -> tuple[np.ndarray, np.ndarray]:
    arrays = {name: data for name, _, data in v2.output_arrays(answer)}
    return (np.asarray(arrays["purified"], np.float32),
            np.asarray(arrays["reconstruction_error"], np.float32))


class RestAnswer:
    """A V2 REST JSON answer, read into the same (images, errors) as the gRPC ones."""

    def __init__(self, body: dict):
        outs = {o["name"]: o for o in body["outputs"]}
        self.images = np.asarray(outs["purified"]["data"], np.float32).reshape(outs["purified"]["shape"])
        self.errors = np.asarray(outs["reconstruction_error"]["data"], np.float32)


def rest_call(url: str, x: np.ndarray, seed: int | None, timeout: float) -> RestAnswer:
    body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    if seed is not None:
        body["parameters"] = {"purifier_seed": seed}
    req = urllib.request.Request(f"{url}/v2/models/purifier/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return RestAnswer(json.loads(r.read()))


def gpu_memory_mib() -> list[int] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return [int(v) for v in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class Checker:
    def __init__(self, x: np.ndarray, ref: np.ndarray, tol: float, err_tol: float):
        self.x, self.ref, self.tol, self.err_tol = x, ref, tol, err_tol
        self.flat = x.reshape(len(x), -1)
        # The owner check (an answer is nearest its own input) can only speak for images whose
        # *correct* answer, the seeded reference, is itself nearest its own input: a purified
        # image may legitimately land nearer a similar input of the set (measured: one of 64
        # Fashion-MNIST test images under the 65-pass fast), and then nearness proves nothing.
        ref_nearest = self._distances(ref.reshape(len(ref), -1)).argmin(1)
        self.identifiable = ref_nearest == np.arange(len(x))
        self.failures: dict[str, int] = defaultdict(int)
        self.examples: list[dict] = []
        self.worst = {"seeded_max_abs_diff": 0.0, "error_max_rel_diff": 0.0}
        self.images = defaultdict(int)

    def _distances(self, flat: np.ndarray) -> np.ndarray:
        """Squared distance of each row of ``flat`` to every input of the set."""
        return (flat ** 2).sum(1)[:, None] - 2 * flat @ self.flat.T + (self.flat ** 2).sum(1)[None, :]

    def fail(self, check: str, **detail) -> None:
        self.failures[check] += 1
        if len(self.examples) < 20:
            self.examples.append({"check": check, **detail})

    def check(self, kind: str, idx: list[int], answer) -> None:
        try:
            if kind.startswith("rest"):
                out, err = answer.images, answer.errors
            else:
                out, err = v2_images_of(answer) if kind.startswith("v2") else images_of(answer)
        except (ValueError, KeyError) as e:
            return self.fail("decodable", kind=kind, detail=str(e))
        if out.shape != (len(idx),) + self.x.shape[1:] or err.shape != (len(idx),):
            return self.fail("shape", kind=kind, shape=list(out.shape), errors=len(err))
        self.images[kind] += len(idx)
        if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
            self.fail("range", kind=kind)
        flat = out.reshape(len(idx), -1)
        own = ((flat - self.flat[idx]) ** 2).mean(1)
        rel = np.abs(own - err) / np.maximum(own, 1e-6)
        self.worst["error_max_rel_diff"] = max(self.worst["error_max_rel_diff"], float(rel.max()))
        if (rel > self.err_tol).any():
            self.fail("reported_error", kind=kind, reported=err.tolist(), recomputed=own.tolist())
        # squared distance of each answer to every input of the set: its own must be nearest.
        # An unseeded answer is one draw of the random starts, not the reference, and may land a
        # little nearer a similar input (one Fashion-MNIST answer in 276 requests did, its error
        # matching its own input); a misrouted answer lies many times nearer its true input.
        d = self._distances(flat)
        nearest = d.argmin(1)
        margin = 1.0 if kind in SEEDED else OWNER_MARGIN
        for j, i in enumerate(idx):
            if self.identifiable[i] and nearest[j] != i and d[j, nearest[j]] * margin < d[j, i]:
                self.fail("owner", kind=kind, slot=j, image=i, nearest=int(nearest[j]),
                          own_over_nearest=round(float(d[j, i] / max(d[j, nearest[j]], 1e-12)), 3))
        if kind in SEEDED:
            diff = float(np.abs(out[0] - self.ref[idx[0]]).max())
            self.worst["seeded_max_abs_diff"] = max(self.worst["seeded_max_abs_diff"], diff)
            if diff > self.tol:
                self.fail("seeded_equals_reference", image=idx[0], max_abs_diff=diff)


async def run(args) -> dict:
    split = data.load(args.dataset, "test", args.data_dir)
    x = split.images[: args.images].numpy().astype(np.float32)
    proc, address, metrics_url, http_url = None, args.address, args.metrics_url, args.http_url
    if address is None:
        model_dir = args.model_dir or str(ROOT / "models" / args.dataset)
        extra = list(args.serve_arg or [])
        if all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn")):   # REST's own packages
            http = free_port()
            extra += ["--http-port", str(http)]
            http_url = f"http://127.0.0.1:{http}"
        proc, address, metrics_url = start_server(model_dir, extra)
    result: dict = {"address": address, "http_url": http_url, "started_here": proc is not None, "settings": vars(args).copy(),
                    "images_in_set": len(x)}
    if proc is not None and not (Path(model_dir) / "encoder.safetensors").exists():
        # 2026-11-28, H200: 184 of ~11,800 unseeded answers of an encoder-less Fashion-MNIST model
        # failed "owner" (2-4x nearer another input), every reported error matching its own input
        # and every seeded answer its reference: random starts only, not misrouting
        result["warning"] = ("the model has no encoder: fast purifies from random starts only, and the "
                             "unseeded 'owner' check (tuned on encoder starts) can fail without a misrouted answer")
        print("serve_check:", result["warning"], file=sys.stderr)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    try:
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            t0 = time.monotonic()
            await wait_ready(channel, args.ready_seconds)
            result["ready_s"] = round(time.monotonic() - t0, 1)
            stub, v2_stub = pb_grpc.PurifierStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
            # 2. reference, twice
            refs = []
            t0 = time.monotonic()
            for _ in range(2):
                answers = [await stub.Purify(request(x[i:i + 1], seed=1000 + i), timeout=args.deadline)
                           for i in range(len(x))]
                refs.append(np.concatenate([images_of(a)[0] for a in answers]))
            result["reference_s"] = round(time.monotonic() - t0, 1)
            result["reference_repeat_max_abs_diff"] = float(np.abs(refs[0] - refs[1]).max())
            result["reference_mean_error"] = float(((refs[0] - x) ** 2).mean())
            checker = Checker(x, refs[0], args.tol, args.err_tol)
            if result["reference_repeat_max_abs_diff"] > args.tol:
                checker.fail("seeded_repeat", max_abs_diff=result["reference_repeat_max_abs_diff"])
            # 3. load
            rng = random.Random(args.seed)
            latency: dict[tuple[str, str], list[float]] = defaultdict(list)
            memory, counted_before = [], counters(metrics_url)
            end = time.monotonic() + args.seconds
            kinds = [k for k in KINDS if http_url or not k.startswith("rest")]
            weights = [KINDS[k] for k in kinds]

            async def caller():
                while time.monotonic() < end:
                    kind = rng.choices(kinds, weights)[0]
                    n = rng.randint(2, 8) if kind.endswith("batch") else 1
                    idx = [rng.randrange(len(x)) for _ in range(n)]
                    opts = {"seeded": {"seed": 1000 + idx[0]}, "options": {"steps": 20, "restarts": 2}}
                    start = time.perf_counter()
                    try:
                        seed = 1000 + idx[0] if kind in SEEDED else None
                        if kind.startswith("rest"):
                            answer = await asyncio.to_thread(rest_call, http_url, x[idx], seed, args.deadline)
                        elif kind.startswith("v2"):
                            answer = await v2_stub.ModelInfer(v2_request(x[idx], seed), timeout=args.deadline)
                        else:
                            answer = await stub.Purify(request(x[idx], **opts.get(kind, {})), timeout=args.deadline)
                        code = "OK"
                    except grpc.RpcError as e:
                        code, answer = e.code().name, None
                    except urllib.error.HTTPError as e:
                        code, answer = f"HTTP_{e.code}", None
                    except (urllib.error.URLError, TimeoutError) as e:
                        code, answer = f"HTTP_{type(e).__name__}", None
                    latency[(kind, code)].append(time.perf_counter() - start)
                    if answer is not None:
                        checker.check(kind, idx, answer)

            async def sample_memory():
                while time.monotonic() < end:
                    memory.append([round(args.seconds - (end - time.monotonic()), 1), gpu_memory_mib(),
                                   rss_mb(proc.pid) if proc is not None else None])
                    await asyncio.sleep(args.sample_every)

            t0 = time.monotonic()
            await asyncio.gather(sample_memory(), *(caller() for _ in range(args.clients)))
            took = time.monotonic() - t0
            memory.append([round(took, 1), gpu_memory_mib(), rss_mb(proc.pid) if proc is not None else None])

            codes: dict[str, int] = defaultdict(int)
            by_kind: dict[str, dict] = defaultdict(dict)
            for (kind, code), values in sorted(latency.items()):
                by_kind[kind][code] = latency_stats(values)
                codes[code] += len(values)
            result.update(load_s=round(took, 1), codes=dict(codes), by_kind=by_kind,
                          images_checked=dict(checker.images),
                          owner_not_checkable=[int(i) for i in np.flatnonzero(~checker.identifiable)],
                          images_per_s=round(sum(checker.images.values()) / took, 1),
                          failures=dict(checker.failures), failure_examples=checker.examples,
                          worst=checker.worst, memory_samples_mib=[["s", "gpu_used", "server_rss"], *memory])
            if metrics_url:
                result["server_counted"] = delta(counters(metrics_url), counted_before)
            result["server_alive"] = proc is None or proc.poll() is None
            return result
    finally:
        stop_server(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", help="a running server's gRPC HOST:PORT (default: start one here)")
    p.add_argument("--metrics-url", help="its /metrics URL, for its own counts")
    p.add_argument("--http-url", help="its V2 REST base URL (http://HOST:PORT), for the REST kinds")
    p.add_argument("--model-dir", help="default: models/<dataset>")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--serve-arg", action="append", help="extra flag for a server started here (repeatable)")
    p.add_argument("--images", type=int, default=64, help="test images in the set")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--deadline", type=float, default=60.0, help="each request's deadline, seconds")
    p.add_argument("--ready-seconds", type=float, default=180)
    p.add_argument("--tol", type=float, default=1e-4, help="seeded answers: max |pixel difference|")
    p.add_argument("--err-tol", type=float, default=1e-3, help="reported vs recomputed error, relative")
    p.add_argument("--sample-every", type=float, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    ok = (result["server_alive"] and not result["failures"]
          and not any(c in ("INTERNAL", "HTTP_500") for c in result["codes"]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
