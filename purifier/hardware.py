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
