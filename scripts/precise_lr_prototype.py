"""The prototype behind ProjectionConfig.precise_below / precise_lr (docs/speed.md, "A step size
per image"), kept because it also measured what did *not* work: deciding the step size after
`split` > 0 steps. fast's search with a per-image Adam step size: images whose best error so far
(split 0: their best start's, before any step) is under BAR continue at LR_LOW, the rest at
fast's 0.1. Paired with the shipped models' paper-setting evaluations (`--reference-eval`
caches, runs/s4/eval-*-paper-cpu) on the first 1,000 seeded (seed 0) test images.

    DS=mnist RESTARTS=16 python scripts/precise_lr_prototype.py SPLIT:BAR:LR_LOW [...]
"""
import sys, time, torch
torch.set_num_threads(2)
from purifier import checkpoint, data, projection as P
from purifier.benchmark.bench import EvalReference, fgsm_in_chunks, _substitute
from purifier.stats import paired

def search(G, step_fn, z0, x, cfg, split, thr, lr_low):
    B, R, D = z0.shape
    z = P.to_sphere(z0.reshape(B * R, D).clone(), cfg.latent_radius)
    target = x.repeat_interleave(R, 0)
    best_err = torch.full((B * R,), float("inf")); best_z = z.clone()
    s1 = torch.zeros_like(z); s2 = torch.zeros_like(z); lr = torch.full((B * R, 1), cfg.lr)
    for step in range(cfg.steps):
        err, grad = step_fn(z, target)
        with torch.no_grad():
            better = err < best_err
            best_err = torch.where(better, err, best_err); best_z = torch.where(better.unsqueeze(1), z, best_z)
            if split == 0 and step == 0:   # decide on the starts' errors, before any step
                per_image = best_err.view(B, R).amin(1).repeat_interleave(R)
                lr = torch.where((per_image < thr).unsqueeze(1), torch.full_like(lr, lr_low), lr)
            t = step + 1
            s1.mul_(0.9).add_(grad, alpha=0.1); s2.mul_(0.999).addcmul_(grad, grad, value=0.001)
            z = z - lr * (s1 / (1 - 0.9 ** t)) / (s2 / (1 - 0.999 ** t)).sqrt_().add_(1e-8)
            z = P.to_sphere(z, cfg.latent_radius)
        if step + 1 == cfg.prune_after and R > 1:
            idx = best_err.view(B, R).topk(1, dim=1, largest=False).indices
            rows = (idx + torch.arange(B).unsqueeze(1) * R).reshape(-1)
            z, best_z, best_err, target, s1, s2, lr = z[rows], best_z[rows], best_err[rows], target[rows], s1[rows], s2[rows], lr[rows]
            R = 1
        if step + 1 == split:
            lr = torch.where((best_err < thr).unsqueeze(1), torch.full_like(lr, lr_low), lr)
    out_z, _ = P._settle(G, best_z, best_err, z, target, B, R, cfg.precision != "fp32")
    return out_z

def run(G, E, x, cfg, split, thr, lr_low, seed):
    outs = []
    for i in range(0, len(x), 100):
        xb = x[i:i+100]
        c = cfg.with_(seed=seed + i, precision=P.resolve_precision(cfg.precision, xb.device))
        with P._frozen(G), P._frozen(E):
            z0 = P._initial_latents(G, E, xb, c, P._rng(c, xb.device))
            zs = search(G, P._step_function(G, c, "cpu"), z0, xb, c, split, thr, lr_low)
            outs.append(P._reconstruct(G, zs, xb))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

import os
DS = os.environ.get("DS", "mnist"); RESTARTS = int(os.environ.get("RESTARTS", "16"))
EVAL = {"mnist": "runs/s4/eval-mnist-paper-cpu", "fashion-mnist": "runs/s4/eval-fashion-mnist-paper-cpu"}[DS]
b = checkpoint.load_bundle(f"models/{DS}"); G, E, clf = b.generator, b.encoder, b.classifier
test = data.load(DS, "test", f"data/{DS}"); sub = data.subset(test, 1000, seed=0)
x, y = sub.images, sub.labels
ref = EvalReference(EVAL, b.path, test, P.PAPER, 0, 1000, ("clean", "fgsm", "transfer"))
xs = {"clean": x, "fgsm": fgsm_in_chunks(clf, x, y, 0.3), "transfer": fgsm_in_chunks(_substitute(b.path, torch.device("cpu")), x, y, 0.3)}
refs = {c: ref.load(c, 0.3, xs[c]) for c in xs}
variants = [tuple(map(float, v.split(":"))) for v in sys.argv[1:]]   # split:thr:lr_low
for split, thr, lr_low in variants:
    t = time.time(); row = []
    for c in xs:
        imgs, errs = run(G, E, xs[c], P.preset("fast", restarts=RESTARTS), int(split), thr, lr_low, 0)
        with torch.no_grad():
            pred = clf(imgs).argmax(1)
        acc = (pred == y).double(); racc = (refs[c]["pred"] == y).double()
        d = paired(acc - racc)
        row.append(f"{c} {d['mean']*100:+.1f} [{d['ci95'][0]*100:+.1f},{d['ci95'][1]*100:+.1f}]")
        if c == "clean":
            pe = refs[c]["errors"].double(); row.append(f"err {((errs.double().mean()/pe.mean())-1)*100:+.1f}%")
    print(f"{DS} R={RESTARTS} split {int(split)} thr {thr} lr_low {lr_low}: " + " | ".join(row), f"{time.time()-t:.0f}s", flush=True)
