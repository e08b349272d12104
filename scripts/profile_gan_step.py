"""Where a WGAN-GP iteration's time goes, and what the cheap levers buy (issue 9, for a lease).

Times the graph-captured training step (purifier.training.gan.WGANGP) in variants that need
no change to the training code, each from the same seed on the same data:

  base            today's step: fp32 weights, TF32 convolutions, cudnn.benchmark
  channels_last   models and training images in NHWC memory format
  bf16            the whole update under torch.autocast(bfloat16) (weights and Adam stay fp32)
  bf16_cl         both
  sn1             the cheaper recipe train-gan offers (--spectral-norm --gp-weight 0 --n-critic 1:
                  WGAN loss, spectral norm on the critic instead of the penalty, one critic step):
                  no double backward, ~5x cheaper per generator iteration on the CPU; its speed
                  on a GPU is what this measures

and, with ``--profile``, the eager step's top kernels by GPU time (torch.profiler), so the next
lease knows whether the convolutions' double backward or something else bounds it.

Speed alone does not choose a variant: a faster step that trains a worse generator is no gain.
Each variant's losses after ``--iterations`` are printed beside its speed as a first sanity
check; the robustness it buys is judged by ``purifier eval`` after a real run.

    python scripts/profile_gan_step.py --device cuda --iterations 300 --profile --out $OUT/profile.json
    python scripts/profile_gan_step.py --device cpu --iterations 3 --images 512   # the CPU twin
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import data  # noqa: E402
from purifier.hardware import describe  # noqa: E402
from purifier.training.gan import GANTrainConfig, WGANGP  # noqa: E402

VARIANTS = ("base", "channels_last", "bf16", "bf16_cl", "sn1")
SN1 = dict(spectral_norm=True, gp_weight=0.0, n_critic=1)


def build(variant: str, images: torch.Tensor, device: torch.device, seed: int) -> WGANGP:
    cfg = GANTrainConfig(device=str(device), seed=seed, **(SN1 if variant == "sn1" else {}))
    if variant.endswith("cl") or variant == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    wg = WGANGP(cfg, images, device)
    if variant.endswith("cl") or variant == "channels_last":
        for m in (wg.G, wg.D, wg.G_ema):
            if m is not None:
                m.to(memory_format=torch.channels_last)
        wg.images = wg.images.contiguous(memory_format=torch.channels_last)
    if variant.startswith("bf16"):
        plain = wg.update

        def update(*args):  # the capture records what runs here, autocast included
            with torch.autocast(device.type, dtype=torch.bfloat16):
                plain(*args)
        wg.update = update
    return wg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(variant: str, images, device, iterations: int, seed: int) -> dict:
    wg = build(variant, images, device, seed)
    captured = False
    if device.type == "cuda":
        wg.capture()
        captured = True
    for _ in range(3):
        wg.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        wg.step()
    sync(device)
    dt = time.perf_counter() - t0
    d_loss, g_loss, gp = (float(v) for v in wg.stats.cpu())
    return {"variant": variant, "cuda_graph": captured, "iterations": iterations,
            "seconds": round(dt, 3), "iterations_per_s": round(iterations / dt, 2),
            "last_d_loss": round(d_loss, 4), "last_g_loss": round(g_loss, 4), "last_gp": round(gp, 4),
            "finite": all(torch.isfinite(p).all().item() for p in wg.G.parameters())}


def profile_eager(images, device, iterations: int, top: int = 25) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    wg = build("base", images, device, 0)
    for _ in range(3):
        wg.step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iterations):
            wg.step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]:
        rows.append({"name": e.key[:120], "calls": e.count,
                     "self_us_per_iteration": round(getattr(e, key, 0) / iterations, 1)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--images", type=int, default=0, help="use the first N training images (0: all)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    images = data.load(args.dataset, "train", args.data_dir).images
    if args.images:
        images = images[: args.images]
    report = {"hardware": describe(device), "dataset": args.dataset, "torch": torch.__version__,
              "command": " ".join(sys.argv), "variants": []}
    for v in args.variants.split(","):
        try:
            r = time_variant(v, images, device, args.iterations, 0)
        except Exception as e:  # a variant that cannot capture is a finding, not a crash
            r = {"variant": v, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(r), flush=True)
        report["variants"].append(r)
        if args.out:  # after each variant: a profile stopped at its time limit keeps what it measured
            Path(args.out).write_text(json.dumps(report, indent=1))
    if args.profile:
        report["eager_profile"] = profile_eager(images, device, max(3, min(20, args.iterations)))
        for row in report["eager_profile"][:12]:
            print(f"{row['self_us_per_iteration']:>10.1f} us/it  {row['calls']:>6}  {row['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
