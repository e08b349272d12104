"""The hinge recipe of `train-gan --loss hinge` (issue 9's cheaper recipe): a spectral-normalised
critic, the hinge loss, no gradient penalty; resumable exactly, recorded in the card, and kept
apart from WGAN-GP runs and models."""

import json

import pytest
import torch

from purifier import checkpoint, models
from purifier.errors import ConfigError
from purifier.training.gan import WGANGP, train
from test_train import _tiny, _weights, fake_dataset  # tests/ is on sys.path (rootdir conftest)


def _sigma(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2))


def test_spectral_norm_critic_keeps_its_layers_near_one_and_saves_round_trip(tmp_path):
    D = models.Critic(dim=4, spectral_norm=True)
    assert D.config["spectral_norm"] is True
    assert "spectral_norm" not in models.Critic(dim=4).config   # WGAN-GP critics' configs unchanged
    with torch.no_grad():
        D.net[2].parametrizations.weight.original.mul_(50.0)  # a layer far from norm 1
        for _ in range(30):                                   # power iterations run in training mode
            D(torch.rand(2, 1, 28, 28))
    assert _sigma(D.net[2].weight) == pytest.approx(1.0, abs=0.02)
    assert _sigma(D.net[2].parametrizations.weight.original) > 10
    checkpoint.save_module(D, tmp_path / "critic.safetensors", "critic")
    back = checkpoint.load_module(tmp_path / "critic.safetensors", "critic")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(back(x), D.eval()(x))   # u and v are saved with the weights


def test_hinge_step_has_no_penalty_and_trains_both_networks(tmp_path):
    cfg = _tiny(tmp_path, "x", loss="hinge", n_critic=1)
    m = WGANGP(cfg, torch.rand(8, 1, 28, 28), torch.device("cpu"))
    g0, d0 = m.G.fc.weight.detach().clone(), m.D.fc.parametrizations.weight.original.detach().clone()
    for _ in range(3):
        m.step()
    d_loss, g_loss, gp = m.stats.tolist()
    assert gp == 0.0 and 0.0 <= d_loss <= 4.0     # two hinge terms, each in [0, 2] near the start
    assert not torch.equal(m.G.fc.weight, g0)
    assert not torch.equal(m.D.fc.parametrizations.weight.original, d0)


def test_hinge_n_then_resume_n_equals_2n_exactly(tmp_path):
    fake_dataset(tmp_path / "data")
    kw = dict(loss="hinge", n_critic=1, lr=2e-4, beta2=0.999)
    straight = train(_tiny(tmp_path, "straight", iterations=6, **kw), progress=False)
    train(_tiny(tmp_path, "split", iterations=3, **kw), progress=False)
    second = train(_tiny(tmp_path, "split", iterations=6, **kw), resume=True, progress=False)
    assert straight["iterations"] == second["iterations"] == 6
    _, a = _weights(tmp_path / "straight")
    _, b = _weights(tmp_path / "split")
    assert a.keys() == b.keys() and any(k.endswith("_u") for k in a)   # the power-iteration vectors too
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [s["loss"] for s in second["segments"]] == ["hinge", "hinge"]


def test_hinge_export_records_its_recipe_and_the_service_loads_its_generator(tmp_path):
    fake_dataset(tmp_path / "data")
    cfg = _tiny(tmp_path, "run", iterations=2, loss="hinge", n_critic=1, out_dir=str(tmp_path / "model"))
    train(cfg, progress=False)
    t = json.loads((tmp_path / "model" / "card.json").read_text())["generator"]["training"]
    assert t["recipe"].startswith("hinge loss, spectral-normalised critic, no gradient penalty (1 critic step ")
    assert "--loss hinge" in t["command"] and t["settings"]["loss"] == "hinge"
    g = checkpoint.load_generator(tmp_path / "model" / "generator.safetensors")
    assert g(torch.randn(2, 128)).shape == (2, 1, 28, 28)
    assert checkpoint.load_module(tmp_path / "model" / "critic.safetensors", "critic").config["spectral_norm"]


def test_a_run_keeps_its_loss(tmp_path):
    fake_dataset(tmp_path / "data")
    train(_tiny(tmp_path, "run", iterations=1, out_dir=str(tmp_path / "wgan")), progress=False)
    with pytest.raises(ConfigError, match="is a wgan-gp run; resume it with --loss wgan-gp"):
        train(_tiny(tmp_path, "run", iterations=2, loss="hinge"), resume=True, progress=False)
    with pytest.raises(ConfigError, match="its critic is a WGAN-GP critic and this run trains --loss hinge"):
        train(_tiny(tmp_path, "other", iterations=2, loss="hinge", warm_start=str(tmp_path / "wgan")),
              progress=False)
    with pytest.raises(ValueError, match="GAN loss 'lsgan'"):
        WGANGP(_tiny(tmp_path, "x", loss="lsgan"), torch.rand(4, 1, 28, 28), torch.device("cpu"))
