from __future__ import annotations

import json
import sys

from ..errors import ConfigError
from .common import add_data, add_device, resolve_device

HELP = ("benchmark the projection: images/s and latency per configuration, and clean/FGSM accuracy "
        "after purification paired against the paper configuration")


def add_arguments(p) -> None:
    add_data(p)
    add_device(p)
    p.add_argument("--model-dir", default=None, help="default models/<dataset>")
    p.add_argument("--config", action="append", default=None, metavar="SPEC",
                   help="a configuration: a preset (paper, fast) or NAME=BASE:key=value,... "
                        "e.g. fast-fp32=fast:precision=fp32; repeat the flag; the first is the "
                        "reference for ratios and paired differences (default: paper, fast)")
    p.add_argument("--batch-sizes", default="1,8,16,32,64",
                   help="comma-separated batch sizes for the speed part: each configuration's best of them "
                        "is compared with the reference's best (best-vs-best), the same-batch ratios beside it")
    p.add_argument("--batch-sizes-for", action="append", default=None, metavar="NAME=B1,B2,...",
                   help="this configuration's own batch-size sweep instead of --batch-sizes (repeat the flag), "
                        "e.g. paper=8,16,32 while fast sweeps up to 512")
    p.add_argument("--speed-seconds", type=float, default=None,
                   help="per configuration and batch size, start no new batch after this many seconds "
                        "(at least one batch is timed): the paper configuration needs minutes per 64 images")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole speed sweep this many times in the process; the headline speed-up is "
                        "the lowest over the rounds (a rerun must agree)")
    p.add_argument("--speed-images", type=int, default=64, help="test images per throughput measurement (0: skip)")
    p.add_argument("--quality-images", type=int, default=0,
                   help="seeded test images for the accuracy part (0: skip; the issue asks for >= 1000)")
    p.add_argument("--quality-batch", type=int, default=100)
    p.add_argument("--conditions", default="clean,fgsm", help="any of clean, fgsm (on the protected classifier), transfer (FGSM made on "
                        "the model directory's substitute.safetensors)")
    p.add_argument("--eps", type=float, default=0.3, help="FGSM step (L-inf, images in [0, 1])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="reuse purified results (e.g. the slow paper configuration) across runs")
    p.add_argument("--reference-done-only", action="store_true",
                   help="compute nothing for the reference (first) configuration: pair every other one on "
                        "the reference's batches already in --cache (a long paper run still going or stopped)")
    p.add_argument("--reference-eval", default=None, metavar="DIR",
                   help="read the reference (first) configuration's purified results from a finished "
                        "`purifier eval` run (its --out) of the same models, seed and projection instead of "
                        "computing them; refused unless its test and adversarial images are this bench's")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its kernels per shape first (CUDA; the warm-up batches pay for it)")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout only)")


def run(args) -> int:
    from .. import checkpoint, data
    from ..benchmark.bench import BenchSettings, parse_config, run_bench

    device = resolve_device(args)
    if args.cudnn_benchmark:
        import torch
        torch.backends.cudnn.benchmark = True
    specs = args.config or ["paper", "fast"]
    configs = [parse_config(s) for s in specs]
    settings = BenchSettings(
        configs=configs,
        batch_sizes=_batch_sizes(args.batch_sizes, "--batch-sizes"),
        batch_sizes_for=_batch_sizes_for(args.batch_sizes_for or [], [n for n, _ in configs]),
        speed_images=args.speed_images, quality_images=args.quality_images,
        quality_batch=args.quality_batch, eps=args.eps,
        conditions=tuple(c for c in args.conditions.split(",") if c), seed=args.seed, cache_dir=args.cache,
        rounds=args.rounds, speed_seconds=args.speed_seconds, reference_done_only=args.reference_done_only,
        reference_eval=args.reference_eval)
    bundle = checkpoint.load_bundle(args.model_dir or f"models/{args.dataset}", device,
                                    need_classifier=bool(args.quality_images))
    test = data.load(args.dataset, "test", args.data_dir)
    result = run_bench(bundle, test, settings, device, args.dataset,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    result["command"] = "purifier bench " + " ".join(sys.argv[2:])
    result["environment"]["cudnn_benchmark"] = bool(args.cudnn_benchmark)
    text = json.dumps(result, indent=2)
    if args.out:
        from pathlib import Path
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _batch_sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: comma-separated whole numbers expected, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"{flag}: batch sizes must be >= 1, got {text!r}")
    return sizes


def _batch_sizes_for(specs: list[str], names: list[str]) -> dict[str, list[int]]:
    """``--batch-sizes-for NAME=8,16`` flags -> {NAME: [8, 16]}; NAME must be a configuration."""
    out = {}
    for spec in specs:
        name, sep, sizes = spec.partition("=")
        if not sep or name not in names:
            raise ConfigError(f"--batch-sizes-for {spec!r}: expected NAME=B1,B2,... with NAME one of {names}")
        out[name] = _batch_sizes(sizes, f"--batch-sizes-for {name}")
    return out
