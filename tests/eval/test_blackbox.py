"""The paper's black-box protocol: Papernot et al.'s substitute trained on a black box's labels with
Jacobian-based augmentation, and its row in ``purifier eval``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from purifier.evaluation import attacks
from purifier.evaluation import evaluate as evaluate_module
from purifier.evaluation.evaluate import EvalConfig, run_evaluation
from purifier.models import Classifier
from purifier.projection import Projection


def toy_rule(x: torch.Tensor) -> torch.Tensor:
    """The toy task's true class: 0 when the top half is brighter (see conftest.toy_data)."""
    return (x[:, :, :4].mean((1, 2, 3)) < x[:, :, 4:].mean((1, 2, 3))).long()


def test_jacobian_augmentation_steps_along_the_sign_of_the_label_probability_gradient(toy_classifier,
                                                                                      make_toy_data):
    x, y = make_toy_data(16, seed=2)
    labels = 1 - y   # any labels: the step follows the given one
    new = attacks.jacobian_augmentation(toy_classifier, x, labels, 0.1, batch_size=5)
    for i in range(len(x)):   # one image at a time, by hand
        xi = x[i:i + 1].clone().requires_grad_(True)
        p = F.softmax(toy_classifier(xi), dim=1)[0, labels[i]]
        (g,) = torch.autograd.grad(p, xi)
        torch.testing.assert_close(new[i:i + 1], xi.detach() + 0.1 * g.sign(), rtol=0, atol=0)
    assert torch.isclose((new - x).abs(), torch.tensor(0.1)).float().mean() > 0.9   # a full step on ~every pixel
    # The step raises the substitute's probability of the label it follows.
    with torch.no_grad():
        before = F.softmax(toy_classifier(x), 1).gather(1, labels.view(-1, 1))
        after = F.softmax(toy_classifier(new), 1).gather(1, labels.view(-1, 1))
    assert (after >= before).float().mean() > 0.9


def test_substitute_learns_the_oracle_labels_and_the_set_doubles_each_round(make_toy_data):
    """A black box that answers the *opposite* of the true class: a substitute trained on its
    answers must learn the opposite, so it cannot be learning from the true labels."""
    calls = []

    def oracle(x, rnd):
        calls.append((rnd, x.clone()))
        return 1 - toy_rule(x)

    x0, y_true = make_toy_data(32, seed=5)
    y0 = 1 - toy_rule(x0)
    torch.manual_seed(0)
    model = Classifier("D", 1, 8, 8, num_classes=2)
    sub, xs, ys = attacks.papernot_substitute(model, oracle, x0, y0, rounds=3, lam=0.1, epochs=15,
                                              batch_size=16, lr=1e-2, seed=1)
    assert [(r, len(x)) for r, x in calls] == [(0, 32), (1, 64)]   # the new half each time
    assert len(xs) == len(ys) == 128                               # 32 * 2^(rounds-1)
    assert torch.equal(xs[:32], x0) and torch.equal(ys, 1 - toy_rule(xs))
    assert torch.equal(xs[32:64], calls[0][1]) and torch.equal(xs[64:], calls[1][1])
    # Each new point is one lambda step from its parent (unclipped: the original never clips).
    assert torch.allclose((xs[32:64] - xs[:32]).abs().amax((1, 2, 3)), torch.full((32,), 0.1))
    assert not sub.training
    xt, yt = make_toy_data(200, seed=9)
    with torch.no_grad():
        pred = sub(xt).argmax(1)
    assert (pred == 1 - yt).float().mean() > 0.9 and (pred == yt).float().mean() < 0.1


def test_substitute_training_is_seeded(make_toy_data):
    x0, _ = make_toy_data(16, seed=3)

    def run(seed):
        torch.manual_seed(0)
        model = Classifier("D", 1, 8, 8, num_classes=2)
        rng_before = torch.random.get_rng_state()
        sub, xs, _ = attacks.papernot_substitute(model, lambda x, r: toy_rule(x), x0, toy_rule(x0), rounds=2,
                                                 epochs=2, batch_size=8, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), rng_before)   # the caller's RNG untouched
        return xs, [p.clone() for p in sub.parameters()]

    (xa, pa), (xb, pb), (xc, pc) = run(1), run(1), run(2)
    assert torch.equal(xa, xb) and all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert not all(torch.equal(a, c) for a, c in zip(pa, pc))


# --- in `purifier eval` -------------------------------------------------------------------

def _config(model_dir, data_dir, out, **changes) -> EvalConfig:
    settings = dict(model_dir=str(model_dir), out_dir=str(out), dataset="mnist", data_dir=str(data_dir), n=10,
                    attacks=("blackbox",), eps=(0.3,), steps=2, restarts=1, blackbox_holdout=6, blackbox_n=8,
                    blackbox_rounds=2, blackbox_epochs=1, blackbox_arch="D", batch_size=4, seed=1)
    settings.update(changes)
    return EvalConfig(**settings)


@pytest.fixture
def constant_purifier(monkeypatch):
    """A deterministic fake defended model: the projection answers a grey image whatever it is
    given, so the defended model answers one class c = classifier(grey) for every query."""
    def project(generator, x, cfg, encoder=None):
        grey = torch.full_like(x, 0.5)
        return Projection(grey, torch.zeros(len(x)), torch.zeros(len(x), generator.latent_dim), cfg.steps)
    monkeypatch.setattr(evaluate_module, "project", project)


def _grey_class(model_dir) -> int:
    from purifier import checkpoint

    clf = checkpoint.load_bundle(model_dir, need_classifier=True).classifier
    with torch.no_grad():
        return int(clf(torch.full((1, 1, 8, 8), 0.5)).argmax(1))


@pytest.mark.parametrize("labels", ["defended", "true"])
def test_eval_blackbox_row_trains_on_the_defended_models_answers(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                  constant_purifier, labels):
    from purifier import data

    out = tmp_path / "bb"
    cfg = _config(tiny_model_dir, tiny_data_dir, out, blackbox_labels=labels)
    results = run_evaluation(cfg, progress=False, log=lambda *_: None)
    c = _grey_class(tiny_model_dir)
    test = data.load("mnist", "test", tiny_data_dir)
    holdout_y, eval_y = test.labels[:6], test.labels[6:14]

    saved = json.loads((out / "results.json").read_text())
    (row,) = saved["cells"]
    assert (row["threat"], row["attack"], row["eps"], row["n"]) == ("blackbox", "fgsm", 0.3, 8)
    p = row["protocol"]
    assert (p["holdout"], p["rounds"], p["lambda"], p["epochs_per_round"], p["substitute_arch"]) == (6, 2, 0.1, 1, "D")
    assert p["training_points"] == 12 and p["measured_images"] == "test[6:14] (file order)"
    # Every label the substitute saw is the defended model's answer (class c), except, with
    # "true", the held-out images' own labels.
    expected = torch.zeros(10, dtype=torch.int64)
    expected[c] += 6
    if labels == "true":
        expected += torch.bincount(holdout_y, minlength=10)
        assert p["oracle_queries"] == 6
    else:
        expected[c] += 6
        assert p["oracle_queries"] == 12
        assert p["holdout_label_agreement_with_truth"] == pytest.approx(float((holdout_y == c).float().mean()))
    assert p["label_counts"] == expected.tolist()
    # The purified column is the same defended model: it answers c on the measured images too.
    assert row["purified"]["correct"] == int((eval_y == c).sum())
    for key in ("undefended", "purified", "substitute_accuracy", "substitute_clean_accuracy", "undefended_clean"):
        acc = row[key]
        assert acc["n"] == 8 and acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1]
    assert row["perturbation"]["linf_mean"] <= 0.3 + 1e-6
    assert "| black-box, paper protocol (Papernot substitute) | FGSM | 0.3 | 8 |" in (out / "results.md").read_text()
    assert "grid-black-box-fgsm-eps-0.3" in saved["figures"]

    # A rerun trains nothing and attacks nothing again: the substitute and its chunks are cached.
    cached = {q: q.stat().st_mtime_ns for q in (out / "cache").rglob("*") if q.is_file() and q.name != "run.json"}
    again = run_evaluation(cfg, resume=True, progress=False, log=lambda *_: None)
    assert {q: q.stat().st_mtime_ns for q in cached} == cached
    strip = lambda cells: [{k: v for k, v in r.items() if k != "seconds"} for r in cells]  # noqa: E731
    assert strip(again["cells"]) == strip(results["cells"])


def test_blackbox_settings_are_checked(tiny_model_dir, tiny_data_dir, tmp_path):
    from purifier.errors import ConfigError

    with pytest.raises(ConfigError, match="blackbox_labels"):
        EvalConfig(model_dir=".", out_dir=".", blackbox_labels="oracle")
    with pytest.raises(ConfigError, match="blackbox_rounds"):
        EvalConfig(model_dir=".", out_dir=".", blackbox_rounds=0)
    with pytest.raises(ConfigError, match="holdout"):   # the tiny test split has 120 images
        run_evaluation(_config(tiny_model_dir, tiny_data_dir, tmp_path / "o", blackbox_holdout=120),
                       progress=False, log=lambda *_: None)


def test_eval_blackbox_can_ask_an_outside_oracle_instead_of_its_own_defended_model(tiny_model_dir, tiny_data_dir,
                                                                                     tmp_path, constant_purifier):
    """--blackbox-oracle: every label the substitute trains on is the oracle's (here: class 7 for
    every query, unlike the local defended model's grey class), asked once per point and kept
    for a resumed run; the purified column is still the local defended model."""
    from purifier import data
    from purifier.errors import ConfigError

    asked = []

    def oracle(x):
        asked.append(len(x))
        return torch.full((len(x),), 7, dtype=torch.int64)

    out = tmp_path / "bb-oracle"
    cfg = _config(tiny_model_dir, tiny_data_dir, out, blackbox_oracle="10.0.0.1:8081")
    with pytest.raises(ConfigError, match="oracle"):
        run_evaluation(cfg, progress=False, log=lambda *_: None)          # an address but nobody to ask it
    results = run_evaluation(cfg, progress=False, log=lambda *_: None, oracle=oracle)
    (row,) = results["cells"]
    p = row["protocol"]
    assert asked == [6, 6] and p["oracle_queries"] == 12
    assert p["label_counts"] == [0] * 7 + [12] + [0] * 2
    assert p["oracle"] == "10.0.0.1:8081 model classifier (V2 gRPC)"
    c = _grey_class(tiny_model_dir)
    eval_y = data.load("mnist", "test", tiny_data_dir).labels[6:14]
    assert row["purified"]["correct"] == int((eval_y == c).sum())     # measured with the local models
    assert "labelled by the served model at 10.0.0.1:8081" in (out / "results.md").read_text()
    assert "--blackbox-oracle 10.0.0.1:8081" in results["command"]
    run_evaluation(cfg, resume=True, progress=False, log=lambda *_: None, oracle=oracle)
    assert asked == [6, 6]                                               # a resumed run asks again for nothing
