"""Intervals for the numbers we report: one home for each formula."""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (sound near 0 and 1, unlike k/n +- ...)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)   # exact ends: rounding leaves 1e-17
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def paired(diff: torch.Tensor) -> dict:
    """Mean of per-item differences (e.g. per image, config A minus config B) with a
    normal-approximation 95% interval."""
    d = diff.double()
    n = d.numel()
    mean = float(d.mean())
    half = 1.96 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return dict(mean=mean, ci95=[mean - half, mean + half], n=n)
