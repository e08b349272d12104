"""Copy the measured purification metrics from a `purifier bench` quality run, or from
`purifier eval` runs, into a model card.

    python scripts/card_metrics.py models/mnist docs/bench/bench-mnist-clean.json
    python scripts/card_metrics.py models/mnist docs/results/h100-28k/mnist-paper/results.json \
        docs/results/h100-28k/mnist-fast/results.json

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


def from_evals(model_dir: str, eval_jsons: list[str]) -> None:
    """Card metrics from `purifier eval` results (one per projection preset)."""
    metrics: dict = {"measured_with": [], "eval_files": eval_jsons}
    for path in eval_jsons:
        result = json.loads(Path(path).read_text())
        preset = result["settings"]["eval"]["projection"]
        metrics["measured_with"].append(result["command"])
        hw = result.get("environment", {}).get("hardware", {})
        # per preset: the presets' evals may come from different machines (and preset versions)
        metrics[f"measured_on_{preset}"] = hw.get("gpu") or f"CPU ({hw.get('cpu', '?')})"
        metrics[f"projection_{preset}"] = result["settings"].get("projection")
        clean = result["clean"]
        metrics["test_images"] = clean["n"]
        metrics["classifier_accuracy_clean_subset"] = clean["undefended"]["accuracy"]
        metrics[f"purified_clean_accuracy_{preset}"] = clean["purified"]["accuracy"]
        metrics[f"purified_clean_accuracy_{preset}_ci95"] = [round(v, 4) for v in clean["purified"]["ci95"]]
        metrics[f"mean_reconstruction_error_clean_{preset}"] = round(clean["reconstruction_error"]["mean"], 6)
        for cell in result["cells"]:
            eps = "" if cell["eps"] is None else f"{cell['eps']:g}"  # CW-L2 has no eps
            label = f"{cell['threat']}_{cell['attack']}{eps}"
            # The black-box protocol's substitute learns from each preset's own answers, so its
            # no-defense accuracy differs per preset; the other attacks' inputs are shared.
            own = f"_{preset}" if cell["threat"] == "blackbox" else ""
            metrics[f"classifier_accuracy_{label}_subset{own}"] = cell["undefended"]["accuracy"]
            metrics[f"purified_{label}_accuracy_{preset}"] = cell["purified"]["accuracy"]
            metrics[f"purified_{label}_accuracy_{preset}_ci95"] = [round(v, 4) for v in cell["purified"]["ci95"]]
            if cell.get("detection", {}).get("auc") is not None:
                metrics[f"detection_auc_{label}_{preset}"] = round(cell["detection"]["auc"], 4)
    card = checkpoint.read_card(model_dir)
    card["metrics"] = metrics  # replaced whole: numbers from an older generator must not linger
    checkpoint.write_card(model_dir, card)
    print(json.dumps(card["metrics"], indent=2))


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
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    if "cells" in json.loads(Path(sys.argv[2]).read_text()):
        from_evals(sys.argv[1], sys.argv[2:])
    else:
        main(*sys.argv[1:3])
