"""The evaluation run end to end on tiny models: results, table and figures written with the
expected keys; the chunk cache makes a rerun free and an interrupted run continue; calibrate
writes the threshold into the model card."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace

import pytest
import torch

from purifier import checkpoint, cli
from purifier.commands import evaluate as evaluate_command
from purifier.errors import ConfigError
from purifier.evaluation.evaluate import EvalConfig, run_evaluation, wilson_interval
from purifier.models import Classifier


def test_wilson_interval_hand_computed():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0
    lo, hi = wilson_interval(500, 1000)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=1e-2)


@pytest.fixture
def substitute(tmp_path):
    torch.manual_seed(5)
    path = tmp_path / "substitute.safetensors"
    checkpoint.save_module(Classifier("C", 1, 8, 8).eval(), path, "classifier")
    return path


def _config(model_dir, data_dir, out, substitute, **changes) -> EvalConfig:
    settings = dict(model_dir=str(model_dir), out_dir=str(out), dataset="mnist", data_dir=str(data_dir),
                    n=10, eps=(0.1, 0.3), steps=3, restarts=2, projection="paper", pgd_steps=3,
                    cw_steps=5, cw_search_steps=2, substitute=str(substitute), n_adaptive=4,
                    adaptive_steps=2, eot_samples=2, sweep_l=(1, 3), sweep_r=(1, 2), sweep_n=6,
                    batch_size=4, adaptive_batch=2, blackbox_holdout=6, blackbox_n=8, blackbox_rounds=2,
                    blackbox_epochs=1, blackbox_arch="D", seed=1)
    settings.update(changes)
    return EvalConfig(**settings)


def _numbers(cells):
    """Every number of the cells except compute times."""
    return [{k: v for k, v in c.items() if k != "seconds"} for c in cells]


def _chunks(out):
    return {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.pt")}


def test_eval_writes_results_table_and_figures_and_resumes(tiny_model_dir, tiny_data_dir, substitute, tmp_path):
    out = tmp_path / "eval"
    cfg = _config(tiny_model_dir, tiny_data_dir, out, substitute)
    results = run_evaluation(cfg, progress=False, log=lambda *_: None)

    saved = json.loads((out / "results.json").read_text())
    for key in ("clean", "cells", "sweeps", "settings", "environment", "seed", "figures", "fingerprint",
                "command"):
        assert key in saved, key
    assert saved["seed"] == 1
    assert {"versions", "hardware"} <= set(saved["environment"])
    assert saved["environment"]["versions"]["torch"] == torch.__version__
    assert saved["settings"]["projection"]["steps"] == 3
    kinds = {(c["threat"], c["attack"], c["eps"]) for c in saved["cells"]}
    assert kinds == {("oblivious", "fgsm", 0.1), ("oblivious", "fgsm", 0.3), ("oblivious", "pgd", 0.1),
                     ("oblivious", "pgd", 0.3), ("oblivious", "cw", None), ("transfer", "fgsm", 0.1),
                     ("transfer", "fgsm", 0.3), ("adaptive", "bpda", 0.1), ("adaptive", "bpda", 0.3),
                     ("blackbox", "fgsm", 0.1), ("blackbox", "fgsm", 0.3)}
    for cell in saved["cells"]:
        n = {"adaptive": 4, "blackbox": 8}.get(cell["threat"], 10)
        for key in ("undefended", "purified"):
            acc = cell[key]
            assert acc["n"] == n and acc["correct"] == round(acc["accuracy"] * n)
            assert acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1]
        assert 0 <= cell["detection"]["auc"] <= 1
        assert len(cell["roc"]["fpr"]) == len(cell["roc"]["tpr"])
        assert "at_card_threshold" in cell["detection"]   # the tiny card has a threshold
        if cell["eps"] is not None:
            assert cell["perturbation"]["linf_mean"] <= cell["eps"] + 1e-6
    adaptive = [c for c in saved["cells"] if c["threat"] == "adaptive"]
    assert all("oblivious_pgd_same_images" in c for c in adaptive)
    assert "substitute_accuracy" in next(c for c in saved["cells"] if c["threat"] == "transfer")
    assert [p["value"] for p in saved["sweeps"]["L"]] == [1, 3]
    assert [p["value"] for p in saved["sweeps"]["R"]] == [1, 2]
    assert set(saved["sweeps"]["L"][0]) >= {"clean", "fgsm-eps0.3"}

    figures = saved["figures"]
    for name in ("grid-clean", "grid-fgsm-eps-0.3", "accuracy-vs-eps", "accuracy-vs-L", "accuracy-vs-R", "roc"):
        assert name in figures, name
        assert (out / figures[name]).read_bytes()[:4] == b"\x89PNG"
    table = (out / "results.md").read_text()
    assert "| white-box, defense-oblivious | FGSM | 0.3 | 10 |" in table
    assert "adaptive (BPDA+EOT)" in table and "Accuracy vs steps L" in table

    # A rerun computes nothing and reproduces every number.
    before = _chunks(out)
    with pytest.raises(ConfigError, match="--resume"):
        run_evaluation(cfg, progress=False, log=lambda *_: None)
    again = run_evaluation(cfg, resume=True, progress=False, log=lambda *_: None)
    assert _chunks(out) == before
    assert _numbers(again["cells"]) == _numbers(results["cells"]) and again["sweeps"] == results["sweeps"]

    # An interrupted run (a chunk never written) continues where it stopped, with the same numbers.
    lost = sorted(p for p in before if "adaptive-bpda-eps0.3" in str(p) and "/adv/" in str(p))[-1]
    lost.unlink()
    resumed = run_evaluation(cfg, resume=True, progress=False, log=lambda *_: None)
    assert lost.exists() and _numbers(resumed["cells"]) == _numbers(results["cells"])
    assert {p: t for p, t in _chunks(out).items() if p != lost} == {p: t for p, t in before.items() if p != lost}

    # Cached numbers are never mixed with another run's.
    with pytest.raises(ConfigError, match="seed"):
        run_evaluation(_config(tiny_model_dir, tiny_data_dir, out, substitute, seed=2), resume=True,
                       progress=False, log=lambda *_: None)


def test_eval_settings_are_checked_before_any_work(tiny_model_dir, tiny_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown attacks"):
        EvalConfig(model_dir=".", out_dir=".", attacks=("fgsm", "deepfool"))
    with pytest.raises(ConfigError, match="eps"):
        EvalConfig(model_dir=".", out_dir=".", eps=(8.0,))
    with pytest.raises(ConfigError, match="substitute"):
        run_evaluation(EvalConfig(model_dir=str(tiny_model_dir), out_dir=str(tmp_path / "o"), dataset="mnist",
                                  data_dir=str(tiny_data_dir), attacks=("transfer",)), progress=False)


def test_eval_cli(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["eval", str(tiny_model_dir), "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
                   "--out", str(out), "--n", "6", "--attacks", "fgsm,bpda", "--eps", "0.2", "--steps", "2",
                   "--restarts", "1", "--n-adaptive", "2", "--adaptive-steps", "1", "--eot-samples", "2",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "results.json").read_text())
    assert [(c["attack"], c["eps"]) for c in saved["cells"]] == [("fgsm", 0.2), ("bpda", 0.2)]
    assert saved["settings"]["eval"]["eot_samples"] == 2
    assert "| white-box, defense-oblivious | FGSM | 0.2 | 6 |" in capsys.readouterr().out
    # The recorded command, run again, asks for exactly these settings.
    argv = shlex.split(saved["command"])
    assert argv[:2] == ["purifier", "eval"]
    again = evaluate_command.config_from_args(cli.build_parser(only="eval").parse_args(argv[1:]))
    expected = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"]["eval"].items()}
    assert replace(again, device="cpu") == EvalConfig(**expected)


def test_calibrate_writes_the_threshold_into_the_card(tiny_model_dir, tiny_data_dir, capsys):
    rc = cli.main(["calibrate", str(tiny_model_dir), "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
                   "--target-fpr", "0.1", "--n", "50", "--holdout", "100", "--steps", "3", "--restarts", "2",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    card = checkpoint.read_card(tiny_model_dir)
    det = card["detection"]
    assert det["target_fpr"] == 0.1 and det["n"] == 50
    assert det["fpr"] <= 0.1 and det["threshold"] != 0.05   # measured, replacing the fixture's
    assert det["projection"]["steps"] == 3 and det["projection"]["restarts"] == 2
    assert det["data"]["split"] == "train"
    from purifier.benchmark.bench import file_digest             # the weights it holds for
    assert det["models_sha256"] == {"generator": file_digest(tiny_model_dir / "generator.safetensors"),
                                    "encoder": file_digest(tiny_model_dir / "encoder.safetensors")}
    assert card["dataset"] == "tiny"                          # the rest of the card is kept
    assert checkpoint.load_bundle(tiny_model_dir).threshold == det["threshold"]


def test_latent_radius_override_reaches_the_projection_and_the_cache_tag(tmp_path):
    from purifier.evaluation.evaluate import EvalConfig, _proj_tag

    cfg = EvalConfig(model_dir="m", out_dir=str(tmp_path), projection="paper", latent_radius=1.0)
    pc = cfg.projection_config(has_encoder=False)
    assert pc.latent_radius == 1.0 and pc.steps == 200 and pc.restarts == 10
    assert "sphere1" in _proj_tag(pc)
    assert "--latent-radius 1" in cfg.command()
    free = EvalConfig(model_dir="m", out_dir=str(tmp_path), projection="fast", latent_radius=0.0)
    assert free.projection_config(has_encoder=True).latent_radius == 0.0
