"""BPDA (identity backward through the projection) and EOT (gradient averaged over
independent projections), on the tiny generator and on a generator whose range is every image."""

from __future__ import annotations

import torch
from torch import nn

from purifier.evaluation import attacks
from purifier.models import Classifier
from purifier.projection import ProjectionConfig, project

CFG = ProjectionConfig(steps=4, restarts=3, optimizer="adam", lr=0.05)


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return Classifier("D", 1, 8, 8).eval()


def test_bpda_forward_is_the_projection_and_backward_the_identity(tiny_gen):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    purifier = attacks.BPDAPurifier(tiny_gen, CFG, seed=3)
    out = purifier(x)
    expected = project(tiny_gen, x.detach(), CFG.with_(seed=3)).images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(out, x)  # the projection really changed the images
    w = torch.randn_like(x)
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)  # d out / d x = I exactly


def test_bpda_gradient_of_the_pipeline_is_the_classifier_gradient_at_the_purified_image(tiny_gen):
    clf = _classifier()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 5, 9])
    g = attacks.loss_gradient(attacks.defended(clf, attacks.BPDAPurifier(tiny_gen, CFG, seed=7)), x, y)
    purified = project(tiny_gen, x, CFG.with_(seed=7)).images
    torch.testing.assert_close(g, attacks.loss_gradient(clf, purified, y), rtol=1e-4, atol=1e-6)
    assert g.abs().sum() > 0


def test_eot_averages_the_gradient_over_independent_projections(tiny_gen):
    clf = _classifier()
    B, k = 3, 4
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2, 3])
    purifier = attacks.BPDAPurifier(tiny_gen, CFG, seed=11)
    g = attacks.loss_gradient(attacks.defended(clf, purifier), x, y, eot_samples=k)
    # The k draws: one projection call on the batch repeated k times, fresh restarts per row.
    draws = project(tiny_gen, x.repeat(k, 1, 1, 1), CFG.with_(seed=11)).images.view(k, B, 1, 8, 8)
    per_draw = torch.stack([attacks.loss_gradient(clf, draws[i], y) for i in range(k)])
    torch.testing.assert_close(g, per_draw.mean(0), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(draws[0], draws[1])           # independent restarts...
    assert not torch.allclose(per_draw[0], per_draw[1])     # ...so the average is not one draw's
    # Each call (each PGD step) draws fresh restarts.
    assert purifier.calls == 1
    g2 = attacks.loss_gradient(attacks.defended(clf, purifier), x, y, eot_samples=k)
    assert purifier.calls == 2 and not torch.allclose(g, g2)


class PixelGenerator(nn.Module):
    """G(z) = sigmoid(z): its range is all of (0, 1)^64, so the projection is nearly the identity
    and an attack on the pipeline must work about as well as on the classifier alone."""

    latent_dim = 64

    def forward(self, z):
        return torch.sigmoid(z).view(-1, 1, 8, 8)


def test_bpda_eot_pgd_breaks_a_pipeline_whose_projection_keeps_the_attack(toy_classifier, make_toy_data):
    x, y = make_toy_data(32, seed=4)
    gen = PixelGenerator()
    cfg = ProjectionConfig(steps=40, restarts=1, optimizer="adam", lr=0.2)

    def defended_accuracy(images, seed):
        purified = project(gen, images, cfg.with_(seed=seed)).images
        return float((toy_classifier(purified).argmax(1) == y).float().mean())

    assert defended_accuracy(x, 0) > 0.9
    adv = attacks.bpda_eot_pgd(toy_classifier, gen, x, y, 0.2, cfg, steps=8, eot_samples=2, seed=1)
    assert (adv - x).abs().max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert defended_accuracy(adv, 99) < 0.3  # evaluated with restarts the attack never saw
