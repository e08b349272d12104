"""Training smoke tests on a few synthetic images: checkpoint, resume, export. They check
plumbing (files, cards, resumption), not model quality."""

import json

import numpy as np
import torch

from purifier import checkpoint
from purifier.train_classifier import ClassifierTrainConfig, random_shift
from purifier.train_classifier import train as train_classifier
from purifier.train_gan import GANTrainConfig, train
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
