"""The encoder's start error per image set, as docs/service.md's encoder tables give it: the mean
squared error of G(E(x)) to x with E's output on the sphere of radius 1 (FAST's start), over the
first 1,000 training, the last 1,000 training (the calibration slice's end) and the first 1,000
test images.

    python scripts/start_errors.py models/mnist --dataset mnist --data-dir data/mnist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import checkpoint, data  # noqa: E402
from purifier.training.encoder import start_error  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--radius", type=float, default=1.0)
    args = p.parse_args()
    bundle = checkpoint.load_bundle(args.model_dir, torch.device("cpu"))
    if bundle.encoder is None:
        raise SystemExit(f"{args.model_dir} has no encoder")
    train = data.load(args.dataset, "train", args.data_dir)
    test = data.load(args.dataset, "test", args.data_dir)
    sets = {"train_first": train.images[:args.n], "train_last": train.images[-args.n:], "test_first": test.images[:args.n]}
    with torch.no_grad():
        errors = {k: start_error(bundle.generator, bundle.encoder, x, args.radius) for k, x in sets.items()}
    print(" / ".join(f"{v:.4f}" for v in errors.values()), errors)


if __name__ == "__main__":
    main()
