"""The serving engine is usable without grpc: import it, load a model, purify a batch, in a
Python where grpc (and protobuf) cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Makes grpc, its plugins and protobuf unimportable, as in an environment without grpcio.
BLOCK = """
import importlib.abc, sys
class NoGrpc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection", "grpc_status") \\
                or name.startswith("google.protobuf"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
for name in [m for m in sys.modules if m.split(".")[0].startswith("grpc") or m.startswith("google.protobuf")]:
    del sys.modules[name]
sys.meta_path.insert(0, NoGrpc())
"""


def run_without_grpc(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_engine_purifies_without_grpc(tiny_model_dir):
    out = run_without_grpc(f"""
import asyncio
from concurrent.futures import ThreadPoolExecutor
import torch
from purifier.engine import Batcher, Engine, Limits, choose_device

engine = Engine.load({str(tiny_model_dir)!r}, choose_device("cpu"), "fast", Limits(max_batch_size=4))
x = engine.validate(torch.full((2, 1, 8, 8), 0.5))
images, errors = engine.project(x, engine.config(steps=2, seed=0))

async def batched():
    b = Batcher(engine.project, ThreadPoolExecutor(1), max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=4)
    b.start()
    try:
        return await b.submit(x, engine.config(steps=2, seed=0))
    finally:
        await b.close()
images2, errors2 = asyncio.run(batched())
assert images.shape == images2.shape == (2, 1, 8, 8) and (errors == errors2).all()
assert not [m for m in sys.modules if m.startswith(("grpc", "google.protobuf"))]
print("ok")
""")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_block_does_keep_grpc_out():
    """The check above means something: the transport itself cannot be imported under it."""
    out = run_without_grpc("import purifier.server")
    assert out.returncode != 0 and "blocked by the test" in out.stderr
