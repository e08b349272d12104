"""The attacks on an undefended toy classifier, and against IBM ART's implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from purifier.evaluation import attacks


@pytest.fixture(scope="module")
def batch(make_toy_data):
    return make_toy_data(128, seed=1)


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", ["fgsm", "pgd", "cw"])
def test_attack_raises_loss_and_lowers_accuracy(toy_classifier, batch, name):
    x, y = batch
    gen = torch.Generator().manual_seed(0)
    adv = {"fgsm": lambda: attacks.fgsm(toy_classifier, x, y, 0.2),
           "pgd": lambda: attacks.pgd_linf(toy_classifier, x, y, 0.2, steps=20, generator=gen),
           "cw": lambda: attacks.cw_l2(toy_classifier, x, y, steps=50, binary_search_steps=3)}[name]()
    assert _acc(toy_classifier, x, y) == 1.0
    assert _acc(toy_classifier, adv, y) < 0.2
    assert _loss(toy_classifier, adv, y) > _loss(toy_classifier, x, y) or name == "cw"
    assert adv.min() >= 0 and adv.max() <= 1
    if name == "cw":  # minimal perturbation: it stops at the boundary, it does not push the loss up
        assert (adv - x).flatten(1).norm(dim=1).mean() < (attacks.fgsm(toy_classifier, x, y, 0.2) - x).flatten(1).norm(dim=1).mean()
    else:
        assert (adv - x).abs().max() <= 0.2 + 1e-6


def test_pgd_random_start_is_seeded_and_stays_in_the_ball(toy_classifier, batch):
    x, y = batch
    run = lambda s: attacks.pgd_linf(toy_classifier, x, y, 0.05, steps=1, step_size=0.001,
                                     generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert (run(1) - x).abs().max() <= 0.05 + 1e-6


def test_transfer_from_a_substitute_lowers_the_target_accuracy(toy_classifier, batch, train_toy_classifier):
    """Black box: FGSM computed on a separately trained classifier of another architecture."""
    x, y = batch
    substitute = train_toy_classifier("C", seed=3, steps=30)
    assert _acc(substitute, x, y) > 0.95
    adv = attacks.fgsm(substitute, x, y, 0.25)
    assert _acc(toy_classifier, adv, y) < 0.5


# --- against IBM ART (the maintained library) on the same model --------------------------------

art = pytest.importorskip("art", reason="adversarial-robustness-toolbox is in the test extra")


def _art_classifier(model):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                             nb_classes=2, clip_values=(0.0, 1.0), device_type="cpu")


def test_fgsm_matches_art_exactly(toy_classifier, batch):
    from art.attacks.evasion import FastGradientMethod

    x, y = batch
    ours = attacks.fgsm(toy_classifier, x, y, 0.1).numpy()
    theirs = FastGradientMethod(_art_classifier(toy_classifier), norm=np.inf, eps=0.1).generate(
        x.numpy(), y=np.eye(2)[y.numpy()])
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))


def test_pgd_matches_art_without_random_start(toy_classifier, batch):
    from art.attacks.evasion import ProjectedGradientDescent

    x, y = batch
    ours = attacks.pgd_linf(toy_classifier, x, y, 0.1, steps=10, step_size=0.02, random_start=False).numpy()
    theirs = ProjectedGradientDescent(_art_classifier(toy_classifier), norm=np.inf, eps=0.1, eps_step=0.02,
                                      max_iter=10, num_random_init=0, verbose=False).generate(
        x.numpy(), y=np.eye(2)[y.numpy()])
    # Same steps; ART adds and subtracts x when projecting, so allow float rounding.
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_pgd_with_random_start_is_as_strong_as_art(toy_classifier, batch):
    from art.attacks.evasion import ProjectedGradientDescent

    x, y = batch
    eps = 0.12
    ours = attacks.pgd_linf(toy_classifier, x, y, eps, steps=20, generator=torch.Generator().manual_seed(0))
    theirs = ProjectedGradientDescent(_art_classifier(toy_classifier), norm=np.inf, eps=eps,
                                      eps_step=2.5 * eps / 20, max_iter=20, num_random_init=1,
                                      verbose=False).generate(x.numpy(), y=np.eye(2)[y.numpy()])
    a_ours, a_theirs = _acc(toy_classifier, ours, y), _acc(toy_classifier, torch.from_numpy(theirs), y)
    assert a_ours < 0.9 and abs(a_ours - a_theirs) <= 0.1


@pytest.mark.slow  # ART's CW-L2 runs its line search in numpy: tens of seconds even here
def test_cw_is_comparable_to_art(toy_classifier, batch):
    from art.attacks.evasion import CarliniL2Method

    x, y = batch
    x, y = x[:8], y[:8]
    ours = attacks.cw_l2(toy_classifier, x, y, steps=100, binary_search_steps=5)
    theirs = torch.from_numpy(CarliniL2Method(_art_classifier(toy_classifier), max_iter=10,
                                              binary_search_steps=3, initial_const=0.1,
                                              verbose=False).generate(x.numpy()))
    ok_ours = toy_classifier(ours).argmax(1) != y
    ok_theirs = toy_classifier(theirs).argmax(1) != y
    assert ok_ours.float().mean() >= ok_theirs.float().mean()
    both = ok_ours & ok_theirs
    if both.any():  # where both succeed, ours is no larger (within tolerance)
        l2_ours = (ours - x).flatten(1).norm(dim=1)[both].mean()
        l2_theirs = (theirs - x).flatten(1).norm(dim=1)[both].mean()
        assert l2_ours < 1.5 * l2_theirs
