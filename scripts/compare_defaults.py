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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import data  # noqa: E402
from purifier.benchmark.bench import _substitute, fgsm_in_chunks, parse_config, purify_cached  # noqa: E402
from purifier.checkpoint import load_bundle  # noqa: E402
from purifier.stats import paired  # noqa: E402


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

    sides = {}  # name -> (bundle, projection config); CONFIG is BASE[:key=value,...]
    for name, (model_dir, spec) in (("a", args.a), ("b", args.b)):
        sides[name] = (load_bundle(model_dir, need_classifier=True), parse_config(f"{name}={spec}")[1])
    clf = sides["a"][0].classifier
    sub = data.subset(data.load(args.dataset, "test", args.data_dir), args.n, seed=args.seed)
    x, y = sub.images, sub.labels
    inputs = {"clean": x, "fgsm": fgsm_in_chunks(clf, x, y, args.eps),
              "transfer": fgsm_in_chunks(_substitute(Path(args.a[0]), torch.device("cpu")), x, y, args.eps)}
    result = dict(dataset=args.dataset, n=len(y), subset_seed=args.seed, eps=args.eps,
                  a=dict(model_dir=args.a[0], config=args.a[1]), b=dict(model_dir=args.b[0], config=args.b[1]),
                  conditions={}, command="python scripts/compare_defaults.py " + " ".join(sys.argv[1:]))
    for cond, xin in inputs.items():
        row, correct, errors = {}, {}, {}
        for name, (bundle, cfg) in sides.items():
            # seeded per batch (seed + batch index), as `purifier bench` purifies; no cache
            out = purify_cached(bundle.generator, bundle.encoder, xin, cfg, args.batch, {}, None, args.seed)
            with torch.no_grad():
                correct[name] = (bundle.classifier(out["images"]).argmax(1) == y).float()
            errors[name] = out["errors"]
            row[name] = dict(accuracy=round(correct[name].mean().item(), 4), mean_error=errors[name].mean().item(),
                             seconds=round(out["seconds"], 1))
        row["accuracy_diff_b_minus_a"] = paired(correct["b"] - correct["a"])
        row["error_diff_b_minus_a"] = paired(errors["b"] - errors["a"])
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
