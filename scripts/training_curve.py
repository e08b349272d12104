"""Robustness against generator training: one table and one figure per data set, from
`purifier eval` runs over generators saved at several iterations (scripts/gpu_eval.sh's sweep
over `train-gan --snapshot-at` snapshots, plus the shipped generator's own eval).

    python scripts/training_curve.py docs/results/h100-28k:28000 docs/results/h100-56k:56000 \
        --out docs/figures/robustness-vs-iterations.png

Each argument is one lease's results folder and the iteration count its shipped generator had
(one run continued over leases gives one curve; a later lease's rows follow the earlier's).

Reads <dir>/sweep/<dataset>-iterNNNNNN/results.json (a snapshot's EMA generator) and
<dir>/<dataset>-paper/results.json (the shipped generator, iteration from its card section in
the results' fingerprint, else the DIR:ITERATIONS suffix or --final-iterations). ``--shipped
DIR:ITERATIONS`` adds one more shipped generator from a single paper-setting eval's folder
(DIR/results.json; its data set read from the results), e.g. one run on the CPU:

    python scripts/training_curve.py docs/results/h100-28k:28000 docs/results/h100-56k:56000 \
        docs/results/h200-100k --shipped docs/results/mnist-paper-100k-cpu:100750 \
        --shipped docs/results/fashion-mnist-paper-93k-cpu:93000 --out docs/figures/robustness-vs-iterations.png

Prints a markdown table; computes nothing that the evals did not measure.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def rows(base: Path, dataset: str, final_iterations: int) -> list[dict]:
    out = []
    for path in sorted(base.glob(f"sweep/{dataset}-iter*/results.json")):
        it = int(re.search(r"iter(\d+)", path.parent.name).group(1))
        out.append(_row(json.loads(path.read_text()), it, "EMA snapshot"))
    final = base / f"{dataset}-paper" / "results.json"
    if final.exists():
        out.append(_row(json.loads(final.read_text()), final_iterations, "shipped"))
    return sorted(out, key=lambda r: r["iterations"])


def _row(result: dict, iterations: int, what: str) -> dict:
    cells = {(c["threat"], c["attack"], c["eps"]): c for c in result["cells"]}

    def acc(cell):
        return None if cell is None else (cell["purified"]["accuracy"], cell["purified"]["ci95"])

    return {"iterations": iterations, "generator": what, "n": result["clean"]["n"],
            "clean": acc(result["clean"]),
            "oblivious": acc(cells.get(("oblivious", "fgsm", 0.3))),
            "transfer": acc(next((c for k, c in cells.items() if k[0] == "transfer" and k[2] == 0.3), None))}


def table(dataset: str, rs: list[dict]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v[0]:.3f} [{v[1][0]:.3f}, {v[1][1]:.3f}]"

    lines = [f"**{dataset}** (paper setting L=200 R=10; purified accuracy, 95% Wilson interval)", "",
             "| G iterations | generator | n | clean | oblivious FGSM 0.3 | transfer FGSM 0.3 (substitute B) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['iterations']:,} | {r['generator']} | {r['n']} | {fmt(r['clean'])} | {fmt(r['oblivious'])} "
              f"| {fmt(r['transfer'])} |" for r in rs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bases", nargs="+", metavar="DIR[:ITERATIONS]",
                    help="folders with sweep/ and <dataset>-paper/ eval results; ITERATIONS: the "
                         "shipped generator's iteration count in that folder (default --final-iterations)")
    ap.add_argument("--out", default=None, help="PNG figure path")
    ap.add_argument("--final-iterations", type=int, default=28000)
    ap.add_argument("--shipped", action="append", default=[], metavar="DIR:ITERATIONS",
                    help="a single paper-setting eval of a shipped generator (DIR/results.json) "
                         "and that generator's iteration count; repeatable")
    args = ap.parse_args(argv)
    data: dict[str, list[dict]] = {"mnist": [], "fashion-mnist": []}
    for spec in args.bases:
        folder, _, its = spec.partition(":")
        for ds in data:
            data[ds] += rows(Path(folder), ds, int(its) if its else args.final_iterations)
    for spec in args.shipped:
        folder, sep, its = spec.rpartition(":")
        if not sep or not its.isdigit():
            ap.error(f"--shipped {spec!r}: expected DIR:ITERATIONS")
        result = json.loads((Path(folder) / "results.json").read_text())
        ds = result["settings"]["dataset"]
        if ds not in data:
            ap.error(f"--shipped {spec!r}: data set {ds!r} is not one of {sorted(data)}")
        data[ds].append(_row(result, int(its), "shipped"))
    data = {ds: sorted(rs, key=lambda r: r["iterations"]) for ds, rs in data.items()}
    for ds, rs in data.items():
        print(table(ds, rs) + "\n")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for ax, (ds, rs) in zip(axes, data.items()):
            its = [r["iterations"] for r in rs]
            for key, label in (("clean", "clean"), ("oblivious", "oblivious FGSM 0.3"),
                               ("transfer", "transfer FGSM 0.3")):
                ys = [r[key][0] if r[key] else float("nan") for r in rs]
                lo = [r[key][0] - r[key][1][0] if r[key] else 0 for r in rs]
                hi = [r[key][1][1] - r[key][0] if r[key] else 0 for r in rs]
                ax.errorbar(its, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
            ax.set_title(f"{ds} (paper setting)")
            ax.set_xlabel("generator iterations")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("purified accuracy")
        axes[1].legend(loc="center right", fontsize=8)
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
