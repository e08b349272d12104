"""Writing an evaluation's results: ``results.json`` (every number, the settings, versions,
seed and hardware), ``results.md`` (the table), and PNG figures under ``figures/``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np


def environment(device: str = "cpu") -> dict:
    import torch

    from .. import __version__

    versions = {"purifier": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    try:
        import matplotlib
        versions["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    from ..hardware import describe

    return {"versions": versions, "hardware": describe(device)}


# --- the table ------------------------------------------------------------------------------

def _acc(a: dict | None) -> str:
    if not a:
        return "-"
    lo, hi = a["ci95"]
    return f"{a['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


THREAT_TITLES = {"clean": "none (clean)", "oblivious": "white-box, defense-oblivious",
                 "transfer": "black-box transfer", "adaptive": "adaptive (BPDA+EOT)",
                 "blackbox": "black-box, paper protocol (Papernot substitute)"}


def _share(a: dict, key: str) -> str:
    if not a["n"]:
        return "- (none accepted)"
    lo, hi = a["ci95"]
    return f"{a[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def abstention_table(rows: list[dict]) -> list[str]:
    """The rows' ``abstention`` at the card threshold: what a caller of a server with
    ``--on-flagged reject`` gets (empty when the model card has no threshold)."""
    rows = [r for r in rows if "abstention" in r]
    if not rows:
        return []
    t = rows[0]["abstention"]["threshold"]
    lines = ["", f"Rejecting flagged inputs (`--on-flagged reject`) at the card threshold {t:.6g}: rejected "
                 "share (on clean images: the clean rejection rate), accuracy on the accepted images, and "
                 "protected accuracy = (correct and accepted + rejected) / n on attacked images "
                 "(correct and accepted / n on clean ones), each with its 95% Wilson interval.", "",
             "| threat model | attack | eps | n | rejected | accuracy on accepted | protected accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["abstention"]
        eps = "-" if r["eps"] is None else f"{r['eps']:g}"
        lines.append(f"| {_threat_title(r)} | {_row_attack(r)} | {eps} | {r['n']} | "
                     f"{_share(a['rejected'], 'rate')} | {_share(a['accepted_accuracy'], 'accuracy')} | "
                     f"{_share(a['protected_accuracy'], 'accuracy')} |")
    return lines


def _attack_title(attack: str) -> str:
    return {"none": "-", "bpda": "BPDA+EOT PGD-Linf", "pgd": "PGD-Linf", "cw": "CW-L2",
            "bpda-detect": "detection-aware BPDA+EOT PGD-Linf", "manifold": "on-manifold G(z)"}.get(
        attack, attack.upper())


def _threat_title(r: dict) -> str:
    return "adaptive (on-manifold)" if r["attack"] == "manifold" else THREAT_TITLES[r["threat"]]


def _row_attack(r: dict) -> str:
    title = _attack_title(r["attack"])
    return title + (f", lambda={r['lambda']:g}" if r.get("lambda") is not None else "")


def evasion_table(rows: list[dict]) -> list[str]:
    """The detection-aware rows (bpda-detect, manifold): how often the attack both fools the
    classifier after purification and stays under the detector's threshold."""
    rows = [r for r in rows if "evasion" in r]
    if not rows:
        return []
    lines = ["", "Attacks that also try to evade the detector: purified accuracy, protected accuracy at the card "
                 "threshold, and the evasion rate = (purified prediction wrong and not flagged) / n "
                 "(= 1 - protected accuracy), and the same among the successful attacks; reconstruction "
                 "error in units of the threshold (median). 95% Wilson intervals.", "",
             "| attack | eps | n | purified | protected | evaded / n | not flagged among successful | "
             "error / threshold (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["eps"] is None else f"{r['eps']:g}"
        ev = r["evasion"]
        among = _acc(ev["not_flagged_among_succeeded"]) + (
            f" of {ev['not_flagged_among_succeeded']['n']}" if ev["not_flagged_among_succeeded"] else " (none)")
        prot = _share(r["abstention"]["protected_accuracy"], "accuracy") if "abstention" in r else "-"
        lines.append(f"| {_row_attack(r)} | {eps} | {r['n']} | {_acc(r['purified'])} | {prot} | "
                     f"{_acc(ev['succeeded_and_not_flagged'])} | {among} | "
                     f"{r['error_over_threshold']['median']:.2f} |")
    for r in rows:
        if "within_eps" in r:
            d = r["distance"]
            lines += ["", f"On-manifold attack: distance of G(z) to x, median L-inf {d['linf']['median']:.3f}, "
                          f"median L2 {d['l2']['median']:.3f}; within the L-inf ball: "
                      + "; ".join(f"eps {e}: {_acc(w['within'])} (and evaded: {_acc(w['within_and_evaded'])})"
                                  for e, w in r["within_eps"].items()) + "."]
    return lines


def markdown_table(results: dict) -> str:
    s = results["settings"]
    p = s["projection"]
    lines = [f"Command: `{results['command']}`", ""] if results.get("command") else []
    lines += [
        f"Dataset: {s['dataset']} (test split), seed {results.get('seed', s['eval']['seed'])}; "
        f"projection L={p['steps']}, R={p['restarts']}, optimizer {p['optimizer']}"
        + (f", z on the sphere of radius {p['latent_radius']:g}*sqrt(D)" if p.get("latent_radius") else
           ", z unconstrained") + ". "
        "Accuracy with its 95% Wilson interval; AUC: reconstruction-error detection, clean vs attack.",
        "",
        "| threat model | attack | eps | n | no defense | purified | detection AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [results["clean"]] + results["cells"]
    for r in rows:
        eps = "-" if r["eps"] is None else f"{r['eps']:g}"
        auc = f"{r['detection']['auc']:.3f}" if "detection" in r else "-"
        attack = _row_attack(r)
        lines.append(f"| {_threat_title(r)} | {attack} | {eps} | {r['n']} | "
                     f"{_acc(r['undefended'])} | {_acc(r['purified'])} | {auc} |")
    lines += abstention_table(rows)
    lines += evasion_table(rows)
    blackbox = [r for r in results["cells"] if r["threat"] == "blackbox"]
    if blackbox:
        b = blackbox[0]["protocol"]
        remote = b.get("oracle", "").endswith("(V2 gRPC)")
        box = f"the served model at {b['oracle']}" if remote else "the defended model"
        first = f"{box}'s" if b["holdout_labels"] == "defended" else "true"
        lines += ["", f"Paper black-box protocol: substitute {b['substitute_arch']} trained on "
                      f"{b['attacker_images']} with {first} labels, grown to {b['training_points']} points by "
                      f"Jacobian augmentation (lambda {b['lambda']:g}, {b['rounds']} rounds of "
                      f"{b['epochs_per_round']} epochs), every new point labelled by {box} "
                      f"({b['oracle_queries']} queries); FGSM on the substitute, measured on {b['measured_images']}. "
                      f"Substitute accuracy on those clean images: {_acc(blackbox[0]['substitute_clean_accuracy'])}."]
    adaptive = [r for r in results["cells"] if r["threat"] == "adaptive" and r["attack"] != "manifold"]
    if adaptive:
        a = adaptive[0]["settings"]
        lines += ["", f"Adaptive: {a['pgd_steps']} PGD steps, gradient averaged over {a['eot_samples']} "
                      "independent projections per step (EOT), identity backward through the projection "
                      "(BPDA); evaluated with a fresh projection."]
        same = [r for r in adaptive if "oblivious_pgd_same_images" in r]
        if same:
            lines += ["", "| eps | oblivious PGD, same images | adaptive BPDA+EOT |", "|---|---|---|"]
            lines += [f"| {r['eps']:g} | {_acc(r['oblivious_pgd_same_images'])} | {_acc(r['purified'])} |"
                      for r in same]
    sw = results.get("sweeps") or {}
    for axis, what in (("L", "steps L"), ("R", "restarts R")):
        if sw.get(axis):
            adv_key = next(k for k in sw[axis][0] if k not in ("value", "projection", "clean"))
            lines += ["", f"Accuracy vs {what} ({sw['n']} images):", "",
                      f"| {axis} | clean, purified | {adv_key}, purified |", "|---|---|---|"]
            lines += [f"| {pt['value']} | {_acc(pt['clean'])} | {_acc(pt[adv_key])} |" for pt in sw[axis]]
    return "\n".join(lines) + "\n"


# --- figures --------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in label.lower()).strip("-")


def grid_figure(rows: list[tuple[str, "np.ndarray"]], path: Path, title: str) -> None:
    """One row per (name, images (k, C, H, W) in [0, 1]), drawn as one montage image
    (one axes, not k * rows: matplotlib spends seconds per axes on a busy CPU)."""
    plt = _plt()
    k = max(len(imgs) for _, imgs in rows)
    c, h, w = np.asarray(rows[0][1]).shape[1:]
    pad = 2
    canvas = np.ones(((h + pad) * len(rows) - pad, (w + pad) * k - pad, c), dtype=np.float32)
    for i, (_, imgs) in enumerate(rows):
        for j, img in enumerate(np.asarray(imgs)):
            canvas[i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = img.transpose(1, 2, 0)
    fig, ax = plt.subplots(figsize=(0.9 * k + 1.3, 0.9 * len(rows) + 0.5))
    ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([i * (h + pad) + h / 2 for i in range(len(rows))], [name for name, _ in rows], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_vs_eps(results: dict, path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for color, (threat, attack, style) in enumerate((("oblivious", "fgsm", "o"), ("oblivious", "pgd", "s"),
                                                     ("transfer", None, "^"), ("adaptive", "bpda", "D"),
                                                     ("blackbox", None, "v"))):
        rows = sorted((r for r in results["cells"] if r["threat"] == threat and r["eps"] is not None
                       and (attack is None or r["attack"] == attack)), key=lambda r: r["eps"])
        if not rows:
            continue
        name = {"transfer": "transfer", "adaptive": "BPDA+EOT", "blackbox": "paper black-box"}.get(threat) \
            or attack.upper()
        eps = [r["eps"] for r in rows]
        series = [("purified", "-", "purified")]
        if threat != "adaptive":
            series.append(("undefended", "--", "no defense"))
        for key, line, desc in series:
            acc = np.array([r[key]["accuracy"] for r in rows])
            lo = acc - np.array([r[key]["ci95"][0] for r in rows])
            hi = np.array([r[key]["ci95"][1] for r in rows]) - acc
            ax.errorbar(eps, acc, yerr=[lo, hi], fmt=style + line, color=f"C{color}", capsize=3,
                        label=f"{name}, {desc}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    clean = results["clean"]["purified"]["accuracy"]
    ax.axhline(clean, color="gray", lw=0.8, ls=":", label="clean, purified")
    ax.set_xlabel("eps (L-inf, images in [0, 1])")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{results['settings']['dataset']}: accuracy vs eps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def accuracy_vs_sweep(sweep: dict, axis: str, path: Path) -> bool:
    points = sweep.get(axis) or []
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    values = [p["value"] for p in points]
    for key in [k for k in points[0] if k not in ("value", "projection")]:
        acc = np.array([p[key]["accuracy"] for p in points])
        lo = acc - np.array([p[key]["ci95"][0] for p in points])
        hi = np.array([p[key]["ci95"][1] for p in points]) - acc
        ax.errorbar(values, acc, yerr=[lo, hi], fmt="o-", capsize=3, label=f"{key}, purified")
    ax.set_xlabel({"L": "projection steps L", "R": "random restarts R"}[axis])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"accuracy vs {axis} ({sweep['n']} images)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def roc_figure(curves: dict, path: Path, title: str) -> bool:
    """curves: label -> (fpr, tpr, auc)."""
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.2, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("false-positive rate (clean flagged)")
    ax.set_ylabel("true-positive rate (adversarial flagged)")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(results: dict, artifacts: dict, out_dir: Path) -> dict:
    """Write figures, results.md and results.json; return {kind: path} of what was written."""
    out_dir = Path(out_dir)
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    written = {}

    grids = artifacts.get("grids", {})
    if "clean" in grids:
        x, purified = grids["clean"]
        p = figs / "grid-clean.png"
        grid_figure([("clean", x.numpy()), ("purified", purified.numpy())], p, "clean test images")
        written["grid-clean"] = p
    for label, triple in grids.items():
        if label == "clean":
            continue
        x, adv, purified = (t.numpy() for t in triple)
        p = figs / f"grid-{_slug(label)}.png"
        grid_figure([("clean", x), ("adversarial", adv), ("purified", purified)], p, label)
        written[f"grid-{_slug(label)}"] = p
    if accuracy_vs_eps(results, figs / "accuracy-vs-eps.png"):
        written["accuracy-vs-eps"] = figs / "accuracy-vs-eps.png"
    for axis in ("L", "R"):
        p = figs / f"accuracy-vs-{axis}.png"
        if accuracy_vs_sweep(results.get("sweeps") or {}, axis, p):
            written[f"accuracy-vs-{axis}"] = p
    if roc_figure(artifacts.get("roc", {}), figs / "roc.png",
                  f"{results['settings']['dataset']}: detection by reconstruction error"):
        written["roc"] = figs / "roc.png"

    results["figures"] = {k: str(v.relative_to(out_dir)) for k, v in written.items()}
    (out_dir / "results.md").write_text(markdown_table(results))
    written["table"] = out_dir / "results.md"
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, out_dir / "results.json")
    written["results"] = out_dir / "results.json"
    return written


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (Path, tuple)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
