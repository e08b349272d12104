"""Which device to run on, and what the hardware is: one home for both, so every command,
server, benchmark and report picks and describes a device the same way."""

from __future__ import annotations

import os
import platform
import sys

import torch


def choose_device(device: str | None = None, threads: int | None = None) -> str:
    """The torch device to use: ``device`` when given, else cuda when available, else cpu.
    ``threads`` (when given) sets torch's CPU threads first."""
    if threads:
        torch.set_num_threads(threads)
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str | torch.device = "cpu") -> dict:
    """The hardware a run used, for results, benches and model cards: the device, the CPU
    model, its cores and torch's threads, the GPU's name (None off CUDA), the platform."""
    device = str(device)
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return dict(device=device, cpu=cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                gpu=gpu, platform=platform.platform(), machine=platform.machine(), python=sys.version.split()[0],
                torch=torch.__version__)


def summary(device: str | torch.device = "cpu") -> str:
    """One line for logs and cards: the GPU's name on CUDA, else "<CPU model> CPU, N threads"."""
    hw = describe(device)
    return hw["gpu"] or f"{hw['cpu']} CPU, {hw['torch_threads']} threads"
