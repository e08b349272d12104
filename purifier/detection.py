"""Detection from reconstruction errors: an input is flagged adversarial when its projection
error ||G(z*) - x||^2 / (C*H*W) is above a threshold (the rule the service applies:
``error > threshold``).

Scores are 1-D arrays; "negatives" are clean images, "positives" adversarial ones.
"""

from __future__ import annotations

import math

import numpy as np


def _as_array(scores) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("need at least one score")
    if not np.isfinite(a).all():
        raise ValueError("scores contain NaN or Inf")
    return a


def roc_curve(negatives, positives) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule ``score > t`` for every distinct threshold t.

    Returns (fpr, tpr, thresholds), fpr and tpr rising from (0, 0) (t = +inf) to (1, 1);
    point i is the rule ``score >= thresholds[i]``, i.e. ``score > the next lower score``.
    """
    neg, pos = _as_array(negatives), _as_array(positives)
    scores = np.concatenate([neg, pos])
    labels = np.concatenate([np.zeros(neg.size), np.ones(pos.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # The last index of each run of equal scores: tied scores move together.
    distinct = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(labels)[distinct]
    fp = (distinct + 1) - tp
    fpr = np.r_[0.0, fp / neg.size]
    tpr = np.r_[0.0, tp / pos.size]
    thresholds = np.r_[np.inf, scores[distinct]]
    return fpr, tpr, thresholds


def auc(fpr, tpr) -> float:
    """Area under a ROC curve by the trapezoid rule (ties count one half, as Mann-Whitney)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def roc_auc(negatives, positives) -> float:
    return auc(*roc_curve(negatives, positives)[:2])


def threshold_for_fpr(negatives, target_fpr: float) -> float:
    """The lowest threshold t, among the clean scores, whose rule ``score > t`` flags at most
    ``target_fpr`` of the clean scores: the (floor(target_fpr * n) + 1)-th largest score."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target false-positive rate must be in [0, 1), got {target_fpr}")
    neg = np.sort(_as_array(negatives))[::-1]   # descending
    k = int(math.floor(target_fpr * neg.size + 1e-9))
    return float(neg[min(k, neg.size - 1)])


def rates_at(threshold: float, negatives, positives=None) -> dict:
    """False-positive rate on the negatives (and true-positive rate on the positives) of
    the rule ``score > threshold``."""
    out = {"fpr": float(np.mean(_as_array(negatives) > threshold))}
    if positives is not None:
        out["tpr"] = float(np.mean(_as_array(positives) > threshold))
    return out


def flag_rate(threshold: float, scores) -> dict:
    """How many of ``scores`` the rule ``score > threshold`` flags, as a rate with its 95%
    Wilson interval: the false-positive rate when the scores are clean images'."""
    from .stats import wilson_interval

    a = _as_array(scores)
    k = int((a > threshold).sum())
    return {"rate": k / a.size, "ci95": list(wilson_interval(k, a.size)), "flagged": k, "n": int(a.size)}


def reconstruction_errors(generator, images, cfg, encoder=None, batch_size: int = 250,
                          progress: bool = True, desc: str = "calibrate") -> np.ndarray:
    """(N,) reconstruction errors of ``images`` (N, C, H, W) under projection settings ``cfg``
    (seeded per batch from ``cfg.seed``, so a rerun gives the same errors)."""
    import torch
    from tqdm.auto import tqdm

    from .projection import project

    errors = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            x = images[start: start + batch_size]
            seed = None if cfg.seed is None else cfg.seed + start
            errors.append(project(generator, x, cfg.with_(seed=seed), encoder).errors.cpu())
            bar.update(len(x))
    return torch.cat(errors).numpy()


def calibrate(generator, images, cfg, target_fpr: float, encoder=None, batch_size: int = 250,
              progress: bool = True, heldout=None) -> dict:
    """Purify clean validation ``images`` (N, C, H, W) with projection settings ``cfg`` and
    pick the threshold for ``target_fpr``; returns the model card's ``detection`` section.

    The rate measured on the images that chose the threshold is at most the target by
    construction; ``heldout`` (M, C, H, W), other clean images, gives the rate a server will
    see (section ``heldout``: rate, 95% interval, flagged, n).

    The threshold only means something for the projection settings it was measured with
    (fewer steps leave larger errors), so those settings are recorded beside it.
    """
    from dataclasses import asdict

    errors = reconstruction_errors(generator, images, cfg, encoder, batch_size, progress)
    threshold = threshold_for_fpr(errors, target_fpr)
    measured = rates_at(threshold, errors)["fpr"]
    section = {"threshold": threshold, "rule": "adversarial when reconstruction error > threshold",
               "target_fpr": target_fpr, "fpr": measured, "n": int(errors.size),
               "clean_error": {"mean": float(errors.mean()), "median": float(np.median(errors)),
                               "max": float(errors.max())},
               "projection": asdict(cfg)}
    if heldout is not None and len(heldout):
        held_errors = reconstruction_errors(generator, heldout, cfg, encoder, batch_size, progress, "held-out")
        section["heldout"] = flag_rate(threshold, held_errors)
    if cfg.precise_below:
        section["precise_step"] = precise_share(generator, images, cfg, encoder, batch_size)
    return section


def precise_share(generator, images, cfg, encoder=None, batch_size: int = 250) -> dict:
    """How many clean ``images`` take the projection's precise step (best start error under
    ``cfg.precise_below``), with its 95% Wilson interval. The bar is absolute: on data it does
    not suit, clean images miss it (and get the coarse step's looser fit) or attacked ones pass."""
    from .projection import start_settings
    from .stats import wilson_interval

    # the starts the calibration's own projections began from (same per-batch seeds)
    starts = reconstruction_errors(generator, images, start_settings(cfg), encoder, batch_size, progress=False)
    k, n = int((starts < cfg.precise_below).sum()), int(starts.size)
    return {"below": cfg.precise_below, "clean_share_under": k / n, "ci95": list(wilson_interval(k, n)),
            "under": k, "n": n, "start_error": {"median": float(np.median(starts)),
                                                "q99": float(np.quantile(starts, 0.99))}}


def abstention(correct, scores, threshold: float, attacked: bool) -> dict:
    """What a caller of a server that rejects flagged inputs (``--on-flagged reject``) gets on
    these images: ``correct`` (N,) bool, the classifier right on the purified image; ``scores``
    (N,) their reconstruction errors; ``attacked``: the images are adversarial (a rejection
    then protects the caller) or clean (a rejection is a refused clean input).

    - ``rejected``: share with error > threshold (on clean images: the clean rejection rate);
    - ``accepted_accuracy``: accuracy on the images let through (None when none is);
    - ``protected_accuracy``: (correct and accepted + rejected if attacked) / N; on clean
      images only correct and accepted counts.

    Each with its 95% Wilson interval.
    """
    from .stats import wilson_interval

    correct = np.asarray(correct, dtype=bool).reshape(-1)
    rejected = _as_array(scores) > threshold
    if correct.size != rejected.size:
        raise ValueError(f"{correct.size} predictions for {rejected.size} scores")
    n, k_rej = int(rejected.size), int(rejected.sum())
    n_acc, k_acc = n - k_rej, int((correct & ~rejected).sum())
    k_prot = k_acc + (k_rej if attacked else 0)

    def share(k: int, m: int, key: str) -> dict:
        return {key: k / m if m else None, "ci95": list(wilson_interval(k, m)),
                "count" if key == "rate" else "correct": k, "n": m}

    return {"threshold": float(threshold), "attacked": bool(attacked),
            "rejected": share(k_rej, n, "rate"),
            "accepted_accuracy": share(k_acc, n_acc, "accuracy"),
            "protected_accuracy": share(k_prot, n, "accuracy")}
