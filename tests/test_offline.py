import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.utils import save_image

from purifier import checkpoint
from purifier.errors import InvalidInputError
from purifier.offline import purify_files, read_inputs
from purifier.projection import ProjectionConfig

CFG = ProjectionConfig(steps=5, restarts=2, seed=0)


def test_purify_png_files(tmp_path, tiny_model_dir):
    bundle = checkpoint.load_bundle(tiny_model_dir)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        save_image(torch.rand(1, 8, 8), str(p))
        paths.append(p)
    summary = purify_files(bundle, paths, tmp_path / "out", CFG, progress=False)
    assert summary["images"] == 3
    for i in range(3):
        assert (tmp_path / "out" / f"img{i}.png").is_file()
    rows = list(csv.DictReader(open(tmp_path / "out" / "errors.csv")))
    assert [r["name"] for r in rows] == ["img0", "img1", "img2"]
    assert all(float(r["reconstruction_error"]) >= 0 for r in rows)
    assert json.loads((tmp_path / "out" / "errors.json").read_text())["threshold"] == 0.05


def test_purify_npy_batch_and_bad_files(tmp_path, tiny_model_dir):
    bundle = checkpoint.load_bundle(tiny_model_dir)
    np.save(tmp_path / "batch.npy", (np.random.rand(4, 8, 8) * 255).astype(np.uint8))
    purify_files(bundle, [tmp_path / "batch.npy"], tmp_path / "out", CFG, progress=False)
    assert np.load(tmp_path / "out" / "purified.npy").shape == (4, 1, 8, 8)
    np.save(tmp_path / "big.npy", np.random.rand(2, 1, 9, 9).astype(np.float32))
    with pytest.raises(InvalidInputError, match="big.npy.*8x8"):
        read_inputs([tmp_path / "big.npy"], (1, 8, 8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InvalidInputError, match="broken.png"):
        read_inputs([tmp_path / "broken.png"], (1, 8, 8))


def test_cli_reports_errors_without_traceback(tmp_path, tiny_model_dir):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    proc = subprocess.run([sys.executable, "-m", "purifier.cli", "purify", str(tmp_path / "broken.png"),
                           "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--steps", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "broken.png" in proc.stderr and "Traceback" not in proc.stderr
