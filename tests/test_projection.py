"""The projection's contract: shapes and ranges, best-restart choice, seeded determinism,
recovery of points on the generator's range, and a frozen generator."""

from __future__ import annotations

import math

import pytest
import torch

from purifier.errors import InvalidInputError
from purifier.projection import PAPER, ProjectionConfig, project

QUICK = ProjectionConfig(steps=30, restarts=3, seed=0)


@pytest.fixture
def sharp_gen(tiny_gen):
    """tiny_gen with its weights scaled so that G(z) depends visibly on z (pixel std ~0.05
    across z); the unscaled tiny generator is nearly constant in z."""
    with torch.no_grad():
        for p in tiny_gen.parameters():
            p.mul_(4.0)
    return tiny_gen


def on_range(gen, n=6, seed=5):
    """Images G(z) for known z: their projection error can go to ~0."""
    z = torch.randn(n, gen.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return gen(z / math.sqrt(gen.latent_dim))


def test_shapes_ranges_and_reported_errors(tiny_gen):
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = project(tiny_gen, x, QUICK)
    assert p.images.shape == (5, 1, 8, 8)
    assert p.errors.shape == (5,)
    assert p.latents.shape == (5, tiny_gen.latent_dim)
    assert p.steps_run == QUICK.steps
    assert p.images.min() >= 0 and p.images.max() <= 1
    assert torch.all(p.errors >= 0)
    with torch.no_grad():  # the reported image and error belong to the reported latent
        torch.testing.assert_close(p.images, tiny_gen(p.latents))
    torch.testing.assert_close(p.errors, (p.images - x).pow(2).flatten(1).mean(1))


def test_empty_batch_and_zero_steps(tiny_gen):
    p = project(tiny_gen, torch.rand(0, 1, 8, 8), QUICK)
    assert p.images.shape == (0, 1, 8, 8) and p.errors.shape == (0,)
    p = project(tiny_gen, torch.rand(2, 1, 8, 8), QUICK.with_(steps=0))
    assert p.steps_run == 0 and p.errors.shape == (2,)


def test_best_restart_is_selected(sharp_gen):
    """With no steps, the answer is the best of the R random starts, per image."""
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = ProjectionConfig(steps=0, restarts=7, seed=3)
    p = project(sharp_gen, x, cfg)
    D = sharp_gen.latent_dim
    per_restart = []
    for r in range(cfg.restarts):  # each restart alone, with the same seeded starts
        z = torch.randn(4, cfg.restarts, D, generator=torch.Generator().manual_seed(3)) / math.sqrt(D)
        with torch.no_grad():
            per_restart.append((sharp_gen(z[:, r]) - x).pow(2).flatten(1).mean(1))
    per_restart = torch.stack(per_restart, 1)                        # (B, R)
    torch.testing.assert_close(p.errors, per_restart.min(1).values)
    assert (per_restart.max(1).values > p.errors).all()  # a choice was actually made


def test_more_restarts_and_steps_never_hurt_on_average(sharp_gen):
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    one = project(sharp_gen, x, ProjectionConfig(steps=0, restarts=1, seed=0)).errors
    many = project(sharp_gen, x, ProjectionConfig(steps=50, restarts=5, seed=0)).errors
    assert many.mean() < one.mean()


def test_seed_makes_it_deterministic_and_no_seed_does_not(sharp_gen):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    a = project(sharp_gen, x, QUICK.with_(seed=11))
    b = project(sharp_gen, x, QUICK.with_(seed=11))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.errors, b.errors)
    c = project(sharp_gen, x, QUICK.with_(seed=None))
    d = project(sharp_gen, x, QUICK.with_(seed=None))
    assert not torch.equal(c.latents, d.latents)


@pytest.mark.parametrize("cfg", [
    PAPER.with_(seed=0),
    ProjectionConfig(steps=200, restarts=10, optimizer="adam", lr=0.05, seed=0),
], ids=["paper-sgd", "adam"])
def test_recovers_a_point_on_the_range(sharp_gen, cfg):
    x = on_range(sharp_gen)
    start = project(sharp_gen, x, cfg.with_(steps=0, restarts=1)).errors
    p = project(sharp_gen, x, cfg)
    assert start.mean() > 1e-3                      # the problem is not trivial ...
    assert p.errors.max() < 2e-5                    # ... and is solved to near zero
    assert (p.errors < start / 100).all()


def test_generator_weights_get_no_gradients(sharp_gen):
    for p in sharp_gen.parameters():
        p.requires_grad_(True)   # even a generator left trainable by its caller
    before = {k: v.clone() for k, v in sharp_gen.state_dict().items()}
    project(sharp_gen, torch.rand(2, 1, 8, 8), QUICK.with_(optimizer="adam", lr=0.05))
    assert all(p.grad is None for p in sharp_gen.parameters())
    for k, v in sharp_gen.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(restarts=0), dict(lr=0), dict(lr=float("nan")),
                                 dict(optimizer="lbfgs"), dict(momentum=1.0), dict(keep=0),
                                 dict(encoder_starts=11), dict(check_every=0), dict(precision="fp8"),
                                 dict(init_std=-1.0)])
def test_bad_settings_are_refused_with_a_reason(bad):
    with pytest.raises(InvalidInputError, match="bad projection settings"):
        ProjectionConfig(**bad)


def test_encoder_start_needs_an_encoder(tiny_gen):
    with pytest.raises(InvalidInputError, match="encoder"):
        project(tiny_gen, torch.rand(1, 1, 8, 8), QUICK.with_(encoder_starts=1))
