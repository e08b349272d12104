"""Engine.config: the server's default projection with a request's overrides, within limits."""

from __future__ import annotations

import pytest

from purifier.engine import Engine, Limits
from purifier.errors import ConfigError, InvalidInputError
from purifier.projection import FAST, PAPER


def test_config_applies_overrides_through_the_preset_rules(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "cpu", "fast", Limits(max_steps=50, max_restarts=6))
    assert engine.config() == FAST                                   # the model has an encoder
    assert engine.config(steps=7, seed=3) == FAST.with_(steps=7, seed=3)
    one = engine.config(restarts=1)                                  # FAST's E(x) start fits in R=1
    assert (one.restarts, one.keep, one.encoder_starts) == (1, 1, 1)


def test_config_refuses_what_the_limits_forbid_with_every_reason(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "cpu", "paper", Limits(max_steps=50, max_restarts=6))
    with pytest.raises(InvalidInputError) as e:
        engine.config(steps=51, restarts=7)
    assert "steps 51 is above this server's limit of 50" in str(e.value)
    assert "restarts 7 is above this server's limit of 6" in str(e.value)
    with pytest.raises(InvalidInputError, match="restarts must be at least 1"):
        engine.config(restarts=0)
    with pytest.raises(InvalidInputError, match="steps must be >= 0"):
        engine.config(steps=-1)


def test_no_encoder_means_random_starts_and_unknown_presets_fail_first(tiny_model_dir):
    (tiny_model_dir / "encoder.safetensors").unlink()
    assert Engine.load(tiny_model_dir, "cpu", "fast").default == FAST.with_(encoder_starts=0)
    assert Engine.load(tiny_model_dir, "cpu", "paper").default == PAPER
    with pytest.raises(ConfigError, match="unknown projection preset 'quick'"):
        Engine.load(tiny_model_dir / "missing", "cpu", "quick")


def test_cpu_engine_runs_the_generator_channels_last_with_the_same_answer(tiny_model_dir):
    """On the CPU the engine converts its generator to channels-last once (oneDNN's transposed
    convolutions are faster that way, docs/speed.md); a seeded answer stays the NCHW one within
    float rounding, and stays the same bytes from call to call."""
    import torch

    from purifier import checkpoint, projection

    engine = Engine.load(tiny_model_dir, "cpu", "fast")
    weights = [p for p in engine.bundle.generator.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)   # really converted, not 1x1 maps
    nchw = checkpoint.load_bundle(tiny_model_dir)
    x = torch.rand(3, *engine.image_shape, generator=torch.Generator().manual_seed(1))
    cfg = engine.config(steps=6, seed=5)
    images, errors = engine.project(x, cfg)
    ref = projection.project(nchw.generator, x, cfg, nchw.encoder)
    torch.testing.assert_close(torch.from_numpy(images), ref.images, atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.from_numpy(errors), ref.errors, atol=1e-4, rtol=0.05)
    again, _ = engine.project(x, cfg)
    assert (again == images).all()


def test_engine_names_the_settings_its_projection_and_the_cards_threshold_differ_in(tiny_model_dir):
    """A threshold calibrated for one search flags clean traffic at another rate under another
    (the server logs a warning at start-up): the engine says which settings differ."""
    from dataclasses import asdict

    from purifier import checkpoint

    assert Engine.load(tiny_model_dir, "cpu", "fast").threshold_settings_differ == []   # no threshold yet
    fast = Engine.load(tiny_model_dir, "cpu", "fast").default
    checkpoint.update_card(tiny_model_dir, detection={"threshold": 0.01, "projection": asdict(fast.with_(seed=0))})
    assert Engine.load(tiny_model_dir, "cpu", "fast").threshold_settings_differ == []   # seed: how it runs
    assert Engine.load(tiny_model_dir, "cpu", "fast-precise").threshold_settings_differ == \
        ["lr", "precise_below", "precise_lr", "restarts"]
    assert {"steps", "restarts", "optimizer"} <= set(Engine.load(tiny_model_dir, "cpu", "paper").threshold_settings_differ)


def test_server_warns_at_start_when_the_cards_threshold_was_calibrated_for_another_search(aloop, tiny_model_dir,
                                                                                          caplog):
    from dataclasses import asdict

    from purifier import checkpoint
    from tests.service.conftest import running, settings_for

    fast = Engine.load(tiny_model_dir, "cpu", "fast").default
    checkpoint.update_card(tiny_model_dir, detection={"threshold": 0.01, "projection": asdict(fast.with_(seed=0))})

    def warnings(projection, **kw):
        caplog.clear()
        with caplog.at_level("WARNING", logger="purifier.server"):
            with running(aloop, settings_for(tiny_model_dir, projection=projection, **kw)):
                pass
        return [getattr(r, "fields", {}) for r in caplog.records if "calibrated for another projection" in r.getMessage()]

    assert warnings("fast") == []
    (w,) = warnings("fast-precise")
    assert w["differ"] == ["lr", "precise_below", "precise_lr", "restarts"] and w["projection"] == "fast-precise"
    assert warnings("fast-precise", threshold=0.02) == []    # the operator's own threshold: not the card's
