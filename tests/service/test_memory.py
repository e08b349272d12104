"""Issue 11: the server's RSS grew through a soak at 2x capacity. The cause was oneDNN's
primitive cache (1,024 entries by default): a server's batches of every size up to
--max-batch-size, before and after pruning, need more primitives than that (3,230 in a sweep
of sizes 1-64 at the fast preset), so they were evicted and rebuilt over and over, and glibc
returned less and less of the projection thread's freed memory. ``purifier serve`` gives the
cache room for them before torch loads (docs/service.md, Soak)."""

from __future__ import annotations

import os

import pytest

from purifier.commands.serve import PRIMITIVE_CACHE_CAPACITY

from .conftest import environment_serve_runs_with

NAMES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


@pytest.mark.parametrize("preset, expected", [
    ({}, str(PRIMITIVE_CACHE_CAPACITY)),                       # room for every batch shape
    ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, "1024"),      # an operator's choice wins
    ({"DNNL_PRIMITIVE_CACHE_CAPACITY": "512"}, "unset"),        # so does the older name
])
def test_serve_gives_onednn_room_for_every_batch_shape_before_torch_loads(tmp_path, preset, expected):
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    env.update(preset)
    seen = environment_serve_runs_with(tmp_path, env, NAMES[:1])
    assert (seen[NAMES[0]] or "unset", seen["torch_loaded"]) == (expected, False)   # set before torch loaded
