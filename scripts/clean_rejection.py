#!/usr/bin/env python
"""The clean-input rejection rate of a shipped model at its card threshold, on the first N
test images: what a server with ``--on-flagged reject`` refuses of clean traffic.

    python scripts/clean_rejection.py models/mnist --data-dir data/mnist --n 1000 --out docs/bench/clean-rejection-mnist.json

Projects with the settings the threshold was calibrated with (the card's
``detection.projection``, seed included), counts errors > threshold, and writes the rate with
its 95% Wilson interval, the card's git blob and the hardware beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from purifier import checkpoint, data, detection, hardware
    from purifier.projection import ProjectionConfig

    device = hardware.choose_device(None, args.threads)
    bundle = checkpoint.load_bundle(args.model_dir, device)
    det = bundle.card.get("detection") or {}
    if "threshold" not in det or "projection" not in det:
        raise SystemExit(f"{args.model_dir}/card.json has no calibrated detection section")
    cfg = ProjectionConfig(**det["projection"])
    dataset = bundle.card["dataset"]
    test = data.load(dataset, "test", args.data_dir)
    x = test.images[: args.n].to(device)
    # the model as loaded: git blobs of its card and generator, taken before the long part
    blobs = {name: subprocess.run(["git", "hash-object", str(Path(args.model_dir) / name)], capture_output=True,
                                  text=True).stdout.strip() for name in ("card.json", "generator.safetensors")}
    start = time.time()
    errors = detection.reconstruction_errors(bundle.generator, x, cfg, bundle.encoder, args.batch_size, True, desc="clean")
    out = {"command": "python scripts/clean_rejection.py " + " ".join(sys.argv[1:]),
           "dataset": dataset, "split": "test", "images": f"first {len(x)}",
           "threshold": det["threshold"], "card_target_fpr": det.get("target_fpr"),
           "git_blobs": blobs, "projection": det["projection"],
           "clean_rejection": detection.flag_rate(det["threshold"], errors),
           "clean_error": {"mean": float(errors.mean()), "max": float(errors.max())},
           "hardware": hardware.summary(device),
           "seconds": round(time.time() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    r = out["clean_rejection"]
    print(f"{dataset}: {r['flagged']}/{r['n']} clean test images above the threshold {det['threshold']:.6g}: "
          f"{r['rate']:.1%} [95% {r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
