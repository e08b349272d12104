"""Issue 11: the server's RSS grew through a soak at 2x capacity. The cause was oneDNN's
primitive cache (1,024 entries by default): a server's batches of every size up to
--max-batch-size, before and after pruning, need more primitives than that (3,230 in a sweep
of sizes 1-64 at the fast preset), so they were evicted and rebuilt over and over, and glibc
returned less and less of the projection thread's freed memory. ``purifier serve`` gives the
cache room for them before torch loads (docs/service.md, Soak)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from purifier.commands.serve import PRIMITIVE_CACHE_CAPACITY

from .conftest import make_model_dir

SERVE_PROBE = """
import os, sys, types
seen = {}
fake = types.ModuleType("purifier.server")
def serve(settings):
    seen["capacity"] = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "unset")
    seen["torch_loaded"] = "torch" in sys.modules
    return 0
fake.serve = serve
sys.modules["purifier.server"] = fake
from purifier import cli
assert cli.main(["serve", "--model-dir", sys.argv[1], "--downstream", "none"]) == 0
print(seen["capacity"], seen["torch_loaded"])
"""

NAMES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


@pytest.mark.parametrize("preset, expected", [
    ({}, str(PRIMITIVE_CACHE_CAPACITY)),                       # room for every batch shape
    ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, "1024"),      # an operator's choice wins
    ({"DNNL_PRIMITIVE_CACHE_CAPACITY": "512"}, "unset"),        # so does the older name
])
def test_serve_gives_onednn_room_for_every_batch_shape_before_torch_loads(tmp_path, preset, expected):
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    env.update(preset)
    d = make_model_dir(tmp_path)
    out = subprocess.run([sys.executable, "-c", SERVE_PROBE, str(d)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, "False"]        # set while torch was not yet imported

