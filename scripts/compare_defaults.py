"""Paired comparison of two (model directory, projection) pairs on the same seeded test images:
clean, oblivious FGSM (on the protected classifier) and transfer FGSM (on the substitute, model
B), the way `purifier bench` pairs configurations within one model directory. Made for a change
of the shipped default that moves both the encoder and the preset (issue 15):

    python scripts/compare_defaults.py --dataset mnist --seed 1 \
        --a runs/enc-v2/old-mnist fast:steps=100,restarts=4,prune_after=10 \
        --b models/mnist fast:steps=50,restarts=16,prune_after=1 --out docs/bench/....json

Prints and writes accuracies, mean errors and the paired differences (b - a) with 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import data  # noqa: E402
from purifier.benchmark.bench import _substitute, parse_config  # noqa: E402
from purifier.checkpoint import load_bundle  # noqa: E402
from purifier.evaluation import attacks  # noqa: E402
from purifier.projection import project  # noqa: E402
from purifier.stats import paired  # noqa: E402


def purify(bundle, x, cfg, batch: int, seed: int):
    images, errors = [], []
    for i, s in enumerate(range(0, len(x), batch)):
        p = project(bundle.generator, x[s: s + batch], cfg.with_(seed=seed + i), bundle.encoder)
        images.append(p.images)
        errors.append(p.errors)
    return torch.cat(images), torch.cat(errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--a", nargs=2, metavar=("MODEL_DIR", "CONFIG"), required=True)
    ap.add_argument("--b", nargs=2, metavar=("MODEL_DIR", "CONFIG"), required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    sides = {}
    for name, (model_dir, spec) in (("a", args.a), ("b", args.b)):
        bundle = load_bundle(model_dir, need_classifier=True)
        sides[name] = (bundle, parse_config(f"{name}={spec}" if "=" not in spec.split(":")[0] else spec)[1], spec)
    clf = sides["a"][0].classifier
    sub = data.subset(data.load(args.dataset, "test", args.data_dir), args.n, seed=args.seed)
    x, y = sub.images, sub.labels
    inputs = {"clean": x,
              "fgsm": torch.cat([attacks.fgsm(clf, x[s: s + 500], y[s: s + 500], args.eps) for s in range(0, len(x), 500)])}
    substitute = _substitute(Path(args.a[0]), torch.device("cpu"))
    inputs["transfer"] = torch.cat([attacks.fgsm(substitute, x[s: s + 500], y[s: s + 500], args.eps)
                                    for s in range(0, len(x), 500)])
    result = dict(dataset=args.dataset, n=len(y), subset_seed=args.seed, eps=args.eps,
                  a=dict(model_dir=args.a[0], config=args.a[1]), b=dict(model_dir=args.b[0], config=args.b[1]),
                  conditions={}, command="python scripts/compare_defaults.py " + " ".join(sys.argv[1:]))
    for cond, xin in inputs.items():
        row = {}
        correct = {}
        for name, (bundle, cfg, _) in sides.items():
            t = time.perf_counter()
            images, errors = purify(bundle, xin, cfg, args.batch, args.seed)
            with torch.no_grad():
                correct[name] = (bundle.classifier(images).argmax(1) == y).float()
            row[name] = dict(accuracy=round(correct[name].mean().item(), 4), mean_error=errors.mean().item(),
                             seconds=round(time.perf_counter() - t, 1))
            row[name + "_errors"] = errors
        row["accuracy_diff_b_minus_a"] = paired(correct["b"] - correct["a"])
        row["error_diff_b_minus_a"] = paired(row.pop("b_errors") - row.pop("a_errors"))
        result["conditions"][cond] = row
        d = row["accuracy_diff_b_minus_a"]
        print(f"{cond}: a {row['a']['accuracy']:.3f} (error {row['a']['mean_error']:.5f}), "
              f"b {row['b']['accuracy']:.3f} (error {row['b']['mean_error']:.5f}); b - a {d}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
