"""The bench: configuration parsing, paired statistics, and a whole run on the tiny model
(speed + clean/FGSM quality), with the cache returning the very same purified results."""

from __future__ import annotations

import json

import pytest
import torch

from purifier import checkpoint
from purifier.benchmark.bench import BenchSettings, paired, parse_config, run_bench
from purifier.data import Split
from purifier.projection import FAST, PAPER


def test_parse_config_presets_and_overrides():
    assert parse_config("paper") == ("paper", PAPER)
    name, cfg = parse_config("quick=fast:steps=7,precision=bf16,encoder_starts=0,compile=true,lr=0.1")
    assert name == "quick"
    assert cfg == FAST.with_(steps=7, precision="bf16", encoder_starts=0, compile=True, lr=0.1)
    with pytest.raises(ValueError, match="unknown projection setting"):
        parse_config("x=paper:stepz=3")
    with pytest.raises(ValueError, match="unknown projection preset 'slow'"):
        parse_config("x=slow")
    # a restarts override keeps the preset runnable: FAST's one E(x) start and its kept restart fit in R
    assert parse_config("r1=fast:restarts=1")[1] == FAST.with_(restarts=1)


def test_paired_interval():
    d = torch.tensor([1.0, 0.0, 0.0, -1.0] * 25)
    out = paired(d)
    assert out["mean"] == 0 and out["n"] == 100
    lo, hi = out["ci95"]
    assert lo < 0 < hi and hi == pytest.approx(1.96 * d.std().item() / 10)


def test_whole_bench_on_the_tiny_model_with_cache(tiny_model_dir, tmp_path):
    bundle = checkpoint.load_bundle(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g), "fake")
    settings = BenchSettings(
        configs=[parse_config("ref=paper:steps=6,restarts=3"), parse_config("quick=fast:steps=4,prune_after=2")],
        batch_sizes=[1, 8], speed_images=8, quality_images=24, quality_batch=10,
        cache_dir=str(tmp_path / "cache"))
    first = run_bench(bundle, split, settings, "cpu", "tiny", log=lambda m: None)
    json.dumps(first)  # the result is plain JSON
    assert {(r["config"], r["batch_size"]) for r in first["speed"]} == {
        ("ref", 1), ("ref", 8), ("quick", 1), ("quick", 8)}
    assert all(r["images_per_s"] > 0 and r["latency_ms"]["p50"] > 0 for r in first["speed"])
    ref_row = next(r for r in first["speed"] if r["config"] == "ref")
    assert ref_row["latent_steps_per_image"] == 6 * 3 and ref_row["speedup_vs_reference"] == 1
    for cond in ("clean", "fgsm"):
        rows = first["quality"][cond]["configs"]
        assert set(rows) == {"ref", "quick"}
        assert "paired_vs_reference" in rows["quick"] and "paired_vs_reference" not in rows["ref"]
        assert rows["quick"]["paired_vs_reference"]["accuracy_diff"]["n"] == 24
        assert not rows["ref"]["cached"]
    again = run_bench(bundle, split, settings.__class__(**{**settings.__dict__, "speed_images": 0}),
                      "cpu", "tiny", log=lambda m: None)
    for cond in ("clean", "fgsm"):
        a, b = first["quality"][cond]["configs"], again["quality"][cond]["configs"]
        assert all(b[n]["cached"] for n in b)
        assert all(a[n]["accuracy"] == b[n]["accuracy"] and a[n]["mean_error"] == b[n]["mean_error"] for n in a)


def test_bench_attacks_with_the_tested_fgsm(tiny_model_dir, monkeypatch):
    """The fgsm condition's inputs are attacks.fgsm's (the ART-tested attack `purifier eval`
    uses), at the bench's eps, and its undefended accuracy is measured on them."""
    from purifier import data
    from purifier.evaluation import attacks

    calls, made = [], []

    def spy(clf, x, y, eps):
        calls.append(eps)
        made.append(real(clf, x, y, eps))
        return made[-1]
    real = attacks.fgsm
    monkeypatch.setattr(attacks, "fgsm", spy)
    bundle = checkpoint.load_bundle(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g), "fake")
    settings = BenchSettings(configs=[parse_config("ref=paper:steps=1,restarts=1")], speed_images=0,
                             quality_images=16, eps=0.2, conditions=("fgsm",))
    out = run_bench(bundle, split, settings, "cpu", "tiny", log=lambda m: None)
    assert calls == [0.2]
    y = data.subset(split, 16, seed=0).labels
    with torch.no_grad():
        expected = (bundle.classifier(made[0]).argmax(1) == y).float().mean().item()
    assert out["quality"]["fgsm"]["undefended_accuracy"] == expected
