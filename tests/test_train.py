"""Training smoke tests on a few synthetic images: checkpoint, resume, export. They check
plumbing (files, cards, resumption), not model quality."""

import json

import numpy as np
import pytest
import torch

from purifier import checkpoint
from purifier.training import parts
from purifier.training.classifier import ClassifierTrainConfig, random_shift
from purifier.training.classifier import train as train_classifier
from purifier.training.gan import GANTrainConfig, Run, WGANGP, train, train_many
from test_data import write_idx  # tests/ is on sys.path (rootdir conftest)


def fake_dataset(tmp_path, n=16):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


def test_gan_training_checkpoints_resumes_and_exports(tmp_path):
    data_dir = fake_dataset(tmp_path / "data")
    cfg = GANTrainConfig(dataset="mnist", data_dir=str(data_dir), run_dir=str(tmp_path / "run"),
                         out_dir=None, iterations=2, batch_size=4, n_critic=1, dim=4,
                         checkpoint_every=1, sample_every=2)
    first = train(cfg, progress=False)
    assert first["iterations"] == 2
    assert (tmp_path / "run" / "samples" / "iter000002.png").is_file()
    cfg.iterations, cfg.out_dir = 3, str(tmp_path / "model")
    second = train(cfg, resume=True, progress=False)
    assert second["iterations"] == 3
    assert [s["from_iteration"] for s in second["segments"]] == [0, 2]
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["generator"]["training"]["iterations"] == 3
    assert card["generator"]["training"]["export_selection"]["exported"] in ("G", "G_ema")
    g = checkpoint.load_generator(tmp_path / "model" / "generator.safetensors")
    assert g(torch.randn(2, 128)).shape == (2, 1, 28, 28)
    assert card["generator"]["training"]["recipe"].startswith("WGAN-GP (GP 10.0, 1 critic step per G step")
    assert card["generator"]["training"]["recipe"].endswith("(warm-up min(decay, (1+t)/(10+t)))")


def test_card_recipe_without_ema_still_names_the_recipe(tmp_path):
    data_dir = fake_dataset(tmp_path / "data")
    cfg = GANTrainConfig(dataset="mnist", data_dir=str(data_dir), run_dir=str(tmp_path / "run"),
                         out_dir=str(tmp_path / "model"), iterations=1, batch_size=4, n_critic=1, dim=4,
                         ema=0, sample_every=0)
    train(cfg, progress=False)
    recipe = json.loads((tmp_path / "model" / "card.json").read_text())["generator"]["training"]["recipe"]
    assert recipe.startswith("WGAN-GP (GP 10.0") and recipe.endswith("; no EMA")


def _tiny(tmp_path, name, **kw):
    base = dict(dataset="mnist", data_dir=str(tmp_path / "data"), run_dir=str(tmp_path / name), out_dir=None,
                batch_size=4, n_critic=2, dim=4, checkpoint_every=1000, sample_every=1000, log_every=1)
    return GANTrainConfig(**{**base, **kw})


def _weights(run_dir):
    state = parts.load(run_dir / "checkpoint")
    return state, {f"{k}.{n}": t for k in ("G", "D", "G_ema") for n, t in state[k].items()}


def test_n_then_resume_n_equals_2n_exactly(tmp_path):
    fake_dataset(tmp_path / "data")
    straight = train(_tiny(tmp_path, "straight", iterations=6), progress=False)
    first = train(_tiny(tmp_path, "split", iterations=3), progress=False)
    second = train(_tiny(tmp_path, "split", iterations=6), resume=True, progress=False)
    assert (straight["iterations"], first["iterations"], second["iterations"]) == (6, 3, 6)
    a_state, a = _weights(tmp_path / "straight")
    b_state, b = _weights(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for opt in ("opt_g", "opt_d"):
        for i, st in a_state[opt]["state"].items():
            assert torch.equal(st["exp_avg_sq"], b_state[opt]["state"][i]["exp_avg_sq"])
            assert float(st["step"]) == 6 * (2 if opt == "opt_d" else 1)
    assert torch.equal(a_state["rng"], b_state["rng"])


def test_training_changes_weights_and_stops_at_time_limit(tmp_path):
    fake_dataset(tmp_path / "data")
    cfg = _tiny(tmp_path, "run", iterations=10**6)
    summary = train(cfg, progress=False, max_seconds=0.0)  # stops after its first iteration
    assert summary["iterations"] == 1 and not summary["finished"]
    state, w = _weights(tmp_path / "run")
    fresh = WGANGP(cfg, torch.rand(8, 1, 28, 28), torch.device("cpu"))
    assert not torch.equal(w["G.fc.weight"], fresh.G.fc.weight.detach())
    assert torch.equal(fresh.G.fc.weight, fresh.G_ema.fc.weight)  # EMA starts at G


def test_update_on_external_draws_matches_step(tmp_path):
    """What check_graph relies on: update() on a copy of another model's draws trains the same
    weights as that model's own step() (the graph replays update() on copied draws)."""
    cfg = _tiny(tmp_path, "x")
    images = torch.rand(8, 1, 28, 28)
    a, c = WGANGP(cfg, images, torch.device("cpu")), WGANGP(cfg, images, torch.device("cpu"))
    state = a.gen.get_state()
    a.step()
    a.gen.set_state(state)
    draws = tuple(t.clone() for t in a.draw())
    c.update(*draws)
    for p, q in zip([*a.G.parameters(), *a.D.parameters(), *a.G_ema.parameters()],
                    [*c.G.parameters(), *c.D.parameters(), *c.G_ema.parameters()]):
        assert torch.equal(p, q)
    assert float(a.count) == 1.0 and a.stats.abs().sum() > 0


def test_checkpoint_parts_are_bounded_and_verified(tmp_path):
    obj = {"w": torch.arange(10_000, dtype=torch.float32), "n": 3}
    written = parts.save(obj, tmp_path / "ck", part_bytes=8192)
    assert len(written) >= 5 and all(p.stat().st_size <= 8192 for p in written)
    back = parts.load(tmp_path / "ck")
    assert torch.equal(back["w"], obj["w"]) and back["n"] == 3
    raw = bytearray(written[1].read_bytes())
    raw[0] ^= 0xFF
    written[1].write_bytes(bytes(raw))
    with pytest.raises(parts.CheckpointError, match="damaged"):
        parts.load(tmp_path / "ck")
    written[1].write_bytes(bytes(raw[:1]) + bytes(raw[1:]))  # still damaged; now drop another part
    written[2].unlink()
    with pytest.raises(parts.CheckpointError, match="damaged|missing"):
        parts.load(tmp_path / "ck")
    parts.save(obj, tmp_path / "ck", part_bytes=8192)  # rewriting replaces the folder whole
    (tmp_path / "ck" / "part-002.bin").unlink()
    with pytest.raises(parts.CheckpointError, match="missing"):
        parts.load(tmp_path / "ck")


def test_two_datasets_train_together_with_snapshots(tmp_path):
    fake_dataset(tmp_path / "data")
    cfgs = [_tiny(tmp_path, f"run-{i}", iterations=4, seed=i, snapshot_at=(2, 4)) for i in range(2)]
    out = train_many(cfgs, progress=False)
    assert [s["iterations"] for s in out] == [4, 4]
    for i in range(2):
        snaps = sorted(p.name for p in (tmp_path / f"run-{i}" / "snapshots").iterdir())
        assert snaps == ["iter000002-G.safetensors", "iter000002-G_ema.safetensors",
                         "iter000004-G.safetensors", "iter000004-G_ema.safetensors"]
    a, b = _weights(tmp_path / "run-0")[1], _weights(tmp_path / "run-1")[1]
    assert not torch.equal(a["G.fc.weight"], b["G.fc.weight"])  # different seeds, separate runs


def test_classifier_training_exports_with_card(tmp_path):
    data_dir = fake_dataset(tmp_path / "data")
    cfg = ClassifierTrainConfig(dataset="mnist", data_dir=str(data_dir), arch="D",
                                out_dir=str(tmp_path / "model"), name="substitute", epochs=1,
                                batch_size=8, shift=2)
    summary = train_classifier(cfg, progress=False)
    assert 0.0 <= summary["metrics"]["clean_test_accuracy"] <= 1.0
    assert checkpoint.load_module(tmp_path / "model" / "substitute.safetensors", "classifier").config["arch"] == "D"
    assert "substitute" in json.loads((tmp_path / "model" / "card.json").read_text())


def test_random_shift_moves_content_without_changing_it():
    x = torch.zeros(4, 1, 6, 6)
    x[:, :, 3, 3] = 1.0
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(y.sum((1, 2, 3)), x.sum((1, 2, 3)))


def test_warm_start_continues_from_an_exported_generator_and_critic(tmp_path):
    fake_dataset(tmp_path / "data")
    train(_tiny(tmp_path, "first", iterations=3, out_dir=str(tmp_path / "model")), progress=False)
    shipped = checkpoint.load_module(tmp_path / "model" / "generator.safetensors", "generator")
    critic = checkpoint.load_module(tmp_path / "model" / "critic.safetensors", "critic")
    cfg = _tiny(tmp_path, "second", iterations=3, warm_start=str(tmp_path / "model"))
    run = train_many([cfg], progress=False)[0]
    assert run["iterations"] == 3                       # already there: nothing to do
    cfg = _tiny(tmp_path, "third", iterations=5, warm_start=str(tmp_path / "model"))
    from purifier.training.gan import Run
    r = Run(cfg, resume=True)
    assert r.it == 3 and float(r.model.count) == 3.0
    assert torch.equal(r.model.G.fc.weight, shipped.fc.weight) and torch.equal(r.model.G_ema.fc.weight, shipped.fc.weight)
    assert torch.equal(r.model.D.fc.weight, critic.fc.weight)
    assert train(cfg, resume=True, progress=False)["iterations"] == 5


SN1 = dict(spectral_norm=True, gp_weight=0.0, n_critic=1)


def test_spectral_norm_run_resumes_exactly_and_exports_a_plain_critic(tmp_path):
    """N + resume N == 2N with the power-iteration vectors in the checkpoint, and an exported
    critic that loads as the plain Critic the card describes, its weights W / sigma(W)."""
    from torch.nn.utils import parametrize

    fake_dataset(tmp_path / "data")
    train(_tiny(tmp_path, "straight", iterations=4, **SN1), progress=False)
    train(_tiny(tmp_path, "split", iterations=2, **SN1), progress=False)
    last = train(_tiny(tmp_path, "split", iterations=4, out_dir=str(tmp_path / "model"), **SN1),
                 resume=True, progress=False)
    a_state, a = _weights(tmp_path / "straight")
    b_state, b = _weights(tmp_path / "split")
    assert any("parametrizations.weight.original" in k for k in a) and any(k.endswith("_u") for k in a)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert last["segments"][0]["spectral_norm"] is True
    card = json.loads((tmp_path / "model" / "card.json").read_text())["generator"]["training"]
    assert "--spectral-norm --gp-weight 0.0" in card["command"]
    critic = checkpoint.load_module(tmp_path / "model" / "critic.safetensors", "critic")
    assert not any(parametrize.is_parametrized(m) for m in critic.modules())
    r = Run(_tiny(tmp_path, "split", iterations=4, **SN1), resume=True)
    x = torch.rand(3, 1, 28, 28)
    r.model.D.eval()   # eval: the parametrisation uses the stored vectors without a power-iteration step
    with torch.no_grad():
        assert torch.allclose(critic(x), r.model.D(x), atol=1e-5)


def test_wgan_loss_with_spectral_norm_and_no_penalty(tmp_path, monkeypatch):
    """--spectral-norm --gp-weight 0: the WGAN loss with the penalty's double backward skipped
    (the penalty term is 0, the critic loss can go negative) and a card that says so."""
    fake_dataset(tmp_path / "data")
    cfg = _tiny(tmp_path, "run", iterations=3, spectral_norm=True, gp_weight=0.0, n_critic=1,
                out_dir=str(tmp_path / "model"))
    train(cfg, progress=False)
    state, _ = _weights(tmp_path / "run")
    hist = json.loads(state["history"])
    assert len(hist) == 3 and all(h["gp"] == 0.0 for h in hist)
    recipe = json.loads((tmp_path / "model" / "card.json").read_text())["generator"]["training"]["recipe"]
    assert recipe.startswith("WGAN loss (spectral norm on the critic, no GP, 1 critic step per G step, Adam 0.0001")
    calls = []
    import purifier.training.gan as gan
    real_gp = gan.gradient_penalty
    monkeypatch.setattr(gan, "gradient_penalty", lambda *a: calls.append(1) or real_gp(*a))
    m = WGANGP(cfg, torch.rand(8, 1, 28, 28), torch.device("cpu"))
    m.step()
    assert calls == []                              # no double backward paid for a zero weight
    m.cfg.gp_weight = 10.0
    m.step()
    assert calls == [1]


def test_resume_with_another_critic_parametrisation_is_a_clear_error(tmp_path):
    from purifier.errors import ConfigError

    fake_dataset(tmp_path / "data")
    train(_tiny(tmp_path, "run", iterations=1, **SN1), progress=False)
    with pytest.raises(ConfigError, match="trained with --spectral-norm"):
        train(_tiny(tmp_path, "run", iterations=2, **{**SN1, "spectral_norm": False}), resume=True, progress=False)
    with pytest.raises(ConfigError, match="gp_weight must be >= 0"):
        _tiny(tmp_path, "x", gp_weight=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_spectral_norm_graph_step_matches_eager(tmp_path):
    """The spectral norm's power iteration updates buffers in place: the capture must replay it."""
    from purifier.training.gan import check_graph

    cfg = _tiny(tmp_path, "gpu", iterations=3, device="cuda", **SN1)
    assert check_graph(cfg, torch.rand(8, 1, 28, 28), torch.device("cuda"), iterations=3)["ok"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_matches_eager_and_resumes(tmp_path):
    """On CUDA: graph replays equal eager updates on the same draws; a graph run resumes."""
    from purifier.training.gan import check_graph

    fake_dataset(tmp_path / "data")
    cfg = _tiny(tmp_path, "gpu", iterations=3, device="cuda", log_every=2)
    assert check_graph(cfg, torch.rand(8, 1, 28, 28), torch.device("cuda"), iterations=3)["ok"]
    first = train(cfg, progress=False)
    cfg.iterations = 6
    second = train(cfg, resume=True, progress=False)
    assert (first["iterations"], second["iterations"]) == (3, 6)
    assert [s["mode"] for s in second["segments"]] == ["cuda_graph", "cuda_graph"]


def test_selection_by_defense_scores_every_candidate_and_picks_the_best(tmp_path):
    from purifier.training import selection
    from purifier.errors import ModelLoadError
    from purifier.models import Classifier, Generator

    fake_dataset(tmp_path / "data", n=12)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    checkpoint.save_module(Classifier("D"), model_dir / "classifier.safetensors", "classifier")
    with pytest.raises(ModelLoadError, match="substitute"):
        selection.choose({"a": Generator(dim=4)}, model_dir, "mnist", str(tmp_path / "data"), n=4)
    checkpoint.save_module(Classifier("D"), model_dir / "substitute.safetensors", "classifier")
    cands = {"a": Generator(dim=4), "b": Generator(dim=4)}
    best, report = selection.choose(cands, model_dir, "mnist", str(tmp_path / "data"), n=6)
    scores = report["scores"]
    assert set(scores) == {"a", "b"} and best in cands
    key = lambda k: (scores[k]["attacked_accuracy"], scores[k]["clean_accuracy"])  # noqa: E731
    assert key(best) == max(key(k) for k in scores)
    assert all(0 <= s["attacked_accuracy"] <= 1 and s["clean_reconstruction_error"] > 0 for s in scores.values())
    with pytest.raises(ValueError, match="defense"):
        selection.choose(cands, model_dir, "mnist", str(tmp_path / "data"), n=6, by="clean")


def test_defense_criterion_weighs_clean_accuracy_against_attacked():
    """The 2026-11-27 lease's Fashion-MNIST scores: "transfer" ships G, "defense" its EMA."""
    from purifier.training.selection import CRITERIA

    scores = {"G": {"clean_accuracy": 0.826, "attacked_accuracy": 0.182},
              "G_ema": {"clean_accuracy": 0.834, "attacked_accuracy": 0.180}}
    pick = {by: max(scores, key=lambda k: CRITERIA[by](scores[k])) for by in CRITERIA}
    assert pick == {"transfer": "G", "defense": "G_ema"}
    tie = {"a": {"clean_accuracy": 0.9, "attacked_accuracy": 0.5}, "b": {"clean_accuracy": 0.8, "attacked_accuracy": 0.6}}
    assert max(tie, key=lambda k: CRITERIA["defense"](tie[k])) == "b"  # equal means: the attacked one decides


def test_selection_projects_with_the_shortened_paper_search_and_no_encoder(tmp_path, monkeypatch):
    """Not `fast`: its 50 Adam steps from random starts rank generators against their training
    (docs/results.md, "Choosing a generator")."""
    from purifier.models import Classifier, Generator
    from purifier.training import selection

    fake_dataset(tmp_path / "data", n=12)
    model_dir = tmp_path / "model"
    for f in ("classifier", "substitute"):
        checkpoint.save_module(Classifier("D"), model_dir / f"{f}.safetensors", "classifier")
    seen = []
    real_project = selection.project
    monkeypatch.setattr(selection, "project", lambda g, x, cfg: seen.append(cfg) or real_project(g, x, cfg))
    _, report = selection.choose({"a": Generator(dim=4)}, model_dir, "mnist", str(tmp_path / "data"), n=4)
    assert len(seen) == 2   # clean and attacked
    assert {(c.steps, c.restarts, c.encoder_starts, c.optimizer, c.lr) for c in seen} == {(100, 4, 0, "sgd", 10.0)}
    assert "L=100 R=4" in report["measured_on"] and "no encoder start" in report["measured_on"]


def test_score_generators_script_scores_and_pairs_every_generator(tmp_path, monkeypatch, load_script):
    """scripts/score_generators.py (comparing generators between leases) on tiny models."""
    import sys

    from purifier.models import Classifier, Generator

    mod = load_script("score_generators")
    fake_dataset(tmp_path / "data", n=12)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    for f in ("classifier", "substitute"):
        checkpoint.save_module(Classifier("D"), model_dir / f"{f}.safetensors", "classifier")
    for name in ("a", "b"):
        checkpoint.save_module(Generator(dim=4), tmp_path / f"{name}.safetensors", "generator")
    out = tmp_path / "scores.json"
    argv = ["score_generators.py", "--model-dir", str(model_dir), "--dataset", "mnist", "--data-dir",
            str(tmp_path / "data"), "--n", "5", "--projection", "paper:steps=3,restarts=2", "--reference", "a",
            "--out", str(out), f"a={tmp_path / 'a.safetensors'}", f"b={tmp_path / 'b.safetensors'}"]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    doc = json.loads(out.read_text())
    gens = doc["generators"]
    assert set(gens) == {"a", "b"} and doc["reference"] == "a" and len(doc["commands"]) == 1
    for row in gens.values():
        assert set(row["correct"]) == {"clean", "transfer", "oblivious"}
        assert all(len(v) == 5 for v in row["correct"].values())
        assert 0 <= row["transfer"]["accuracy"] <= 1 and row["clean"]["reconstruction_error"] > 0
    diff = gens["b"]["minus_reference"]["clean"]["mean"]
    assert diff == pytest.approx((sum(gens["b"]["correct"]["clean"]) - sum(gens["a"]["correct"]["clean"])) / 5)
    mod.main()                                        # a rerun keeps what it has
    assert json.loads(out.read_text())["generators"]["a"]["correct"] == gens["a"]["correct"]


def test_sigterm_checkpoints_and_stops_without_exporting(tmp_path):
    """A preempted or Ctrl-C'd run keeps its progress: the signal ends the iteration, the
    checkpoint is written, nothing half-selected is exported, and the handlers are put back."""
    import os
    import signal
    import threading

    from purifier.cli import main

    fake_dataset(tmp_path / "data")
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        rc = main(["train-gan", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                   "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "model"), "--iterations", "1000000",
                   "--batch-size", "4", "--n-critic", "1", "--checkpoint-every", "1000000",
                   "--sample-every", "0", "--no-progress"])
    finally:
        timer.cancel()
    assert rc == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    state = parts.load(tmp_path / "run" / "checkpoint")
    assert 1 <= state["iteration"] < 1000000
    assert not (tmp_path / "model" / "generator.safetensors").exists()
    resumed = train(GANTrainConfig(dataset="mnist", data_dir=str(tmp_path / "data"), run_dir=str(tmp_path / "run"),
                                   out_dir=None, iterations=state["iteration"] + 1, batch_size=4, n_critic=1,
                                   sample_every=0), resume=True, progress=False)
    assert resumed["iterations"] == state["iteration"] + 1 and "stopped_by" not in resumed


def test_time_limit_summary_says_so(tmp_path):
    fake_dataset(tmp_path / "data")
    summary = train(_tiny(tmp_path, "run", iterations=10**6), progress=False, max_seconds=0.0)
    assert summary["stopped_by"] == "time limit" and not summary["finished"]
    done = train(_tiny(tmp_path, "run", iterations=summary["iterations"] + 1), resume=True, progress=False)
    assert done["finished"] and "stopped_by" not in done
