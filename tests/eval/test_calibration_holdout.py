"""The encoder's hold-out and the detection threshold: `train-encoder --holdout N` never trains on
the training split's last N images, and `purifier calibrate` chooses its threshold on that slice
(by default) and says so in the card, or warns when the encoder trained on the images it
calibrates on (such a threshold flags more clean traffic than its target)."""

from __future__ import annotations

import torch

from purifier import checkpoint, cli, data
from purifier.training import encoder as encoder_training


def _train(model_dir, data_dir, *extra):
    return cli.main(["train-encoder", "--model-dir", str(model_dir), "--dataset", "mnist", "--data-dir",
                     str(data_dir), "--steps", "2", "--batch-size", "8", "--device", "cpu", *extra])


def test_the_held_out_images_never_reach_the_encoder(tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    seen = []
    real_fit = encoder_training.fit_encoder

    def spy(generator, real_images, cfg, progress=None):
        seen.append(real_images.clone())
        return real_fit(generator, real_images, cfg, progress)

    monkeypatch.setattr(encoder_training, "fit_encoder", spy)
    assert _train(tiny_model_dir, tiny_data_dir, "--holdout", "100") == 0
    train = data.load("mnist", "train", tiny_data_dir)
    assert torch.equal(seen[0], train.images[:200])                      # 300 images, the last 100 held out
    section = checkpoint.read_card(tiny_model_dir)["encoder"]
    assert section["train_images"] == 200 and section["holdout"]["n"] == 100
    assert section["holdout"]["recon_error_of_encoder_alone"] > 0
    assert "heldout_recon_error_of_encoder_alone" in capsys.readouterr().out
    assert encoder_training.unseen_holdout(section) == 100

    # continuing it with a smaller hold-out keeps only that many unseen, whatever it says itself
    assert _train(tiny_model_dir, tiny_data_dir, "--holdout", "50",
                  "--init", str(tiny_model_dir / "encoder.safetensors")) == 0
    assert torch.equal(seen[1], train.images[:250])
    assert encoder_training.unseen_holdout(checkpoint.read_card(tiny_model_dir)["encoder"]) == 50
    # ... and a larger one than the encoder it continues cannot make the seen images unseen
    assert _train(tiny_model_dir, tiny_data_dir, "--holdout", "100",
                  "--init", str(tiny_model_dir / "encoder.safetensors")) == 0
    assert "was trained on some of the last 100 images" in capsys.readouterr().out
    section = checkpoint.read_card(tiny_model_dir)["encoder"]
    assert section["holdout"]["n"] == 100 and encoder_training.unseen_holdout(section) == 50
    # continuing without --holdout keeps the hold-out of the encoder it continues
    assert _train(tiny_model_dir, tiny_data_dir, "--init", str(tiny_model_dir / "encoder.safetensors")) == 0
    assert torch.equal(seen[-1], train.images[:250])
    assert checkpoint.read_card(tiny_model_dir)["encoder"]["holdout"]["n"] == 50
    assert encoder_training.unseen_holdout(None) == 0 and encoder_training.unseen_holdout({"file": "e"}) == 0

    assert _train(tiny_model_dir, tiny_data_dir, "--holdout", "300") == 2   # nothing left to train on
    assert "leaves none to train on" in capsys.readouterr().err
    assert _train(tiny_model_dir, tiny_data_dir, "--holdout", "-1") == 2
    assert "--holdout must be >= 0" in capsys.readouterr().err


def _calibrate(model_dir, data_dir, *extra):
    return cli.main(["calibrate", str(model_dir), "--dataset", "mnist", "--data-dir", str(data_dir),
                     "--projection", "fast", "--steps", "2", "--restarts", "2", "--n", "20", "--heldout-n", "20",
                     "--device", "cpu", "--no-progress", "--dry-run", *extra])


def test_calibrate_draws_from_the_encoders_hold_out_and_warns_when_it_saw_them(tiny_model_dir, tiny_data_dir,
                                                                                capsys):
    assert _train(tiny_model_dir, tiny_data_dir, "--holdout", "60") == 0
    capsys.readouterr()
    assert _calibrate(tiny_model_dir, tiny_data_dir) == 0
    out = capsys.readouterr().out
    assert '"slice": "last 60"' in out and '"unseen_by_encoder": true' in out and "warning" not in out

    assert _calibrate(tiny_model_dir, tiny_data_dir, "--holdout", "100") == 0    # reaches into what E saw
    out = capsys.readouterr().out
    assert '"unseen_by_encoder": false' in out
    assert "warning: the encoder" in out and "held out the last 60, the slice is the last 100" in out

    assert _train(tiny_model_dir, tiny_data_dir) == 0                            # no hold-out at all
    assert "holdout" not in checkpoint.read_card(tiny_model_dir)["encoder"]    # the old record is replaced
    capsys.readouterr()
    assert _calibrate(tiny_model_dir, tiny_data_dir) == 0
    out = capsys.readouterr().out
    assert '"slice": "last 300"' in out and '"unseen_by_encoder": false' in out   # 5000 > the 300 there are
    assert "was trained on the images this threshold is chosen on" in out

    # the paper preset never starts at E(x): the encoder's training does not matter to it
    assert cli.main(["calibrate", str(tiny_model_dir), "--dataset", "mnist", "--data-dir", str(tiny_data_dir),
                     "--steps", "2", "--restarts", "2", "--n", "20", "--heldout-n", "20", "--device", "cpu",
                     "--no-progress", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"unseen_by_encoder": null' in out and "warning" not in out
