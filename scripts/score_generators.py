"""Score generators on the criterion `train-gan --select-by` uses, plus the oblivious attack:
purified accuracy on held-out *training* images (the last 5,000 of the training split), clean,
under a transfer FGSM crafted on the card's substitute and under an oblivious FGSM crafted on
the classifier itself. No encoder start (an encoder belongs to one generator), so every
generator is projected the same way: by default the selection's projection (the paper's search
shortened to L=100 R=4, bf16 where native: ~2 minutes per generator at 300 images on one CPU
thread), or any other (`--projection fast`: ~20 s, but it ranks generators against their
training; docs/results.md, "Choosing a generator"). Cheap enough to compare generators between
leases.

    python scripts/score_generators.py --model-dir models/mnist --dataset mnist --n 300 \
        --out runs/score-mnist.json  shipped=models/mnist/generator.safetensors \
        snap-50k=runs/gpu-lease/gan-mnist/snapshots/iter050000-G_ema.safetensors \
        ema-28k=runs/gan-mnist/checkpoint.28k#G_ema

Each generator is LABEL=PATH: a generator .safetensors file, or a `train-gan` checkpoint
folder with #G or #G_ema. Results already in --out are kept (the run resumes by label).
Every generator sees the same images and the same attacked images; accuracies carry 95%
Wilson intervals, and --reference LABEL adds paired differences against that generator.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from purifier import checkpoint, models
from purifier.evaluation import attacks
from purifier.benchmark.bench import parse_config
from purifier.projection import preset
from purifier.stats import paired, wilson_interval
from purifier.training import parts
from purifier.training import selection
from purifier.training.selection import held_out


def load_generator(spec: str) -> torch.nn.Module:
    path, _, which = spec.partition("#")
    if Path(path).is_dir():
        state = parts.load(Path(path), map_location="cpu")
        key = which or "G"
        g_state = state[key]
        cfg = json.loads(state["config"])  # the run's settings; images 28x28x1 (MNIST, Fashion-MNIST)
        G, _ = models.gan_pair(1, 28, 28, cfg.get("latent_dim", 128), cfg.get("dim", 64))
        G.load_state_dict(g_state)
        return G.eval()
    return checkpoint.load_module(path, "generator")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("generators", nargs="+", metavar="LABEL=PATH")
    ap.add_argument("--model-dir", required=True, help="classifier.safetensors and substitute.safetensors")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--projection", default=None,
                    help="default: the selection's (purifier.training.selection.PROJECTION); else a preset, or "
                         "BASE:key=value,... as `purifier bench --config` takes (e.g. fast, or "
                         "paper:steps=200,restarts=10); never with an encoder start")
    ap.add_argument("--reference", default=None, help="label to pair every other generator against")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.projection is None:
        proj, described = selection.projection(a.seed), "the selection's (paper, L=100 R=4, bf16 where native)"
    else:
        proj = preset(parse_config(f"p={a.projection}")[1], has_encoder=False, seed=a.seed)  # NAME=BASE[:k=v,...]
        described = a.projection
    md = Path(a.model_dir)
    clf = checkpoint.load_module(md / "classifier.safetensors", "classifier")
    sub = checkpoint.load_module(md / "substitute.safetensors", "classifier")
    x, y = held_out(a.dataset, a.data_dir, a.n, seed=a.seed)
    sets = {"clean": x, "transfer": attacks.fgsm(sub, x, y, a.eps), "oblivious": attacks.fgsm(clf, x, y, a.eps)}
    out_path = Path(a.out)
    doc = json.loads(out_path.read_text()) if out_path.exists() else {}
    cmd = ("python scripts/score_generators.py "
           + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                      if k != "generators" and v is not None)
           + " " + " ".join(a.generators))
    doc.setdefault("commands", [])
    if cmd not in doc["commands"]:
        doc["commands"].append(cmd)  # one per invocation that added generators to this file
    doc.update({"measured_on": f"{a.n} held-out training images of {a.dataset} (last 5000 of the training split, "
                       f"seed {a.seed}); FGSM eps {a.eps}: transfer from {md}/substitute, oblivious on "
                       f"{md}/classifier; projection {described} without encoder start; CPU, {a.threads} thread(s)"})
    results = doc.setdefault("generators", {})
    for spec in a.generators:
        label, _, path = spec.partition("=")
        if label in results and "correct" in results[label]:
            print(f"{label}: kept from {out_path}")
            continue
        G = load_generator(path)
        t0 = time.time()
        row = {"path": path, "correct": {}}
        for name, imgs in sets.items():
            p, e = selection.purify(G, imgs, proj)
            with torch.no_grad():
                ok = (clf(p).argmax(1) == y)
            k = int(ok.sum())
            row[name] = {"accuracy": round(k / len(y), 4), "ci95": [round(v, 4) for v in wilson_interval(k, len(y))],
                         "reconstruction_error": round(float(e.mean()), 6)}
            row["correct"][name] = ok.int().tolist()
        row["seconds"] = round(time.time() - t0, 1)
        results[label] = row
        print(label, {k: row[k]["accuracy"] for k in sets}, f"{row['seconds']} s", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=1))
    if a.reference and a.reference in results:
        ref = results[a.reference]["correct"]
        for label, row in results.items():
            if label != a.reference:
                row["minus_reference"] = {}
                for k in sets:
                    d = paired(torch.tensor(row["correct"][k]) - torch.tensor(ref[k]))
                    row["minus_reference"][k] = {"mean": round(d["mean"], 4), "n": d["n"],
                                                 "ci95": [round(u, 4) for u in d["ci95"]]}
        doc["reference"] = a.reference
    out_path.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
