"""Paired comparison of the ``paper`` and ``original`` projection presets (issue 9, item 8).

The two presets differ only in which step answers (``select``: PAPER the best step seen,
ORIGINAL the last step's forward, as the original Defense-GAN code). From the same starts they
follow the same trajectory, so one search gives both answers: the search runs once with PAPER,
a wrapper around its step function keeps the last forward's (z, error), and the original's
answer is the restart with the lowest error there. Before measuring, the script checks on a
small batch that these answers equal ``project(..., PAPER)`` and ``project(..., ORIGINAL)``.

    .venv/bin/python scripts/original_vs_paper.py models/mnist --n 200 --sets clean --threads 1

The images are ``purifier eval``'s seeded choice (data.subset(test, n, seed)); FGSM is computed
on the classifier alone (defense-oblivious), true labels, clipped to [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from purifier import checkpoint, data, projection  # noqa: E402
from purifier.evaluation import attacks  # noqa: E402
from purifier.evaluation.evaluate import accuracy  # noqa: E402
from purifier.projection import ORIGINAL, PAPER, project  # noqa: E402


def both_answers(generator, x: torch.Tensor, seed: int):
    """(paper images, paper errors, original images, original errors) from one search."""
    cfg = PAPER.with_(seed=seed)
    z0 = projection._initial_latents(generator, None, x, cfg, projection._rng(cfg, x.device))  # (B, R, D)
    step = projection._step_function(generator, cfg, x.device.type)
    last = {}

    def recording_step(z, target):
        err, grad = step(z, target)
        last["z"], last["err"] = z, err          # the forward of this step, before its update
        return err, grad

    z_paper, _ = projection._search(generator, recording_step, z0, x, cfg)
    B, R, _ = z0.shape
    rows = torch.arange(B) * R + last["err"].view(B, R).argmin(1)
    z_orig = last["z"][rows]
    return (*projection._reconstruct(generator, z_paper, x), *projection._reconstruct(generator, z_orig, x))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--sets", default="clean,fgsm", help="comma-separated: clean, fgsm")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = checkpoint.load_bundle(args.model_dir, "cpu", need_classifier=True)
    G, clf = bundle.generator.eval(), bundle.classifier.eval()
    test = data.load(bundle.card["dataset"], "test")
    chosen = data.subset(test, args.n, args.seed)
    x_all, y_all = chosen.images, chosen.labels

    # The check: one search's two answers are the library's two presets, exactly.
    xc = x_all[:3]
    pi, pe, oi, oe = both_answers(G, xc, seed=12345)
    ref_p, ref_o = project(G, xc, PAPER.with_(seed=12345)), project(G, xc, ORIGINAL.with_(seed=12345))
    torch.testing.assert_close(pi, ref_p.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(oi, ref_o.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(oe, ref_o.errors, rtol=1e-5, atol=1e-8)
    print("check: one search gives project(PAPER) and project(ORIGINAL) exactly", flush=True)

    results = {"command": " ".join(["scripts/original_vs_paper.py"] + (argv or sys.argv[1:])),
               "model_dir": args.model_dir, "n": len(y_all), "seed": args.seed, "threads": args.threads,
               "projection": {"steps": PAPER.steps, "restarts": PAPER.restarts, "lr": PAPER.lr,
                              "momentum": PAPER.momentum}, "sets": {}}
    for name in [s for s in args.sets.split(",") if s]:
        t0 = time.time()
        correct = {"paper": [], "original": []}
        errors = {"paper": [], "original": []}
        for s in range(0, len(y_all), args.batch):
            x, y = x_all[s:s + args.batch], y_all[s:s + args.batch]
            if name == "fgsm":
                x = attacks.fgsm(clf, x, y, args.eps)
            elif name != "clean":
                raise SystemExit(f"unknown set {name!r}")
            pi, pe, oi, oe = both_answers(G, x, seed=1000 * args.seed + s)
            with torch.no_grad():
                correct["paper"].append(clf(pi).argmax(1) == y)
                correct["original"].append(clf(oi).argmax(1) == y)
            errors["paper"].append(pe)
            errors["original"].append(oe)
            print(f"{name}: {s + len(y)}/{len(y_all)} images, {time.time() - t0:.0f} s", flush=True)
        c = {k: torch.cat(v) for k, v in correct.items()}
        e = {k: torch.cat(v) for k, v in errors.items()}
        row = {k: {**accuracy(c[k]), "reconstruction_error_mean": float(e[k].mean()),
                   "reconstruction_error_median": float(e[k].median())} for k in c}
        row["paired"] = {"both_right": int((c["paper"] & c["original"]).sum()),
                         "only_paper_right": int((c["paper"] & ~c["original"]).sum()),
                         "only_original_right": int((~c["paper"] & c["original"]).sum()),
                         "same_answer_error": int((e["paper"] == e["original"]).sum()),
                         "error_ratio_original_over_paper_mean": float((e["original"] / e["paper"]).mean())}
        row["seconds"] = round(time.time() - t0, 1)
        if name == "fgsm":
            row["eps"] = args.eps
        results["sets"][name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
