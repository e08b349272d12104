#!/usr/bin/env python
"""The generator's latent-step (forward + gradient to z) by kernel formulation (issue 15, item 3).
A benchmark, not a test; its equivalence check fails the run, though.

    python scripts/bench_generator_kernels.py --device cuda --out docs/bench/generator-kernels-h100.json
    python scripts/bench_generator_kernels.py --device cpu --threads 2 --latents 640 --seconds 2

Implementations of the same function (the shipped generator's weights):
- `deconv`: purifier.models.Generator as trained (ConvTranspose2d 5x5 stride 2: cuDNN/oneDNN);
- `subpixel`: purifier.models.SubpixelGenerator (3x3 conv to 4x channels + pixel shuffle);
- `unfold-gemm`: the same sub-pixel weights as explicit GEMMs (F.unfold, one matmul, pixel
  shuffle): what a hand-written kernel would do, in stock torch ops.
Each in fp32 and under bf16 autocast, NCHW and channels-last, at each --latents size. Per cell:
latent-steps/s, the FLOPs of one step counted by torch.utils.flop_counter (useful = the
deconv's count; executed = this formulation's, which multiplies zero taps too), achieved
TFLOP/s, and on CUDA, with --profile, the top kernels of one step. Before timing, each
formulation's output and gradient are compared with `deconv`'s on the same inputs
in float64 (max abs difference; the run exits 1 if one is over --tol). The fp32 timings run
under torch's defaults, as the service does: cuDNN convolutions in TF32 on Ampere and later,
matmuls in full fp32 (recorded as `timed_tf32`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from purifier import checkpoint  # noqa: E402
from purifier.models import Generator, SubpixelGenerator  # noqa: E402


class UnfoldGemmGenerator(SubpixelGenerator):
    """SubpixelGenerator with each 3x3 convolution as F.unfold + one matmul."""

    def upsample(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, 3, padding=1)                                         # (N, Cin*9, h*w)
        y = conv.weight.flatten(1) @ cols + conv.bias[:, None]                  # (N, 4*Cout, h*w)
        return F.pixel_shuffle(y.view(n, -1, h, w), 2)


IMPLS = {"deconv": lambda g: g, "subpixel": SubpixelGenerator, "unfold-gemm": UnfoldGemmGenerator}


def step(g: nn.Module, z: torch.Tensor, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    z = z.detach().requires_grad_(True)
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = g(z)
    ((out.to(x.dtype) - x) ** 2).flatten(1).mean(1).sum().backward()   # weights are frozen: only dL/dz
    return z.grad


def frozen(name: str, base: Generator) -> nn.Module:
    """Formulation ``name`` of ``base``'s weights, in eval mode, weights frozen (only dL/dz)."""
    g = IMPLS[name](base).eval()
    for q in g.parameters():
        q.requires_grad_(False)
    return g


def flops(g: nn.Module, z: torch.Tensor, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(g, z, x, False)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(g, z, x, bf16: bool, seconds: float, device) -> float:
    for _ in range(3):
        step(g, z, x, bf16)
    sync(device)
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(5):
            step(g, z, x, bf16)
        n += 5
        sync(device)
        took = time.perf_counter() - start
        if took >= seconds:
            return n * z.shape[0] / took


def top_kernels(g, z, x, bf16: bool, k: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(g, z, x, bf16)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:k]
    return [{"kernel": e.key[:120], "us": round(e.device_time_total, 1), "calls": e.count} for e in rows]


def write(result: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=str(ROOT / "models" / "mnist"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--latents", default="640,2560,10240", help="latents per step (images x restarts)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per cell")
    p.add_argument("--tol", type=float, default=1e-9, help="float64: max |difference| to deconv")
    p.add_argument("--profile", action="store_true", help="CUDA: top kernels per cell")
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base: Generator = checkpoint.load_bundle(args.model_dir, device).generator.eval()
    for q in base.parameters():
        q.requires_grad_(False)
    impls = {name: frozen(name, base) for name in args.impls.split(",")}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "model_dir": args.model_dir,
              "settings": vars(args), "equivalence": {}, "cells": []}
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(256, base.latent_dim, generator=gen).to(device)
    x = torch.rand(256, *base.image_shape.as_tuple(), generator=gen).to(device)
    # The check runs in float64, where two formulations of one function agree to ~1e-12. In fp32
    # it would test the rounding, not the formulation: cuDNN's convolutions default to TF32 on
    # Ampere and later and matmuls do not (2026-11-28, H200: unfold-gemm 1.9e-3 from deconv), and
    # on the CPU a pre-activation within rounding of a ReLU's kink flips one gradient entry
    # (2-core EPYC, shipped MNIST G: deconv and unfold-gemm 9.5e-4 from float64, subpixel 2e-8).
    b64 = copy.deepcopy(base).double()
    z64, x64 = z.double(), x.double()
    ref_out, ref_grad = b64(z64), step(b64, z64, x64, False)
    ok = True
    for name in impls:
        g = frozen(name, b64)
        d_out = (g(z64) - ref_out).abs().max().item()
        d_grad = (step(g, z64, x64, False) - ref_grad).abs().max().item()
        result["equivalence"][name] = {"max_abs_out": d_out, "max_abs_grad": d_grad,
                                       "grad_scale": ref_grad.abs().max().item()}
        ok &= d_out <= args.tol and d_grad <= args.tol
    del b64
    result["equivalence_precision"] = "float64"
    # the fp32 cells run under torch's defaults, as the service does
    result["timed_tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    print(json.dumps(result["equivalence"]), flush=True)
    for n in (int(v) for v in args.latents.split(",")):
        z = torch.randn(n, base.latent_dim, generator=gen).to(device)
        x = torch.rand(n, *base.image_shape.as_tuple(), generator=gen).to(device)
        useful = flops(base, z, x)
        for layout in args.layouts.split(","):
            for name, g0 in impls.items():
                g = g0.to(memory_format=torch.channels_last) if layout == "channels_last" else g0
                executed = flops(g, z, x)
                for precision in args.precisions.split(","):
                    bf16 = precision == "bf16"
                    r = rate(g, z, x, bf16, args.seconds, device)
                    cell = {"latents": n, "impl": name, "layout": layout, "precision": precision,
                            "latent_steps_per_s": round(r, 1),
                            "useful_mflop_per_step": round(useful / n / 1e6, 2),
                            "executed_mflop_per_step": round(executed / n / 1e6, 2),
                            "useful_tflops": round(r * useful / n / 1e12, 3)}
                    if args.profile and device.type == "cuda":
                        cell["top_kernels"] = top_kernels(g, z, x, bf16)
                    result["cells"].append(cell)
                    print(json.dumps({k: v for k, v in cell.items() if k != "top_kernels"}), flush=True)
                    write(result, args.out)   # after every cell: a run stopped by its time limit keeps what it measured
                if layout == "channels_last":
                    g0.to(memory_format=torch.contiguous_format)
    result["complete"] = True
    write(result, args.out)
    if not ok:
        print("equivalence check FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
