"""scripts/bench_generator_kernels.py (issue 15, item 3) on the CPU: the three formulations of the
generator's latent-step agree (checked in float64), the check fails a formulation that does not,
and the result records the TF32 flags its fp32 timings ran under (the GPU run is a benchmark, not
a test; the float64 check has not yet run on a GPU, docs/speed.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def kernels(load_script):
    return load_script("bench_generator_kernels")


def run(kernels, monkeypatch, out: Path) -> int:
    monkeypatch.setattr(sys, "argv", ["bench_generator_kernels.py", "--device", "cpu", "--threads", "1",
                                      "--latents", "4", "--seconds", "0.001", "--precisions", "fp32",
                                      "--layouts", "nchw", "--out", str(out)])
    return kernels.main()


def test_formulations_agree(kernels, monkeypatch, tmp_path):
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    assert run(kernels, monkeypatch, tmp_path / "k.json") == 0
    result = json.loads((tmp_path / "k.json").read_text())
    assert set(result["equivalence"]) == {"deconv", "subpixel", "unfold-gemm"}
    for name, e in result["equivalence"].items():
        assert e["max_abs_out"] <= 1e-9 and e["max_abs_grad"] <= 1e-9, name
    assert result["complete"] and len(result["cells"]) == 3 and result["equivalence_precision"] == "float64"
    assert result["timed_tf32"] == {"cudnn": before[0], "matmul": before[1]}


def test_a_wrong_formulation_fails_the_run(kernels, monkeypatch, tmp_path):
    class Off(kernels.UnfoldGemmGenerator):
        def upsample(self, conv, x):
            return super().upsample(conv, x) * 1.01

    monkeypatch.setitem(kernels.IMPLS, "unfold-gemm", Off)
    assert run(kernels, monkeypatch, tmp_path / "k.json") == 1
