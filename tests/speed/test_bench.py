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
    for name in ("ref", "quick"):  # clean vs FGSM by reconstruction error, per configuration
        row = first["detection"]["fgsm"][name]
        assert 0 <= row["auc"] <= 1 and 0 <= row["tpr_at_fpr"] <= 1 and row["n"] == 24
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


def _row(config, bs, ips, rnd=0):
    return dict(config=config, batch_size=bs, images_per_s=ips, round=rnd)


def test_speed_summary_compares_best_batch_with_best_batch():
    """The issue's sweep: paper peaks at a small batch, fast at the largest; best-vs-best is
    44.8 / 1.51, not the same-batch 44.8 / 1.13, and the same-batch ratios sit beside it."""
    from purifier.benchmark.bench import speed_summary

    paper = {8: 1.50, 16: 1.51, 32: 1.29, 64: 1.13}
    fast = {8: 27.3, 16: 35.1, 32: 40.9, 64: 44.8}
    rows = [_row("paper", b, v) for b, v in paper.items()] + [_row("fast", b, v) for b, v in fast.items()]
    out = speed_summary(rows, "paper")
    r0 = out["rounds"][0]
    assert r0["reference_best_batch_size"] == 16
    assert r0["configs"]["fast"]["best_batch_size"] == 64
    assert r0["configs"]["fast"]["speedup_best_vs_best"] == pytest.approx(29.67, abs=0.01)
    assert r0["configs"]["fast"]["speedup_same_batch"]["64"] == pytest.approx(39.65, abs=0.01)
    assert r0["configs"]["paper"]["speedup_best_vs_best"] == 1
    assert out["headline"]["fast"]["speedup_best_vs_best"] == r0["configs"]["fast"]["speedup_best_vs_best"]


def test_speed_summary_headline_is_the_lowest_round():
    from purifier.benchmark.bench import speed_summary

    rows = [_row("paper", 8, 1.0, 0), _row("fast", 8, 60.0, 0),
            _row("paper", 8, 1.0, 1), _row("fast", 8, 50.0, 1)]
    for r, cpu in zip(rows, [0.5, 40.0, 0.5, 40.0]):
        r["images_per_cpu_s"] = cpu
    assert speed_summary(rows, "paper", "images_per_cpu_s")["headline"]["fast"]["speedup_best_vs_best"] == 80
    h = speed_summary(rows, "paper")["headline"]["fast"]
    assert h["speedup_best_vs_best"] == 50 and h["speedup_best_vs_best_per_round"] == [60, 50]
    assert h["spread"] == pytest.approx(0.2) and h["speedup_same_batch"] == {"8": 50}


def test_speed_summary_takes_each_search_at_its_fastest_run():
    """paper compiled is the same search as paper, run faster: the best-run ratio compares fast's
    fastest run (here channels-last) with the compiled paper, not with the eager one."""
    from purifier.benchmark.bench import speed_summary

    rows = [_row("paper", 8, 1.5), _row("pc", 8, 1.6), _row("pc", 16, 1.7),
            _row("fast", 64, 74.0), _row("fcl", 64, 70.0), _row("fcl", 256, 85.0)]
    searches = {"paper": "P", "pc": "P", "fast": "F", "fcl": "F"}
    out = speed_summary(rows, "paper", searches=searches)
    r0 = out["rounds"][0]
    assert r0["reference_fastest_run"] == "pc"
    assert r0["configs"]["fast"]["speedup_best_vs_best"] == pytest.approx(74 / 1.5, abs=0.01)
    for name in ("fast", "fcl"):  # one search: one best-run figure, from fcl's batch 256
        assert r0["configs"][name]["fastest_run_of_its_search"] == "fcl"
        assert r0["configs"][name]["speedup_best_run_vs_best_run"] == pytest.approx(85 / 1.7, abs=0.01)
    assert r0["configs"]["paper"]["speedup_best_run_vs_best_run"] == 1
    assert r0["configs"]["fcl"]["speedup_same_batch"] == {}  # no batch in common with paper
    assert out["headline"]["fcl"]["speedup_best_run_vs_best_run"] == pytest.approx(50, abs=0.01)
    assert "speedup_best_run_vs_best_run" not in speed_summary(rows, "paper")["headline"]["fast"]


def test_bench_sweeps_each_configuration_over_its_own_batch_sizes(tiny_model_dir):
    bundle = checkpoint.load_bundle(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g), "fake")
    settings = BenchSettings(
        configs=[parse_config("ref=paper:steps=3,restarts=2"), parse_config("ref-cl=paper:steps=3,restarts=2,channels_last=true"),
                 parse_config("quick=fast:steps=2,prune_after=1"),
                 parse_config("quick-cl=fast:steps=2,prune_after=1,channels_last=true")],
        batch_sizes=[2, 8], batch_sizes_for={"ref": [2], "ref-cl": [2]}, speed_images=8)
    out = run_bench(bundle, split, settings, "cpu", "tiny", log=lambda m: None)
    assert {(r["config"], r["batch_size"]) for r in out["speed"]} == {
        ("ref", 2), ("ref-cl", 2), ("quick", 2), ("quick", 8), ("quick-cl", 2), ("quick-cl", 8)}
    # the count does not depend on how a search runs (the second channels-last configuration used
    # to count 0: the generator's cached channels-last copy kept the first one's hook)
    assert {r["config"]: r["latent_steps_per_image"] for r in out["speed"]} == {
        "ref": 6, "ref-cl": 6, "quick": 16 + 1, "quick-cl": 16 + 1}
    assert "speedup_vs_reference" not in next(r for r in out["speed"] if r["batch_size"] == 8)
    r0 = out["speed_summary"]["rounds"][0]
    assert r0["configs"]["quick"]["fastest_run_of_its_search"] in ("quick", "quick-cl")
    assert r0["configs"]["quick"]["fastest_run_of_its_search"] == r0["configs"]["quick-cl"]["fastest_run_of_its_search"]


def test_bench_cli_refuses_batch_sizes_for_an_unknown_configuration():
    from purifier.commands.bench import _batch_sizes, _batch_sizes_for
    from purifier.errors import ConfigError

    assert _batch_sizes_for(["paper=8,16"], ["paper", "fast"]) == {"paper": [8, 16]}
    with pytest.raises(ConfigError, match="NAME one of"):
        _batch_sizes_for(["slow=8"], ["paper", "fast"])
    with pytest.raises(ConfigError, match="whole numbers"):
        _batch_sizes("8,x", "--batch-sizes")
    with pytest.raises(ConfigError, match=">= 1"):
        _batch_sizes("0,8", "--batch-sizes")


def test_detection_rows_score_attacked_against_the_same_images_clean():
    from purifier.benchmark.bench import detection_rows

    clean = torch.arange(20, dtype=torch.float64)          # 0..19
    rows = detection_rows({"clean": {"a": clean, "b": clean},
                           "fgsm": {"a": clean + 100, "b": clean.flip(0)}})
    assert rows["fgsm"]["a"] == dict(auc=1.0, tpr_at_fpr=1.0, target_fpr=0.05, n=20)
    assert rows["fgsm"]["b"]["auc"] == 0.5                 # the same errors: no signal
    assert rows["fgsm"]["b"]["tpr_at_fpr"] == 0.05         # over the 95th clean score: one of 20
    assert "clean" not in rows


def test_matched_quality_needs_every_accuracy_within_a_point_and_no_higher_clean_error():
    from purifier.benchmark.bench import matched_quality

    def cond(acc_diff, err_diff=0.0):
        pv = dict(accuracy_diff=dict(mean=acc_diff, ci95=[acc_diff - .01, acc_diff + .01], n=1000),
                  error_diff=dict(mean=err_diff, ci95=[err_diff, err_diff], n=1000))
        return dict(configs={"paper": {}, "c": {"paired_vs_reference": pv}})

    ok = matched_quality({"clean": cond(-0.005, -1e-3), "fgsm": cond(0.02), "transfer": cond(-0.01)}, "paper")
    assert ok["c"]["matched"]
    assert not matched_quality({"clean": cond(0.0, -1e-3), "fgsm": cond(-0.011)}, "paper")["c"]["matched"]
    worse_error = matched_quality({"clean": cond(0.0, 1e-4), "fgsm": cond(0.0)}, "paper")["c"]
    assert not worse_error["matched"] and not worse_error["checks"]["clean_error"]["ok"]


def test_bench_sweeps_rounds_records_load_and_attacks_through_the_substitute(tiny_model_dir, monkeypatch):
    """Two rounds of the sweep in one process, the load beside them, and a transfer condition
    whose FGSM is computed on substitute.safetensors, not on the protected classifier."""
    from purifier.evaluation import attacks
    from tests.conftest import tiny_classifier

    checkpoint.save_module(tiny_classifier(seed=5), tiny_model_dir / "substitute.safetensors", "classifier")
    bundle = checkpoint.load_bundle(tiny_model_dir)
    attacked = []
    real = attacks.fgsm
    monkeypatch.setattr(attacks, "fgsm", lambda m, x, y, eps: attacked.append(m) or real(m, x, y, eps))
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g), "fake")
    settings = BenchSettings(
        configs=[parse_config("ref=paper:steps=4,restarts=2"), parse_config("quick=fast:steps=2,prune_after=1")],
        batch_sizes=[2, 4], speed_images=4, quality_images=8, quality_batch=4, rounds=2,
        conditions=("clean", "fgsm", "transfer"))
    out = run_bench(bundle, split, settings, "cpu", "tiny", log=lambda m: None)
    json.dumps(out)
    assert len(out["speed"]) == 2 * 2 * 2 and {r["round"] for r in out["speed"]} == {0, 1}
    assert len(out["load"]) == 3 and len(out["load"][0]["loadavg"]) == 3
    assert all(r["cpu_seconds"] > 0 and r["images_per_cpu_s"] > 0 for r in out["speed"])
    assert out["speed_summary_cpu_time"]["metric"] == "images_per_cpu_s"
    h = out["speed_summary"]["headline"]
    assert h["ref"]["speedup_best_vs_best"] == 1 and len(h["quick"]["speedup_best_vs_best_per_round"]) == 2
    assert set(h["quick"]["speedup_same_batch"]) == {"2", "4"}
    assert len(attacked) == 2 and attacked[0] is bundle.classifier and attacked[1] is not bundle.classifier
    sub = checkpoint.load_module(tiny_model_dir / "substitute.safetensors").state_dict()
    clf = bundle.classifier.state_dict()
    assert all(torch.equal(v, sub[k]) for k, v in attacked[1].state_dict().items())
    assert not all(torch.equal(v, clf[k]) for k, v in attacked[1].state_dict().items())
    assert set(out["matched_quality"]["quick"]["checks"]) == {
        "clean_accuracy", "clean_error", "fgsm_accuracy", "transfer_accuracy"}


def test_purify_cached_resumes_from_the_batches_already_done(tiny_model_dir, tmp_path, monkeypatch):
    """A run stopped half-way keeps its finished batches; the rerun computes only the rest and
    returns exactly what one uninterrupted run returns."""
    from purifier.benchmark import bench

    bundle = checkpoint.load_bundle(tiny_model_dir)
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cfg = parse_config("q=paper:steps=3,restarts=2")[1]
    key = dict(indices=list(range(10)), condition="clean")
    whole = bench.purify_cached(bundle.generator, None, x, cfg, 4, key, None)
    real, calls = bench.project, []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(bench, "project", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        bench.purify_cached(bundle.generator, None, x, cfg, 4, key, tmp_path)
    assert len(list(tmp_path.glob("*.parts/*.pt"))) == 2
    calls.clear()
    again = bench.purify_cached(bundle.generator, None, x, cfg, 4, key, tmp_path)
    assert len(calls) == 1 and not again["cached"]
    assert torch.equal(again["images"], whole["images"]) and torch.equal(again["errors"], whole["errors"])
    assert not list(tmp_path.glob("*.parts")) and bench.purify_cached(
        bundle.generator, None, x, cfg, 4, key, tmp_path)["cached"]


def test_time_config_stops_starting_batches_after_max_seconds(tiny_model_dir):
    """With a time budget the first batch is always timed, and the count of images is what ran."""
    from purifier.benchmark.bench import time_config

    bundle = checkpoint.load_bundle(tiny_model_dir)
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = parse_config("q=paper:steps=2,restarts=1")[1]
    one = time_config(bundle.generator, None, x, cfg, 4, max_seconds=0.0)
    assert one["calls"] == 1 and one["images"] == 4
    assert one["images_per_s"] > 0
    every = time_config(bundle.generator, None, x, cfg, 4)
    assert every["calls"] == 3 and every["images"] == 12


def test_bench_pairs_on_the_reference_batches_done_so_far(tiny_model_dir, tmp_path):
    """--reference-done-only: the slow reference is read from its finished cached batches and
    every configuration is paired on exactly those leading images."""
    from purifier.benchmark import bench

    bundle = checkpoint.load_bundle(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g), "fake")
    ref, quick = parse_config("ref=paper:steps=3,restarts=2"), parse_config("quick=fast:steps=2,prune_after=1")
    base = dict(configs=[ref, quick], speed_images=0, quality_images=12, quality_batch=4,
                conditions=("clean",), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no finished batch"):
        run_bench(bundle, split, BenchSettings(**base, reference_done_only=True), "cpu", "tiny", log=lambda m: None)
    full = run_bench(bundle, split, BenchSettings(**base), "cpu", "tiny", log=lambda m: None)
    final = next(f for f in tmp_path.glob("*.pt")   # the reference's: leave 2 of its 3 batches
                 if json.loads(torch.load(f, weights_only=True)["meta"])["projection"]["steps"] == 3)
    parts = final.with_suffix(".parts")
    hit = torch.load(final, weights_only=True)
    parts.mkdir()
    for b in range(2):
        torch.save(dict(images=hit["images"][4 * b: 4 * b + 4], errors=hit["errors"][4 * b: 4 * b + 4],
                        seconds=torch.tensor(1.0)), parts / f"{b:05d}.pt")
    final.unlink()
    part = run_bench(bundle, split, BenchSettings(**base, reference_done_only=True), "cpu", "tiny",
                     log=lambda m: None)
    q = part["quality"]["clean"]
    assert q["n"] == 8 and q["n_asked"] == 12 and q["configs"]["quick"]["n"] == 8
    assert part["matched_quality"]["quick"]["n_paired"] == 8 and not part["matched_quality"]["quick"]["complete"]
    assert full["matched_quality"]["quick"]["complete"]
    errs = hit["errors"].double()
    assert q["configs"]["ref"]["mean_error"] == pytest.approx(float(errs[:8].mean()))
    assert not final.exists()   # reading the finished batches wrote nothing
