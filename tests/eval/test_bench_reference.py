"""`purifier bench --reference-eval`: the slow reference configuration read from a finished
`purifier eval` of the same models instead of computed, and refused whenever the pairing would
not be exact (other models, seed, projection, fewer images, other adversarial images)."""

from __future__ import annotations

import pytest
import torch

from purifier import checkpoint, data
from purifier.benchmark.bench import BenchSettings, parse_config, run_bench
from purifier.errors import ConfigError
from purifier.evaluation.evaluate import EvalConfig, run_evaluation
from purifier.models import Classifier


@pytest.fixture
def evaluated(tiny_model_dir, tiny_data_dir, tmp_path):
    """The tiny model with a substitute, evaluated at a small paper setting on 10 test images."""
    torch.manual_seed(5)
    checkpoint.save_module(Classifier("C", 1, 8, 8).eval(), tiny_model_dir / "substitute.safetensors", "classifier")
    out = tmp_path / "eval"
    run_evaluation(EvalConfig(model_dir=str(tiny_model_dir), out_dir=str(out), dataset="mnist",
                              data_dir=str(tiny_data_dir), n=10, attacks=("fgsm", "transfer"), eps=(0.3,),
                              projection="paper", steps=3, restarts=2, n_adaptive=0, batch_size=4, seed=1),
                   progress=False, log=lambda *_: None)
    return tiny_model_dir, data.load("mnist", "test", str(tiny_data_dir)), out


def _settings(out, **changes) -> BenchSettings:
    base = dict(configs=[parse_config("ref=paper:steps=3,restarts=2"), parse_config("quick=fast:steps=2,prune_after=1")],
                speed_images=0, quality_images=8, quality_batch=4, conditions=("clean", "fgsm", "transfer"),
                eps=0.3, seed=1, reference_eval=str(out))
    base.update(changes)
    return BenchSettings(**base)


def _cached(out, folder: str) -> dict:
    parts = [torch.load(p, weights_only=True) for p in sorted((out / "cache" / folder).glob("*.pt"))]
    return {k: torch.cat([p[k] for p in parts]) for k in ("pred", "error")}


def test_the_reference_is_the_evaluations_own_purification(evaluated, monkeypatch):
    model_dir, test, out = evaluated
    from purifier.benchmark import bench

    seen = []
    real = bench.project
    monkeypatch.setattr(bench, "project", lambda G, x, cfg, E=None: seen.append(cfg.steps) or real(G, x, cfg, E))
    result = run_bench(checkpoint.load_bundle(model_dir), test, _settings(out), "cpu", "tiny", log=lambda m: None)
    assert seen and set(seen) == {2}   # only the quick configuration was computed
    y = data.subset(test, 8, 1).labels
    cells = {"clean": "clean", "fgsm": "oblivious-fgsm-eps0.3-s1", "transfer": "transfer-fgsm-eps0.3-s1"}
    for cond, cell in cells.items():
        ev = _cached(out, f"purified/{cell}/L3-R2-sgd-lr10")
        row = result["quality"][cond]["configs"]["ref"]
        assert row["source"] == str(out) and row["cached"] and row["n"] == 8
        assert row["accuracy"] == pytest.approx(float((ev["pred"][:8] == y).float().mean()))
        assert row["mean_error"] == pytest.approx(float(ev["error"][:8].mean()))
        assert "paired_vs_reference" in result["quality"][cond]["configs"]["quick"]
    assert result["settings"]["reference_eval"] == str(out)
    assert set(result["matched_quality"]["quick"]["checks"]) == {
        "clean_accuracy", "clean_error", "fgsm_accuracy", "transfer_accuracy"}


@pytest.mark.parametrize("changes, message", [
    (dict(seed=2), "seed is 1"),
    (dict(quality_images=12), "10 test images"),
    (dict(configs=[parse_config("ref=paper:steps=4,restarts=2")]), "differs from the reference configuration in steps"),
    (dict(configs=[parse_config("ref=paper:steps=3,restarts=2,momentum=0.5")]), "in momentum"),
])
def test_an_evaluation_that_does_not_pair_exactly_is_refused(evaluated, changes, message):
    model_dir, test, out = evaluated
    with pytest.raises(ConfigError, match=message):
        run_bench(checkpoint.load_bundle(model_dir), test, _settings(out, **changes), "cpu", "tiny", log=lambda m: None)


def test_other_models_other_adversarial_images_or_no_evaluation_are_refused(evaluated, tmp_path):
    model_dir, test, out = evaluated
    bundle = checkpoint.load_bundle(model_dir)
    with pytest.raises(ConfigError, match="no finished"):
        run_bench(bundle, test, _settings(tmp_path / "nothing"), "cpu", "tiny", log=lambda m: None)

    chunk = sorted((out / "cache" / "adv" / "transfer-fgsm-eps0.3-s1").glob("*.pt"))[0]
    part = torch.load(chunk, weights_only=True)
    part["x"][0, 0, 0, 0] = 1.0 - part["x"][0, 0, 0, 0]
    torch.save(part, chunk)
    with pytest.raises(ConfigError, match="transfer-fgsm-eps0.3-s1 images differ"):
        run_bench(bundle, test, _settings(out), "cpu", "tiny", log=lambda m: None)

    torch.manual_seed(9)
    checkpoint.save_module(Classifier("C", 1, 8, 8).eval(), model_dir / "substitute.safetensors", "classifier")
    with pytest.raises(ConfigError, match="its substitute is not"):
        run_bench(bundle, test, _settings(out, conditions=("transfer",)), "cpu", "tiny", log=lambda m: None)
    # the clean condition does not depend on the substitute
    run_bench(bundle, test, _settings(out, conditions=("clean",)), "cpu", "tiny", log=lambda m: None)
