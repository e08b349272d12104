import json

import pytest
import torch

from purifier import checkpoint, models
from purifier.errors import ModelLoadError


def test_safetensors_round_trip_keeps_config_and_weights(tmp_path):
    g = models.Generator(latent_dim=8, channels=3, height=32, width=32, dim=4)
    path = tmp_path / "g.safetensors"
    checkpoint.save_module(g, path, "generator")
    loaded = checkpoint.load_module(path, "generator")
    assert loaded.config == g.config
    assert not loaded.training
    z = torch.randn(2, 8)
    torch.testing.assert_close(loaded(z), g(z))


def test_wrong_kind_and_garbage_are_refused(tmp_path):
    c = models.Classifier("D", 1, 8, 8)
    checkpoint.save_module(c, tmp_path / "c.safetensors", "classifier")
    with pytest.raises(ModelLoadError, match="expected a generator"):
        checkpoint.load_module(tmp_path / "c.safetensors", "generator")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        checkpoint.load_module(tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        checkpoint.load_module(tmp_path / "missing.safetensors")


def test_bundle_and_card(tiny_model_dir):
    bundle = checkpoint.load_bundle(tiny_model_dir)
    assert bundle.image_shape == (1, 8, 8)
    assert bundle.latent_dim == 8
    assert bundle.threshold == 0.05
    assert bundle.classifier is not None and bundle.encoder is not None
    assert all(not p.requires_grad for p in bundle.generator.parameters())
    card = checkpoint.update_card(tiny_model_dir, detection={"threshold": 0.1}, extra={"a": 1})
    assert card["detection"] == {"threshold": 0.1, "target_fpr": 0.05}
    assert json.loads((tiny_model_dir / "card.json").read_text())["extra"] == {"a": 1}


def test_torch_export_generator_with_card(tmp_path, tiny_gen):
    ep = torch.export.export(tiny_gen, (torch.randn(2, 8),),
                             dynamic_shapes={"z": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(ep, str(tmp_path / "gen.pt2"))
    with pytest.raises(ModelLoadError, match="JSON card"):
        checkpoint.load_generator(tmp_path / "gen.pt2")
    (tmp_path / "gen.json").write_text(json.dumps({"latent_dim": 8, "image_shape": [1, 8, 8]}))
    g = checkpoint.load_generator(tmp_path / "gen.pt2")
    assert g.latent_dim == 8 and g.image_shape.as_tuple() == (1, 8, 8)
    z = torch.randn(3, 8)
    torch.testing.assert_close(g(z), tiny_gen(z))
    (tmp_path / "gen.json").write_text(json.dumps({"latent_dim": 8, "image_shape": [1, 16, 16]}))
    with pytest.raises(ModelLoadError, match="card says"):
        checkpoint.load_generator(tmp_path / "gen.pt2")
