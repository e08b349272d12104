"""The projection's contract: shapes and ranges, best-restart choice, seeded determinism,
recovery of points on the generator's range, and a frozen generator."""

from __future__ import annotations

import math

import pytest
import torch

from purifier.errors import ConfigError, InvalidInputError
from purifier.projection import FAST, PAPER, PRESETS, ProjectionConfig, preset, project

QUICK = ProjectionConfig(steps=30, restarts=3, seed=0)


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


def test_project_leaves_the_callers_modules_as_it_found_them(sharp_gen):
    from purifier.models import Encoder

    torch.manual_seed(0)
    enc = Encoder(sharp_gen.latent_dim, 1, 8, 8, dim=4)  # trainable, in train mode
    sharp_gen.train()
    frozen = next(sharp_gen.parameters())
    for p in sharp_gen.parameters():
        p.requires_grad_(True)
    frozen.requires_grad_(False)                         # a mixed state survives too
    weights = [p.data_ptr() for p in sharp_gen.parameters()]
    project(sharp_gen, torch.rand(2, 1, 8, 8), QUICK.with_(steps=3, encoder_starts=1, channels_last=True),
            encoder=enc)
    assert sharp_gen.training and all(m.training for m in sharp_gen.modules())
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    assert [p.requires_grad for p in sharp_gen.parameters()] == [p is not frozen for p in sharp_gen.parameters()]
    assert [p.data_ptr() for p in sharp_gen.parameters()] == weights   # no layout change in place
    assert all(p.grad is None for p in (*sharp_gen.parameters(), *enc.parameters()))


def test_project_runs_the_generator_in_eval_mode(sharp_gen):
    modes = []
    hook = sharp_gen.register_forward_hook(lambda m, i, o: modes.append(m.training))
    sharp_gen.train()
    try:
        project(sharp_gen, torch.rand(1, 1, 8, 8), QUICK.with_(steps=2))
    finally:
        hook.remove()
    assert modes and not any(modes)


def test_channels_last_gives_the_same_answer(sharp_gen):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    plain = project(sharp_gen, x, QUICK.with_(steps=5))
    cl = project(sharp_gen, x, QUICK.with_(steps=5, channels_last=True))
    torch.testing.assert_close(cl.latents, plain.latents, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # an in-place weight update is seen by the next channels-last call
        for p in sharp_gen.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(project(sharp_gen, x, QUICK.with_(steps=5, channels_last=True)).latents,
                               project(sharp_gen, x, QUICK.with_(steps=5)).latents, atol=1e-5, rtol=1e-4)


# --- presets ------------------------------------------------------------------------------

def test_preset_names_and_none_overrides():
    assert preset("paper") == PAPER and preset("fast") == FAST
    assert set(PRESETS) >= {"paper", "fast"}
    assert preset("fast", steps=None, restarts=None, seed=None, latent_radius=None) == FAST
    assert preset("paper", steps=7, lr=0.5, seed=3) == PAPER.with_(steps=7, lr=0.5, seed=3)
    assert preset(FAST.with_(steps=9), seed=1) == FAST.with_(steps=9, seed=1)   # a config as the base


def test_preset_restarts_override_clamps_keep_and_encoder_starts():
    cfg = FAST.with_(keep=3, restarts=6, encoder_starts=2)
    assert preset(cfg, restarts=1) == cfg.with_(restarts=1, keep=1, encoder_starts=1)
    assert preset(cfg, restarts=8) == cfg.with_(restarts=8)                  # only ever lowered
    assert preset(cfg, restarts=2, keep=1) == cfg.with_(restarts=2, keep=1, encoder_starts=2)  # given wins


def test_preset_without_an_encoder_starts_at_random_only():
    assert FAST.encoder_starts == 1
    assert preset("fast", has_encoder=False) == FAST.with_(encoder_starts=0)
    assert preset("fast", has_encoder=False, restarts=2).encoder_starts == 0
    assert preset("paper", has_encoder=False) == PAPER


def test_preset_latent_radius_overrides_the_sphere():
    assert FAST.latent_radius == 1.0 and PAPER.latent_radius == 0.0
    assert preset("fast", latent_radius=0.0).latent_radius == 0.0          # 0 is a value, not "unset"
    assert preset("paper", latent_radius=1.0).latent_radius == 1.0


def test_preset_refuses_unknown_names_and_settings_and_bad_values():
    with pytest.raises(ConfigError, match="unknown projection preset 'slow'"):
        preset("slow")
    with pytest.raises(ConfigError, match="unknown projection settings \\['stepz'\\]"):
        preset("paper", stepz=3)
    with pytest.raises(InvalidInputError, match="restarts must be >= 1"):
        preset("fast", restarts=0)


class PerfectEncoder(torch.nn.Module):
    """E(x) = the z that made x: the encoder start is the answer, so it wins every pruning
    (the real encoder's start won on every probed image too, issue 11)."""

    def __init__(self, z):
        super().__init__()
        self.z = z

    def forward(self, x):
        return self.z[: x.shape[0]]


def known_z_images(gen, n=4):
    z = torch.randn(n, gen.latent_dim, generator=torch.Generator().manual_seed(5))
    z = z * math.sqrt(gen.latent_dim) / z.norm(dim=1, keepdim=True)   # on FAST's sphere
    with torch.no_grad():
        return gen(z), PerfectEncoder(z)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_unseeded_answers_differ_and_seeded_repeat_in_every_preset(sharp_gen, name):
    """Issue 11: without a seed no two calls may answer alike (an attacker would get exact
    gradients); with one, the answer repeats exactly."""
    x, encoder = known_z_images(sharp_gen)
    cfg = preset(name, steps=12)              # past FAST's pruning at step 10
    a, b = (project(sharp_gen, x, cfg, encoder).images for _ in range(2))
    assert not torch.equal(a, b)
    s1, s2 = (project(sharp_gen, x, cfg.with_(seed=7), encoder).images for _ in range(2))
    assert torch.equal(s1, s2)


def test_encoder_start_without_jitter_is_what_made_fast_deterministic(sharp_gen):
    # the check above can fail: FAST without its jitter answers the same bytes twice here
    x, encoder = known_z_images(sharp_gen)
    cfg = preset("fast", steps=12).with_(encoder_jitter=0.0)
    a, b = (project(sharp_gen, x, cfg, encoder).images for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("changes", [dict(), dict(steps=7, restarts=3, prune_after=2, keep=1),
                                     dict(steps=5, restarts=4, prune_after=9, keep=1),   # prunes never
                                     dict(steps=6, restarts=3, prune_after=2, keep=3),   # keeps all
                                     dict(steps=6, restarts=5, prune_after=6, keep=2)])
def test_latent_steps_counts_the_passes_the_search_runs(sharp_gen, changes):
    """The service's compute budget charges latent_steps(cfg) per image: exactly the generator
    forward+backward passes the search makes (counted), pruning included."""
    from purifier.benchmark.bench import latent_steps_per_image
    from purifier.projection import FAST, PAPER, latent_steps

    cfg = FAST.with_(encoder_starts=0, encoder_jitter=0.0, precision="fp32", seed=0, **changes)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert latent_steps(cfg) == latent_steps_per_image(sharp_gen, None, x, cfg)
    assert latent_steps(PAPER) == 2000 and latent_steps(FAST) == 16 + 49


PRECISE_BASE = ProjectionConfig(steps=8, restarts=4, optimizer="adam", lr=0.1, prune_after=2, seed=0,
                                latent_radius=1.0)


def test_precise_step_size_goes_to_the_images_whose_starts_already_fit(sharp_gen):
    """precise_below/precise_lr: an image whose best start has an error under the bar is searched
    with precise_lr, the others with lr; each image's answer is the one the whole batch would get
    at its step size (rows of different images never mix)."""
    x = torch.cat([on_range(sharp_gen, n=3), torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))])
    starts = project(sharp_gen, x, PRECISE_BASE.with_(steps=0)).errors          # best start per image
    bar = float(starts.sort().values[2:4].mean())                              # three under, three over
    under = starts < bar
    assert 0 < int(under.sum()) < len(x)
    mixed = project(sharp_gen, x, PRECISE_BASE.with_(precise_below=bar, precise_lr=0.02))
    slow = project(sharp_gen, x, PRECISE_BASE.with_(lr=0.02))
    base = project(sharp_gen, x, PRECISE_BASE)
    expected = torch.where(under.view(-1, 1, 1, 1), slow.images, base.images)
    torch.testing.assert_close(mixed.images, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(slow.images[under], base.images[under], atol=1e-4)  # the step size mattered
    # every image under the bar: the search at precise_lr; none under it: the search at lr
    torch.testing.assert_close(project(sharp_gen, x, PRECISE_BASE.with_(precise_below=1e9, precise_lr=0.02)).images,
                               slow.images, atol=1e-6, rtol=0)
    assert torch.equal(project(sharp_gen, x, PRECISE_BASE.with_(precise_below=1e-12, precise_lr=0.02)).images,
                       base.images)


def test_precise_step_size_with_momentum_sgd_and_early_stopping(sharp_gen):
    x = on_range(sharp_gen, n=4)
    cfg = PAPER.with_(steps=12, restarts=3, seed=1, early_stop_tol=1e-3, check_every=2)
    p = project(sharp_gen, x, cfg.with_(precise_below=1e9, precise_lr=5.0))
    torch.testing.assert_close(p.images, project(sharp_gen, x, cfg.with_(lr=5.0)).images, atol=1e-6, rtol=0)


def test_precise_settings_are_checked_and_kept_out_of_old_records():
    from dataclasses import asdict

    from purifier.evaluation.evaluate import _proj_tag
    from purifier.projection import settings_record

    with pytest.raises(InvalidInputError, match="precise_lr must be a positive number"):
        FAST.with_(precise_below=0.04)
    with pytest.raises(InvalidInputError, match="precise_below must be a number >= 0"):
        FAST.with_(precise_below=-1.0, precise_lr=0.03)
    # at their defaults the new settings are not in a record: caches and evaluations keyed on
    # the settings before they existed still match
    assert settings_record(PAPER) == {k: v for k, v in asdict(PAPER).items()
                                      if not k.startswith(("precise_", "decay_"))}
    assert settings_record(asdict(PAPER)) == settings_record(PAPER)
    on = FAST.with_(precise_below=0.04, precise_lr=0.03)
    assert settings_record(on)["precise_below"] == 0.04
    assert _proj_tag(FAST) != _proj_tag(on) and "precise" not in _proj_tag(FAST)


def test_fast_precise_is_fast_with_eight_starts_and_a_step_per_image():
    from purifier.projection import FAST_PRECISE, latent_steps

    assert preset("fast-precise") == FAST_PRECISE
    assert FAST_PRECISE == FAST.with_(restarts=8, lr=0.15, precise_below=0.045, precise_lr=0.025)
    assert (FAST_PRECISE.keep, FAST_PRECISE.encoder_starts) == (1, 1)
    assert latent_steps(FAST_PRECISE) == 57 < latent_steps(FAST) == 65
    assert preset("fast-precise", has_encoder=False).encoder_starts == 0


def test_start_errors_are_each_images_best_start_before_any_step(sharp_gen):
    """What precise_below is compared with (test above: the search's own decision): the lowest
    error among an image's starts, on the sphere where the settings put z, computed here by hand
    from the same seeded starts."""
    from purifier.projection import _initial_latents, _rng, start_errors, to_sphere

    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cfg = preset("fast", has_encoder=False, restarts=4, seed=11)
    got = start_errors(sharp_gen, x, cfg)
    z0 = _initial_latents(sharp_gen, None, x, cfg, _rng(cfg, x.device))           # (5, 4, D)
    z = to_sphere(z0.reshape(20, -1), cfg.latent_radius)
    with torch.no_grad():
        per_start = (sharp_gen(z) - x.repeat_interleave(4, 0)).pow(2).flatten(1).mean(1).view(5, 4)
    torch.testing.assert_close(got, per_start.amin(1), atol=1e-6, rtol=0)
    assert not torch.equal(per_start.amin(1), per_start[:, 0])   # not simply the first start


def test_schedule_factor_is_flat_then_a_half_cosine_to_decay_to():
    from purifier.projection import lr_factor

    assert [lr_factor(FAST, s) for s in range(FAST.steps)] == [1.0] * FAST.steps
    cfg = FAST.with_(decay_to=0.2, decay_from=0.5)                     # 50 steps: flat for 0..24
    f = [lr_factor(cfg, s) for s in range(cfg.steps)]
    assert f[:26] == [1.0] * 26 and f[-1] == pytest.approx(0.2)
    assert f[37] == pytest.approx(0.6)                                # half way down: (1 + 0.2) / 2
    assert all(a >= b for a, b in zip(f, f[1:]))
    one = FAST.with_(steps=1, decay_to=0.5)
    assert lr_factor(one, 0) == 0.5                                  # a one-step decay: the end value


def test_schedule_scales_each_step_as_a_hand_written_descent_does(sharp_gen):
    """Plain gradient descent (momentum 0) under a schedule: z_{s+1} = z_s - lr * f(s) * grad,
    with f from lr_factor; select="last" answers the last scored iterate."""
    from purifier.projection import lr_factor

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    cfg = PAPER.with_(steps=4, restarts=1, momentum=0.0, lr=5.0, select="last", seed=3,
                      decay_to=0.25)
    z = project(sharp_gen, x, cfg.with_(steps=0)).latents                 # the start
    for s in range(cfg.steps - 1):
        zz = z.clone().requires_grad_(True)
        err = (sharp_gen(zz) - x).pow(2).flatten(1).mean(1).sum()
        (g,) = torch.autograd.grad(err, zz)
        z = (z - cfg.lr * lr_factor(cfg, s) * g).detach()
    got = project(sharp_gen, x, cfg).latents
    torch.testing.assert_close(got, z, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, project(sharp_gen, x, cfg.with_(decay_to=1.0)).latents, atol=1e-4)


def test_schedule_scales_the_per_image_step_too_and_is_checked(sharp_gen):
    from purifier.evaluation.evaluate import _proj_tag
    from purifier.projection import settings_record

    x = on_range(sharp_gen, n=3)
    sched = dict(decay_to=0.3, decay_from=0.25)
    every = project(sharp_gen, x, PRECISE_BASE.with_(precise_below=1e9, precise_lr=0.02, **sched))
    torch.testing.assert_close(every.images, project(sharp_gen, x, PRECISE_BASE.with_(lr=0.02, **sched)).images,
                               atol=1e-6, rtol=0)
    for bad in (dict(decay_to=0.0), dict(decay_to=1.5), dict(decay_from=1.0), dict(decay_from=-0.1)):
        with pytest.raises(InvalidInputError, match="decay_"):
            FAST.with_(**bad)
    assert "decay_to" not in settings_record(FAST) and settings_record(FAST.with_(**sched))["decay_to"] == 0.3
    assert "decay" not in _proj_tag(FAST) and _proj_tag(FAST.with_(**sched)) != _proj_tag(FAST)
