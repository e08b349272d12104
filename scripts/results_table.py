"""Side-by-side table of several `purifier eval` runs on the same images (Markdown).

    python scripts/results_table.py NAME=docs/results/mnist-paper/results.json NAME2=...

One row per cell (threat, attack, eps) found in the first run; columns: n, accuracy without
defense, then each run's purified accuracy [95% interval] and detection AUC. Numbers are
copied from the results files, nothing is recomputed.
"""

from __future__ import annotations

import json
import sys

THREAT = {"oblivious": "white-box, oblivious", "transfer": "black-box transfer", "adaptive": "adaptive BPDA+EOT"}
ATTACK = {"fgsm": "FGSM", "pgd": "PGD-Linf", "cw": "CW-L2", "bpda": "PGD-Linf", "bpda-eot-pgd": "PGD-Linf"}


def fmt(acc: dict) -> str:
    lo, hi = acc["ci95"]
    return f"{acc['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def main(args: list[str]) -> str:
    runs = []
    for a in args:
        name, _, path = a.rpartition("=")
        runs.append((name, json.load(open(path))))
    head = "| threat model | attack | eps | n | no defense | " + " | ".join(
        f"purified, {n} | AUC, {n}" for n, _ in runs) + " |"
    lines = [head, "|" + "---|" * (5 + 2 * len(runs))]
    first = runs[0][1]
    clean = [r["clean"] for _, r in runs]
    lines.append("| none (clean) | - | - | %d | %s | %s |" % (
        first["clean"]["n"], fmt(first["clean"]["undefended"]),
        " | ".join(f"{fmt(c['purified'])} | -" for c in clean)))
    for cell in first["cells"]:
        key = (cell["threat"], cell["attack"], cell.get("eps"))
        row = [THREAT.get(cell["threat"], cell["threat"]), ATTACK.get(cell["attack"], cell["attack"]),
               "-" if cell.get("eps") is None else f"{cell['eps']:g}", str(cell["n"]),
               # adaptive examples are made through each run's own projection: no shared column
               "(per run)" if cell["threat"] == "adaptive" else fmt(cell["undefended"])]
        for _, r in runs:
            match = [c for c in r["cells"] if (c["threat"], c["attack"], c.get("eps")) == key]
            if match and match[0]["n"] == cell["n"]:
                auc = match[0].get("detection", {}).get("auc")
                row += [fmt(match[0]["purified"]), "-" if auc is None else f"{auc:.3f}"]
            else:
                row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(main(sys.argv[1:]))
