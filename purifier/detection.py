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


def calibrate(generator, images, cfg, target_fpr: float, encoder=None, batch_size: int = 250,
              progress: bool = True) -> dict:
    """Purify clean validation ``images`` (N, C, H, W) with projection settings ``cfg`` and
    pick the threshold for ``target_fpr``; returns the model card's ``detection`` section.

    The threshold only means something for the projection settings it was measured with
    (fewer steps leave larger errors), so those settings are recorded beside it.
    """
    from dataclasses import asdict

    import torch
    from tqdm.auto import tqdm

    from .projection import project

    errors = []
    with tqdm(total=len(images), desc="calibrate", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            x = images[start: start + batch_size]
            seed = None if cfg.seed is None else cfg.seed + start
            errors.append(project(generator, x, cfg.with_(seed=seed), encoder).errors.cpu())
            bar.update(len(x))
    errors = torch.cat(errors).numpy()
    threshold = threshold_for_fpr(errors, target_fpr)
    measured = rates_at(threshold, errors)["fpr"]
    return {"threshold": threshold, "rule": "adversarial when reconstruction error > threshold",
            "target_fpr": target_fpr, "fpr": measured, "n": int(errors.size),
            "clean_error": {"mean": float(errors.mean()), "median": float(np.median(errors)),
                            "max": float(errors.max())},
            "projection": asdict(cfg)}
