import gzip
import struct

import numpy as np
import pytest

from purifier import data
from purifier.errors import DataError


def write_idx(path, arr, compress=False):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte"
    write_idx(p, arr, compress)
    np.testing.assert_array_equal(data.read_idx(p), arr)


def test_read_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(bad)
    arr = np.zeros((2, 3), np.uint8)
    short = tmp_path / "short-idx"
    write_idx(short, arr)
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(DataError, match="short-idx"):
        data.read_idx(short)
    corrupt = tmp_path / "c.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataError, match="cannot read"):
        data.read_idx(corrupt)


def test_load_from_a_data_dir(tmp_path):
    imgs = (np.arange(5 * 28 * 28) % 256).astype(np.uint8).reshape(5, 28, 28)
    labels = np.arange(5, dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    split = data.load("mnist", "test", data_dir=tmp_path)
    assert split.images.shape == (5, 1, 28, 28)
    assert float(split.images.max()) <= 1.0
    assert split.labels.tolist() == [0, 1, 2, 3, 4]
    sub = data.subset(split, 3, seed=1)
    assert len(sub.labels) == 3 and sub.labels.tolist() == data.subset(split, 3, seed=1).labels.tolist()


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "candidate_dirs", lambda name, d=None: [tmp_path])
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        data.load("fashion-mnist", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        data.load("cifar", "train")


def test_xz_compressed_idx_files_are_read(tmp_path):
    import lzma

    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "plain", arr)
    (tmp_path / "train-images-idx3-ubyte.xz").write_bytes(lzma.compress((tmp_path / "plain").read_bytes()))
    assert np.array_equal(data.read_idx(tmp_path / "train-images-idx3-ubyte.xz"), arr)
    (tmp_path / "broken.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    with pytest.raises(DataError, match="cannot read"):
        data.read_idx(tmp_path / "broken.xz")
