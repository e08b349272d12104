"""Copy the measured purification metrics from a `purifier bench` quality run into a model card.

    python scripts/card_metrics.py models/mnist docs/bench/bench-mnist-clean.json

Writes the card's `metrics` section: accuracy of the card's classifier on purified clean test
images (with a 95% Wilson interval), mean reconstruction error, n, the projection settings and
the bench command that measured them. Nothing is computed here that the bench did not measure.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import checkpoint  # noqa: E402


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(centre - half, 4), round(centre + half, 4)]


def main(model_dir: str, bench_json: str) -> None:
    result = json.loads(Path(bench_json).read_text())
    clean = result["quality"]["clean"]
    n = result["settings"].get("quality_images") or clean.get("n")
    metrics = {"measured_with": result["command"],
               "bench_file": bench_json, "test_images": n,
               "classifier_accuracy_clean_subset": round(clean["undefended_accuracy"], 4)}
    for name, row in clean["configs"].items():
        acc = row["accuracy"]
        metrics[f"purified_clean_accuracy_{name}"] = round(acc, 4)
        metrics[f"purified_clean_accuracy_{name}_ci95"] = wilson(acc, n)
        metrics[f"mean_reconstruction_error_clean_{name}"] = round(row["mean_error"], 6)
        metrics[f"projection_{name}"] = result["settings"]["configs"][name]
    card = checkpoint.update_card(model_dir, metrics=metrics)
    print(json.dumps(card["metrics"], indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:3])
