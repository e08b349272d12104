import pytest
import torch

from purifier import models
from purifier.models import Generator


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


@pytest.mark.parametrize("shape,blocks", [((1, 28, 28), 3), ((3, 32, 32), 3), ((1, 12, 20), 2), ((3, 64, 64), 4)])
def test_subpixel_generator_computes_the_same_function_and_input_gradient(shape, blocks):
    from purifier.models import SubpixelGenerator

    torch.manual_seed(0)
    g = Generator(latent_dim=16, channels=shape[0], height=shape[1], width=shape[2], dim=8, blocks=blocks).double()
    with torch.no_grad():   # non-trivial biases: the default init would hide a bias mix-up less well
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    s = SubpixelGenerator(g)
    z = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    target = torch.rand(5, *shape, dtype=torch.float64)
    out_g, out_s = g(z), s(z)
    assert out_s.shape == out_g.shape == (5, *shape)
    torch.testing.assert_close(out_s, out_g, rtol=1e-10, atol=1e-12)
    grad_g, = torch.autograd.grad(((out_g - target) ** 2).sum(), z)
    grad_s, = torch.autograd.grad(((s(z) - target) ** 2).sum(), z)
    torch.testing.assert_close(grad_s, grad_g, rtol=1e-10, atol=1e-12)
    assert s.config == g.config and s.latent_dim == g.latent_dim


def test_subpixel_generator_is_a_snapshot_of_the_weights():
    from purifier.models import SubpixelGenerator

    g = Generator(latent_dim=8, dim=4)
    s = SubpixelGenerator(g)
    z = torch.randn(2, 8)
    before = s(z)
    with torch.no_grad():
        g.up2.weight.add_(1.0)
    torch.testing.assert_close(s(z), before)        # documented: built once, for a frozen G
    assert not torch.allclose(g(z), before, atol=1e-3)
