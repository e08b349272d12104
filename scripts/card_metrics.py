"""Copy the measured purification metrics from a `purifier bench` quality run into a model card.

    python scripts/card_metrics.py models/mnist docs/bench/bench-mnist-clean.json

Writes the card's `metrics` section: accuracy of the card's classifier on purified clean test
images (with a 95% Wilson interval), mean reconstruction error, n, the projection settings and
the bench command that measured them. Nothing is computed here that the bench did not measure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import checkpoint  # noqa: E402
from purifier.stats import wilson_interval  # noqa: E402


def wilson(p: float, n: int) -> list[float]:
    """The 95% Wilson interval of an accuracy p measured on n images, rounded for the card."""
    return [round(v, 4) for v in wilson_interval(round(p * n), n)]


def main(model_dir: str, bench_json: str) -> None:
    result = json.loads(Path(bench_json).read_text())
    clean = result["quality"]["clean"]
    n = result["settings"].get("quality_images") or clean.get("n")
    metrics = {"measured_with": result["command"],
               "bench_file": bench_json, "test_images": n,
               "classifier_accuracy_clean_subset": round(clean["undefended_accuracy"], 4)}
    env = result.get("environment", {})
    metrics["measured_on"] = env.get("gpu") or f"CPU ({env.get('cpu', '?')}, {env.get('torch_threads', '?')} threads)"
    for cond, block in result["quality"].items():
        label = "clean" if cond == "clean" else f"{cond}{result['settings']['eps']:g}"
        if cond != "clean":
            metrics[f"classifier_accuracy_{label}_subset"] = round(block["undefended_accuracy"], 4)
        for name, row in block["configs"].items():
            acc = row["accuracy"]
            metrics[f"purified_{label}_accuracy_{name}"] = round(acc, 4)
            metrics[f"purified_{label}_accuracy_{name}_ci95"] = wilson(acc, n)
            metrics[f"mean_reconstruction_error_{label}_{name}"] = round(row["mean_error"], 6)
    for name, cfg in result["settings"]["configs"].items():
        metrics[f"projection_{name}"] = cfg
    card = checkpoint.read_card(model_dir)
    card["metrics"] = metrics  # replaced whole: numbers from an older bench must not linger
    checkpoint.write_card(model_dir, card)
    print(json.dumps(card["metrics"], indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:3])
