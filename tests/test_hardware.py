"""One description of the hardware (purifier.hardware) for benches, results and cards, and
one device choice for every command and server."""

from __future__ import annotations

import torch

from purifier import hardware


def test_describe_names_the_cpu_and_no_gpu_off_cuda():
    hw = hardware.describe("cpu")
    assert hw["device"] == "cpu" and hw["gpu"] is None
    assert hw["cpu"] and hw["cpu_count"] >= 1 and hw["torch_threads"] == torch.get_num_threads()
    assert hardware.summary("cpu") == f"{hw['cpu']} CPU, {hw['torch_threads']} threads"


def test_choose_device_takes_the_asked_one_and_sets_threads():
    before = torch.get_num_threads()
    try:
        assert hardware.choose_device("cpu", threads=1) == "cpu" and torch.get_num_threads() == 1
        assert hardware.choose_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        torch.set_num_threads(before)
