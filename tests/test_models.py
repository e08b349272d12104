import pytest
import torch

from purifier import models


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_generator_makes_images_of_the_configured_shape(shape):
    g = models.Generator(latent_dim=16, channels=shape[0], height=shape[1], width=shape[2], dim=4)
    out = g(torch.randn(5, 16))
    assert out.shape == (5, *shape)
    assert out.min() >= 0 and out.max() <= 1  # sigmoid output


def test_paper_generator_layout():
    g = models.Generator()
    assert g.fc.out_features == 4 * 4 * 256
    assert [m.out_channels for m in (g.up1, g.up2, g.up3)] == [128, 64, 1]
    assert g(torch.randn(2, 128)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_critic_and_classifiers_accept_the_shape(shape):
    x = torch.rand(3, *shape)
    assert models.Critic(*shape, dim=8)(x).shape == (3,)
    for arch in models.Classifier.ARCHS:
        assert models.Classifier(arch, *shape)(x).shape == (3, 10)
    assert models.Encoder(12, *shape, dim=4)(x).shape == (3, 12)


def test_build_round_trips_config():
    g = models.Generator(latent_dim=8, channels=3, height=32, width=32, dim=4)
    again = models.build("generator", g.config)
    assert again.config == g.config
    with pytest.raises(ValueError, match="unknown"):
        models.build("classifier", {"arch": "Z"})


def test_bad_generator_size_is_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        models.Generator(channels=1, height=30, width=30)
