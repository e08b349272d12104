"""scripts/prefix_accuracy.py: a finished eval's accuracy on the first K of its seeded images."""

import json
import struct

import numpy as np
import pytest
import torch

from purifier import data


def write_idx(path, arr):
    path.write_bytes(bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def _run(tmp_path, n=6, chunk=4, wrong=(1, 4)):
    ddir = tmp_path / "mnist"
    ddir.mkdir()
    write_idx(ddir / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    write_idx(ddir / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    y = data.subset(data.load("mnist", "test", ddir), n, 0).labels
    pred = y.clone()
    pred[list(wrong)] = (pred[list(wrong)] + 1) % 10          # images 1 and 4 misclassified
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "cache" / "run.json").write_text(json.dumps({"dataset": "mnist", "n": n, "seed": 0}))
    folder = run / "cache" / "purified" / "clean" / "L200-R10-sgd-lr10"
    folder.mkdir(parents=True)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        torch.save({"pred": pred[s:e], "seconds": torch.zeros(1)}, folder / f"{s:06d}-{e:06d}.pt")
    bb = run / "cache" / "purified" / "blackbox-x" / "holdout-1"
    bb.mkdir(parents=True)
    return run, ddir


def test_first_k_and_all(tmp_path, load_script, capsys):
    run, ddir = _run(tmp_path)
    load_script("prefix_accuracy").main([str(run), "--k", "3", "--data-dir", str(ddir)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1                                      # the black-box set is skipped
    assert lines[0]["set"] == "clean/L200-R10-sgd-lr10"
    assert lines[0]["accuracy_first_k"] == pytest.approx(2 / 3, abs=1e-4)
    assert lines[0]["accuracy_all"] == pytest.approx(4 / 6, abs=1e-4)


def test_a_gap_in_the_cache_is_an_error(tmp_path, load_script):
    run, ddir = _run(tmp_path)
    next((run / "cache" / "purified" / "clean" / "L200-R10-sgd-lr10").glob("000000-*.pt")).unlink()
    with pytest.raises(SystemExit, match="gap"):
        load_script("prefix_accuracy").main([str(run), "--k", "3", "--data-dir", str(ddir)])
