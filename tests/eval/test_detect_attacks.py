"""The attacks that also evade the detector (issue 13): detection-aware BPDA+EOT PGD and the
on-manifold attack of Athalye et al. 2018, on the toy task with a generator of known range, and
their rows in `purifier eval`."""

from __future__ import annotations

import json

import torch
from torch import nn

from purifier import checkpoint, cli
from purifier.evaluation import attacks
from purifier.projection import ProjectionConfig, project


class TwoParamGenerator(nn.Module):
    """A 2-dimensional range shaped like the toy data: top half minus bottom half (the class
    feature) and overall brightness. Toy images are near it (their pixel noise is off it), so the
    projection removes noise and keeps the class feature."""

    latent_dim = 2

    def forward(self, z):
        sign = torch.ones(1, 1, 8, 8)
        sign[:, :, 4:] = -1
        img = 0.5 + 0.25 * torch.tanh(z[:, 0]).view(-1, 1, 1, 1) * sign + 0.1 * torch.tanh(z[:, 1]).view(-1, 1, 1, 1)
        return img.expand(-1, 1, 8, 8)


class PixelGenerator(nn.Module):
    """Range: every image in (0, 1)^64, so the projection keeps any perturbation."""

    latent_dim = 64

    def forward(self, z):
        return torch.sigmoid(z).view(-1, 1, 8, 8)


CFG = ProjectionConfig(steps=30, restarts=2, optimizer="adam", lr=0.2)


def _errors(gen, x, seed=123):
    return project(gen, x, CFG.with_(seed=seed)).errors


def test_the_error_term_keeps_the_adversarial_image_near_the_range(toy_classifier, make_toy_data):
    x, y = make_toy_data(32, seed=5)
    gen = TwoParamGenerator()
    thr = float(_errors(gen, x).median())          # the toy's "card threshold": half the clean images
    kw = dict(steps=8, eot_samples=2, seed=3, select=False)
    blind = attacks.bpda_eot_detect_pgd(toy_classifier, gen, x, y, 0.3, CFG, thr, 0.0, **kw)
    aware = attacks.bpda_eot_detect_pgd(toy_classifier, gen, x, y, 0.3, CFG, thr, 30.0, **kw)
    for adv in (blind, aware):
        assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    e_blind, e_aware = _errors(gen, blind).mean(), _errors(gen, aware).mean()
    assert e_aware < 0.5 * e_blind                 # the detector's score is what lambda buys down
    assert e_blind > thr                           # ...and without it the attack is flagged


def test_with_lambda_zero_it_breaks_a_pipeline_that_keeps_the_attack(toy_classifier, make_toy_data):
    x, y = make_toy_data(32, seed=4)
    gen = PixelGenerator()
    cfg = ProjectionConfig(steps=40, restarts=1, optimizer="adam", lr=0.2)

    def defended_accuracy(images, seed):
        purified = project(gen, images, cfg.with_(seed=seed)).images
        return float((toy_classifier(purified).argmax(1) == y).float().mean())

    assert defended_accuracy(x, 0) > 0.9
    adv = attacks.bpda_eot_detect_pgd(toy_classifier, gen, x, y, 0.2, cfg, 1.0, 0.0, steps=8,
                                      eot_samples=2, seed=1)
    assert defended_accuracy(adv, 99) < 0.3


def test_selection_returns_an_iterate_that_succeeded_and_evaded(toy_classifier, make_toy_data):
    """With an infinite threshold nothing is flagged, so the attacker keeps, per image, an iterate
    that fooled every EOT draw wherever one existed, even if a later step undid it."""
    x, y = make_toy_data(16, seed=6)
    gen = PixelGenerator()
    cfg = ProjectionConfig(steps=40, restarts=1, optimizer="adam", lr=0.2)
    adv = attacks.bpda_eot_detect_pgd(toy_classifier, gen, x, y, 0.2, cfg, float("inf"), 0.0, steps=8,
                                      eot_samples=2, seed=1)
    purified = project(gen, adv, cfg.with_(seed=7)).images
    assert float((toy_classifier(purified).argmax(1) != y).float().mean()) > 0.7


def test_with_nothing_evading_selection_returns_the_last_iterate(toy_classifier, make_toy_data):
    x, y = make_toy_data(8, seed=8)
    gen = TwoParamGenerator()
    kw = dict(steps=4, eot_samples=2, seed=5)
    # threshold 0: every draw is flagged, no iterate scores, so the plain PGD answer comes back
    picked = attacks.bpda_eot_detect_pgd(toy_classifier, gen, x, y, 0.3, CFG, 0.0, 0.0, select=True, **kw)
    last = attacks.bpda_eot_detect_pgd(toy_classifier, gen, x, y, 0.3, CFG, 0.0, 0.0, select=False, **kw)
    assert torch.equal(picked, last)
    start = attacks.bpda_eot_detect_pgd(toy_classifier, gen, x, y, 0.3, CFG, 0.0, 0.0, select=False,
                                        steps=0, eot_samples=2, seed=5)
    assert not torch.equal(last, start)            # the walk moved: the equality above says something


def test_on_manifold_returns_a_misclassified_image_on_the_range(toy_classifier, make_toy_data):
    x, y = make_toy_data(16, seed=7)
    gen = TwoParamGenerator()
    adv, found = attacks.on_manifold(toy_classifier, gen, x, y, CFG, steps=60, search_steps=3, lr=0.1,
                                     kappa=1.0, seed=2)
    assert found.float().mean() > 0.8
    assert (toy_classifier(adv[found]).argmax(1) != y[found]).all()
    # On the range: the defense reconstructs it (almost) exactly, so it is not flagged...
    assert _errors(gen, adv)[found].max() < 0.2 * _errors(gen, x).min()
    # ...and the projection does not undo the attack.
    purified = project(gen, adv, CFG.with_(seed=9)).images
    assert (toy_classifier(purified).argmax(1) != y)[found].float().mean() > 0.8
    # Close to x: the L2 term keeps it nearer than the farthest on-range flip would be.
    far = gen(torch.tensor([[-3.0, 0.0]] * 16) * (2 * y - 1).view(-1, 1).float() * -1)
    assert ((adv - x).flatten(1).norm(dim=1) < (far - x).flatten(1).norm(dim=1))[found].all()


def test_eval_rows_for_the_detection_aware_attacks(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["eval", str(tiny_model_dir), "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
                   "--out", str(out), "--n", "6", "--n-adaptive", "4", "--attacks", "bpda-detect,manifold",
                   "--eps", "0.1,0.3", "--lambdas", "0,5", "--lambda-eps", "0.3", "--lambda-other", "2",
                   "--adaptive-steps", "2", "--eot-samples", "2", "--manifold-steps", "3",
                   "--manifold-search-steps", "1", "--steps", "2", "--restarts", "1", "--device", "cpu",
                   "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    cells = [(r["attack"], r["eps"], r["lambda"]) for r in results["cells"]]
    assert cells == [("bpda-detect", 0.1, 2.0), ("bpda-detect", 0.3, 0.0), ("bpda-detect", 0.3, 5.0),
                     ("manifold", None, None)]
    for r in results["cells"]:
        assert r["n"] == 4
        ev, prot = r["evasion"]["succeeded_and_not_flagged"], r["abstention"]["protected_accuracy"]
        assert ev["correct"] == 4 - prot["correct"]          # evaded = neither right nor stopped
        if r["attack"] == "bpda-detect":
            assert r["perturbation"]["linf_mean"] <= r["eps"] + 1e-6
            assert r["settings"]["lambda"] == r["lambda"]
    manifold = results["cells"][-1]
    assert set(manifold["within_eps"]) == {"0.1", "0.3"}
    table = (out / "results.md").read_text()
    assert "| detection-aware BPDA+EOT PGD-Linf, lambda=5 | 0.3 | 4 |" in table
    assert "On-manifold attack: distance of G(z) to x" in table
    # the cache keys hold lambda: a rerun with another lambda computes a new cell
    assert len({r["lambda"] for r in results["cells"][:3]}) == 3
    assert checkpoint.load_bundle(tiny_model_dir).threshold == 0.05
