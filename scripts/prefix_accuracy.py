"""Purified accuracy of a finished `purifier eval` run on the first K of its images, read from
its chunk cache (nothing is recomputed).

`purifier eval` draws its ``n`` test images as a seeded permutation, so a run with fewer
images (``--n 500``, e.g. a robustness-vs-iterations snapshot) measures a prefix of a larger
run's images. This puts a larger run on the smaller one's images, so the two compare on the
same images rather than on overlapping draws:

    python scripts/prefix_accuracy.py runs/s4/eval-mnist-paper-cpu --k 500 --data-dir data/mnist

Prints one JSON line per cached purified set of the oblivious/clean/transfer kind (the sets whose
images are the seeded draw; black-box sets are file-ordered and skipped): its accuracy and 95%
Wilson interval on the first K images and on all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import data  # noqa: E402
from purifier.stats import wilson_interval as wilson  # noqa: E402


def cached_preds(folder: Path) -> torch.Tensor:
    """One purified set's predictions, its chunk files in image order."""
    chunks = sorted(folder.glob("*.pt"), key=lambda p: int(p.stem.split("-")[0]))
    if not chunks:
        raise SystemExit(f"{folder}: no cached chunks")
    preds, expect = [], 0
    for path in chunks:
        start, end = (int(v) for v in path.stem.split("-"))
        if start != expect:
            raise SystemExit(f"{folder}: chunk {path.name} follows image {expect}: the cache has a gap")
        preds.append(torch.load(path, weights_only=True)["pred"])
        expect = end
    return torch.cat(preds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a `purifier eval --out` folder (with its cache/)")
    ap.add_argument("--k", type=int, required=True, help="the first K images")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    fp = json.loads((args.run / "cache" / "run.json").read_text())
    test = data.load(fp["dataset"], "test", args.data_dir)
    y = data.subset(test, fp["n"], fp["seed"]).labels
    if not 0 < args.k <= len(y):
        ap.error(f"--k must be in [1, {len(y)}]")
    for folder in sorted((args.run / "cache" / "purified").glob("*/*")):
        if folder.parent.name.startswith("blackbox"):
            continue
        name, pred = f"{folder.parent.name}/{folder.name}", cached_preds(folder)
        if len(pred) != len(y):
            print(json.dumps({"set": name, "skipped": f"{len(pred)} of {len(y)} images cached"}))
            continue
        right = (pred == y).float()
        out = {"set": name, "k": args.k,
               "accuracy_first_k": round(float(right[: args.k].mean()), 4),
               "ci95_first_k": [round(v, 4) for v in wilson(int(right[: args.k].sum()), args.k)],
               "n": len(y), "accuracy_all": round(float(right.mean()), 4)}
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
