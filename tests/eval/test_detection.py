"""ROC/AUC and the threshold for a target false-positive rate, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from purifier import detection


def test_roc_and_auc_hand_computed():
    neg = [0.1, 0.2, 0.3, 0.4]
    pos = [0.35, 0.5, 0.6]
    fpr, tpr, thr = detection.roc_curve(neg, pos)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 4, 1 / 4, 2 / 4, 3 / 4, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1])
    assert thr[0] == np.inf and thr[1] == 0.6
    # 11 of the 12 (adversarial, clean) pairs are ordered right.
    assert detection.auc(fpr, tpr) == pytest.approx(11 / 12)


@pytest.mark.parametrize("neg,pos,expected", [
    ([0.5], [0.5], 0.5),                      # a tie counts one half
    ([0.1, 0.2], [0.3, 0.4], 1.0),
    ([0.3, 0.4], [0.1, 0.2], 0.0),
    ([0.1, 0.5, 0.5], [0.5, 0.9], (1 + 0.5 + 0.5 + 1 + 1 + 1) / 6),
])
def test_auc_is_the_mann_whitney_statistic(neg, pos, expected):
    assert detection.roc_auc(neg, pos) == pytest.approx(expected)


def test_auc_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300).round(1), rng.normal(0.7, 1, 200).round(1)  # with ties
    labels = np.r_[np.zeros(300), np.ones(200)]
    assert detection.roc_auc(neg, pos) == pytest.approx(metrics.roc_auc_score(labels, np.r_[neg, pos]))


def test_threshold_for_a_target_fpr():
    neg = np.arange(1, 101) / 100            # 0.01 .. 1.00
    t = detection.threshold_for_fpr(neg, 0.05)
    assert t == pytest.approx(0.95)          # 1.00, 0.99, 0.98, 0.97, 0.96 lie above it
    assert detection.rates_at(t, neg)["fpr"] == pytest.approx(0.05)
    assert detection.rates_at(detection.threshold_for_fpr(neg, 0.0), neg)["fpr"] == 0.0
    rates = detection.rates_at(0.5, neg, positives=[0.4, 0.6, 0.7, 0.8])
    assert rates == {"fpr": 0.5, "tpr": 0.75}
    with pytest.raises(ValueError):
        detection.threshold_for_fpr(neg, 1.5)


def test_flag_rate_counts_strictly_above_with_a_wilson_interval():
    from purifier.stats import wilson_interval

    r = detection.flag_rate(0.2, [0.1, 0.2, 0.3, 0.5])
    assert (r["flagged"], r["n"], r["rate"]) == (2, 4, 0.5)
    assert r["ci95"] == list(wilson_interval(2, 4))


def test_abstention_exact_small_case():
    # 5 attacked images: errors above 0.5 are rejected (indices 1, 3); correct at 0, 1, 2.
    correct = [True, True, True, False, False]
    errors = [0.1, 0.9, 0.5, 0.7, 0.2]
    a = detection.abstention(correct, errors, 0.5, attacked=True)
    assert (a["rejected"]["rate"], a["rejected"]["count"], a["rejected"]["n"]) == (2 / 5, 2, 5)
    # accepted: 0, 2, 4 -> correct 0, 2
    assert (a["accepted_accuracy"]["accuracy"], a["accepted_accuracy"]["n"]) == (2 / 3, 3)
    # protected: correct and accepted (0, 2) + rejected (1, 3) = 4 of 5
    assert (a["protected_accuracy"]["accuracy"], a["protected_accuracy"]["correct"]) == (4 / 5, 4)
    # the same images, clean: a rejection protects nothing
    c = detection.abstention(correct, errors, 0.5, attacked=False)
    assert c["protected_accuracy"]["accuracy"] == 2 / 5 and c["rejected"]["rate"] == 2 / 5
    lo, hi = a["protected_accuracy"]["ci95"]
    assert lo < 0.8 < hi


def test_abstention_when_everything_or_nothing_is_rejected():
    everything = detection.abstention([False, False], [1.0, 2.0], 0.5, attacked=True)
    assert everything["protected_accuracy"]["accuracy"] == 1.0 and everything["accepted_accuracy"]["n"] == 0
    assert everything["accepted_accuracy"]["accuracy"] is None      # JSON null, and equal to itself on a rerun
    nothing = detection.abstention([True, False], [0.1, 0.2], 0.5, attacked=True)
    assert nothing["rejected"]["rate"] == 0.0
    assert nothing["protected_accuracy"]["accuracy"] == nothing["accepted_accuracy"]["accuracy"] == 0.5
    with pytest.raises(ValueError, match="3 predictions for 2 scores"):
        detection.abstention([True] * 3, [0.1, 0.2], 0.5, attacked=True)


def test_calibrate_measures_the_threshold_on_held_out_images(tiny_gen):
    import torch

    from purifier.projection import preset

    torch.manual_seed(0)
    x = torch.rand(12, 1, 8, 8)
    cfg = preset("fast", has_encoder=False, steps=3, restarts=1, seed=0)
    # the calibration images themselves as the held-out set: same seeds, same errors, same rate
    same = detection.calibrate(tiny_gen, x, cfg, 0.25, batch_size=4, progress=False, heldout=x)
    assert same["heldout"]["rate"] == same["fpr"] and same["heldout"]["n"] == 12
    other = detection.calibrate(tiny_gen, x, cfg, 0.25, batch_size=4, progress=False, heldout=x[:0])
    assert "heldout" not in other and other["threshold"] == same["threshold"]


def test_calibrate_prints_and_records_the_held_out_rate(tiny_model_dir, tiny_data_dir, capsys):
    from purifier import checkpoint, cli

    rc = cli.main(["calibrate", str(tiny_model_dir), "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
                   "--target-fpr", "0.1", "--n", "40", "--holdout", "100", "--heldout-n", "30",
                   "--steps", "3", "--restarts", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    det = checkpoint.read_card(tiny_model_dir)["detection"]
    h = det["heldout"]
    assert h["n"] == 30 == det["data"]["heldout_n"] and h["rate"] == h["flagged"] / 30
    assert h["ci95"][0] <= h["rate"] <= h["ci95"][1]
    out = capsys.readouterr().out
    assert f"{h['rate']:.1%} [95% {h['ci95'][0]:.1%}, {h['ci95'][1]:.1%}] ({h['flagged']}/30) of held-out" in out
    # what is left of the slice after the calibration images caps the held-out set
    cli.main(["calibrate", str(tiny_model_dir), "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
              "--n", "90", "--holdout", "100", "--steps", "3", "--restarts", "2", "--device", "cpu",
              "--no-progress", "--dry-run"])
    assert '"n": 10' in capsys.readouterr().out


def test_calibrate_reports_the_share_of_clean_images_under_the_precise_bar(tiny_gen):
    import torch

    from purifier.projection import preset, start_errors

    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    base = preset("fast", has_encoder=False, steps=2, restarts=2, seed=0)
    assert "precise_step" not in detection.calibrate(tiny_gen, x, base, 0.25, batch_size=4, progress=False)
    starts = torch.cat([start_errors(tiny_gen, x[i:i + 4], base.with_(seed=i)) for i in range(0, 12, 4)])
    bar = float(starts.sort().values[8])                      # 8 of the 12 start under it
    cfg = base.with_(precise_below=bar, precise_lr=0.01)
    p = detection.calibrate(tiny_gen, x, cfg, 0.25, batch_size=4, progress=False)["precise_step"]
    assert (p["under"], p["n"], p["below"]) == (8, 12, bar) and p["clean_share_under"] == 8 / 12
    assert p["ci95"][0] < 8 / 12 < p["ci95"][1]
    everything = detection.calibrate(tiny_gen, x, cfg.with_(precise_below=1.0), 0.25, batch_size=4, progress=False)
    assert everything["precise_step"]["clean_share_under"] == 1.0
