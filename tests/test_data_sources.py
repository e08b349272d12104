"""Data from where users keep it (issue 14, item 1): image folders (ImageFolder layout and flat),
NPY/NPZ arrays and IDX files give the same tensors; bad data gives one-line errors naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from purifier import cli, data
from purifier.errors import DataError
from purifier.training.gan import GANTrainConfig, train, training_images
from purifier.training import parts
from test_data import write_idx  # tests/ is on sys.path (rootdir conftest)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def png(path: Path, img: torch.Tensor) -> None:
    """Write uint8 (C, H, W) as an image file (the suffix says which format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = img.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)


def export_folder(root: Path, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    """uint8 (N, C, H, W) as numbered PNGs: in class subfolders when labels are given, else flat."""
    for i, img in enumerate(images):
        sub = root / str(int(labels[i])) if labels is not None else root
        png(sub / f"{i:05d}.png", img)


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def by_class(split: data.Split) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageFolder's order (class, then file name) of an IDX split whose files are numbered."""
    order = torch.sort(split.labels, stable=True).indices
    return split.images[order], split.labels[order]


@pytest.fixture
def idx_slice(tmp_path):
    """A small IDX data set (random 28x28 uint8, 4 classes) and its uint8 images and labels."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 4, 24, dtype=np.uint8)
    d = tmp_path / "idx"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", x)
    write_idx(d / "train-labels-idx1-ubyte", y)
    return d, torch.from_numpy(x)[:, None], torch.from_numpy(y.astype(np.int64))


def test_folder_npz_and_idx_give_identical_tensors(tmp_path, idx_slice):
    d, x, y = idx_slice
    ref = data.load(d, "train")                                   # a folder of IDX files
    assert ref.image_shape == (1, 28, 28) and ref.labelled and torch.equal(ref.labels, y)
    export_folder(tmp_path / "classes", x, y)
    export_folder(tmp_path / "flat", x, None)
    np.savez(tmp_path / "a.npz", x=x[:, 0].numpy(), y=y.numpy())
    classes = data.load(tmp_path / "classes")
    assert classes.classes == ("0", "1", "2", "3") and classes.whole
    assert (torch.equal(classes.images, by_class(ref)[0]) and torch.equal(classes.labels, by_class(ref)[1]))
    flat = data.load(tmp_path / "flat")
    assert torch.equal(flat.images, ref.images) and not flat.labelled and (flat.labels == -1).all()
    arrays = data.load(tmp_path / "a.npz")
    assert torch.equal(arrays.images, ref.images) and torch.equal(arrays.labels, ref.labels)
    single = data.load(d / "train-images-idx3-ubyte")           # one IDX file finds its labels
    assert torch.equal(single.images, ref.images) and torch.equal(single.labels, ref.labels)


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Fashion-MNIST IDX files (dataset-fashion-mnist)")
def test_fashion_mnist_as_png_folder_trains_on_the_same_tensors(tmp_path):
    """Fashion-MNIST's first 200 training images exported to a folder of PNGs (train/<class>/)
    and to IDX files: the loaded tensors are equal, and so is a WGAN-GP run on each."""
    full = data.load("fashion-mnist", "train")
    n = 200
    export_folder(tmp_path / "png" / "train", as_uint8(full.images[:n]), full.labels[:n])
    (tmp_path / "idx").mkdir()
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte", as_uint8(full.images[:n])[:, 0].numpy())
    write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte", full.labels[:n].numpy().astype(np.uint8))
    folder = data.load(tmp_path / "png", "train")
    idx = data.load(tmp_path / "idx", "train")
    assert folder.source.endswith("train") and not folder.whole
    images, labels = by_class(data.Split(full.images[:n], full.labels[:n], "fashion-mnist"))
    assert torch.equal(folder.images, images) and torch.equal(folder.labels, labels)
    assert torch.equal(idx.images, full.images[:n])
    # Training sees the same tensors (in ImageFolder's order): the folder run equals a run on
    # the IDX files written in that order, weight for weight.
    order = torch.sort(full.labels[:n], stable=True).indices
    (tmp_path / "sorted").mkdir()
    write_idx(tmp_path / "sorted" / "train-images-idx3-ubyte", as_uint8(full.images[:n][order])[:, 0].numpy())
    write_idx(tmp_path / "sorted" / "train-labels-idx1-ubyte", full.labels[:n][order].numpy().astype(np.uint8))
    runs = {}
    for name, spec in (("folder", tmp_path / "png"), ("idx", tmp_path / "sorted")):
        cfg = GANTrainConfig(dataset=str(spec), run_dir=str(tmp_path / f"run-{name}"), iterations=2, batch_size=4,
                             n_critic=1, dim=4, checkpoint_every=2, sample_every=0, log_every=1)
        assert torch.equal(training_images(cfg), folder.images)
        train(cfg, progress=False)
        runs[name] = parts.load(tmp_path / f"run-{name}" / "checkpoint")["G"]
    assert all(torch.equal(runs["folder"][k], runs["idx"][k]) for k in runs["idx"])


def test_rgb_gray_alpha_and_what_is_skipped(tmp_path):
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g)
    gray = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=g)
    png(tmp_path / "rgb" / "a.png", rgb)
    png(tmp_path / "rgb" / "b.png", torch.cat([rgb, torch.full((1, 8, 8), 7, dtype=torch.uint8)]))  # RGBA
    png(tmp_path / "rgb" / "c.png", gray)                                                          # gray
    (tmp_path / "rgb" / "notes.txt").write_text("not an image")
    (tmp_path / "rgb" / "._a.png").write_bytes(b"AppleDouble junk")
    split = data.load(tmp_path / "rgb")
    assert split.images.shape == (3, 3, 8, 8)
    assert torch.equal(as_uint8(split.images[0]), rgb) and torch.equal(as_uint8(split.images[1]), rgb)
    assert torch.equal(as_uint8(split.images[2]), gray.expand(3, -1, -1))  # gray among colour: gray RGB
    png(tmp_path / "jpg" / "x.jpg", rgb)
    png(tmp_path / "jpg" / "y.bmp", rgb)
    lossy = data.load(tmp_path / "jpg")
    assert lossy.image_shape == (3, 8, 8) and len(lossy.labels) == 2


def test_image_size_resizes_the_shorter_side_then_crops_the_centre(tmp_path):
    wide = torch.randint(0, 256, (1, 10, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    png(tmp_path / "f" / "a-wide.png", wide)
    png(tmp_path / "f" / "b-small.png", wide[:, :6, :6])
    with pytest.raises(DataError, match=r"b-small\.png is 6x6 pixels but \S*a-wide\.png is 20x10.*--image-size"):
        data.load(tmp_path / "f")
    split = data.load(tmp_path / "f", image_size=10)
    assert split.image_shape == (1, 10, 10)
    assert torch.equal(as_uint8(split.images[0]), wide[:, :, 5:15])  # already 10 high: the centre 10 columns
    np.save(tmp_path / "a.npy", wide.numpy().transpose(1, 2, 0)[None])  # (1, H, W, 1) NHWC
    assert torch.equal(as_uint8(data.load(tmp_path / "a.npy", image_size=10).images[0]), wide[:, :, 5:15])


def test_splits_in_folders_and_npz(tmp_path):
    img = torch.zeros(1, 4, 4, dtype=torch.uint8)
    for cls in ("cat", "dog", "emu"):
        png(tmp_path / "d" / "train" / cls / "0.png", img)
    png(tmp_path / "d" / "test" / "emu" / "0.png", img)            # a test split lacking classes
    test = data.load(tmp_path / "d", "test")
    assert test.labels.tolist() == [2] and test.classes == ("cat", "dog", "emu") and not test.whole
    png(tmp_path / "d" / "test" / "yak" / "0.png", img)
    with pytest.raises(DataError, match="classes the training split lacks: yak"):
        data.load(tmp_path / "d", "test")
    x = np.zeros((5, 3, 4, 4), np.float32)                          # NCHW float
    np.savez(tmp_path / "k.npz", x_train=x, y_train=np.arange(5), x_test=x[:2] + 0.5, y_test=np.arange(2))
    tr, te = data.load(tmp_path / "k.npz", "train"), data.load(tmp_path / "k.npz", "test")
    assert tr.image_shape == (3, 4, 4) and len(te.labels) == 2 and float(te.images.max()) == 0.5
    assert not tr.whole


def one_line_error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_data_gives_one_line_errors_naming_the_file(tmp_path, capsys):
    img = torch.zeros(1, 8, 8, dtype=torch.uint8)
    png(tmp_path / "corrupt" / "a.png", img)
    png(tmp_path / "corrupt" / "b.png", img)
    (tmp_path / "corrupt" / "b.png").write_bytes((tmp_path / "corrupt" / "b.png").read_bytes()[:30])  # truncated
    (tmp_path / "empty").mkdir()
    png(tmp_path / "emptyclass" / "a" / "x.png", img)
    (tmp_path / "emptyclass" / "b").mkdir()
    png(tmp_path / "mixed" / "a.png", img)
    png(tmp_path / "mixed" / "b.png", torch.zeros(1, 12, 12, dtype=torch.uint8))
    png(tmp_path / "both" / "loose.png", img)
    png(tmp_path / "both" / "cls" / "x.png", img)
    np.save(tmp_path / "wide.npy", np.full((2, 8, 8), 2.0))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    run = ["train-gan", "--iterations", "1", "--no-progress", "--run-dir", str(tmp_path / "run"), "--data"]
    png(tmp_path / "odd" / "a.png", torch.zeros(1, 10, 10, dtype=torch.uint8))
    cases = {
        "corrupt": r"cannot read image \S*corrupt/b\.png",
        "empty": r"empty holds no images",
        "emptyclass": r"emptyclass: the class folder\(s\) b hold no images",
        "both": r"both holds both images \(loose\.png, \.\.\.\) and subfolders",
        "mixed": r"mixed/b\.png is 12x12 pixels but \S*mixed/a\.png is 8x8: the images differ in size; pass --image-size S",
        "odd": r"images are 10x10 pixels; the generator needs .* divisible by 4 .*--image-size",
        "wide.npy": r"wide\.npy: float images must lie in \[0, 1\]",
        "broken.npz": r"cannot read \S*broken\.npz",
        "missing": r"missing does not exist",
    }
    for name, pattern in cases.items():
        line = one_line_error(run + [str(tmp_path / name)], capsys)
        assert line.startswith("purifier train-gan: error: ") and re.search(pattern, line), (name, line)


def test_unlabelled_data_where_labels_are_needed(tmp_path, capsys):
    export_folder(tmp_path / "flat", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), None)
    line = one_line_error(["train-classifier", "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "m"),
                           "--epochs", "1", "--no-progress"], capsys)
    assert "has no labels" in line and "class subfolders" in line
    line = one_line_error(["train-gan", "--dataset", "mnist", "--data", str(tmp_path / "flat")], capsys)
    assert "not both" in line


def test_check_shape_names_channels_and_the_fix():
    split = data.Split(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64), "/photos")
    data.check_shape(split, (3, 32, 32))
    with pytest.raises(DataError, match=r"/photos: images are 3x32x32, the generator expects 1x28x28 .*RGB images "
                                        r"for a grayscale model"):
        data.check_shape(split, (1, 28, 28))
    with pytest.raises(DataError, match="pass --image-size 64"):
        data.check_shape(split, (3, 64, 64))


def test_classifier_and_calibration_from_folders(tmp_path, tiny_model_dir, capsys):
    g = torch.Generator().manual_seed(0)
    for i in range(20):  # two classes, 8x8 gray: the tiny model's shape
        png(tmp_path / "labelled" / ("ant" if i % 2 else "bee") / f"{i}.png",
            torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=g))
    out = tmp_path / "m"
    assert cli.main(["train-classifier", "--data", str(tmp_path / "labelled"), "--arch", "D", "--epochs", "1",
                     "--out", str(out), "--no-progress"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["dataset"] == str(tmp_path / "labelled") and card["classifier"]["classes"] == ["ant", "bee"]
    assert card["classifier"]["architecture"]["num_classes"] == 2
    assert card["classifier"]["metrics"]["test_images"] == 2 and "held out" in card["classifier"]["metrics"]["test_from"]
    assert f"--data {tmp_path / 'labelled'}" in card["classifier"]["training"]["command"]
    # calibrate needs no labels: a flat folder, resized to the model's 8x8 by --image-size
    for i in range(12):
        png(tmp_path / "flat" / f"{i}.png", torch.randint(0, 256, (1, 12, 16), dtype=torch.uint8, generator=g))
    argv = ["calibrate", str(tiny_model_dir), "--data", str(tmp_path / "flat"), "--n", "6", "--heldout-n", "6",
            "--steps", "2", "--restarts", "1", "--no-progress"]
    assert cli.main(argv + ["--image-size", "8"]) == 0
    card = json.loads((tiny_model_dir / "card.json").read_text())
    assert card["detection"]["data"]["image_size"] == 8 and card["detection"]["n"] == 6
    capsys.readouterr()
    line = one_line_error(argv, capsys)                      # 12x16 images for an 8x8 model
    assert "images are 1x12x16, the generator in" in line and "resize" in line


def test_an_idx_folder_without_the_test_files_says_so(idx_slice):
    d, _, _ = idx_slice
    with pytest.raises(DataError, match=r"holds IDX files but not the test images \(t10k-images-idx3-ubyte"):
        data.load(d, "test")


def test_eval_takes_data_and_refuses_unlabelled_or_misshapen(tmp_path, tiny_model_dir, capsys):
    g = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x=g.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8), y=np.arange(6) % 10)
    argv = ["eval", str(tiny_model_dir), "--out", str(tmp_path / "e"), "--n", "4", "--attacks", "fgsm", "--eps",
            "0.1", "--steps", "2", "--restarts", "1", "--device", "cpu", "--no-progress", "--data"]
    assert cli.main(argv + [str(tmp_path / "test.npz")]) == 0
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["settings"]["dataset"] == str(tmp_path / "test.npz") and saved["cells"][0]["attack"] == "fgsm"
    capsys.readouterr()
    np.save(tmp_path / "unlabelled.npy", g.integers(0, 256, (6, 8, 8), dtype=np.uint8))
    assert "has no labels" in one_line_error(argv + [str(tmp_path / "unlabelled.npy")], capsys)
    np.savez(tmp_path / "rgb.npz", x=g.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), y=np.arange(6))
    line = one_line_error(argv + [str(tmp_path / "rgb.npz")], capsys)
    assert "images are 3x8x8, the generator in" in line and "expects 1x8x8" in line


def test_the_held_out_slice_of_a_class_folder_spans_the_classes(tmp_path):
    for i in range(40):
        png(tmp_path / "f" / f"c{i % 4}" / f"{i:02d}.png", torch.full((1, 4, 4), i, dtype=torch.uint8))
    split = data.load(tmp_path / "f")
    assert split.labels[-10:].tolist() == [3] * 10              # ImageFolder order: by class
    held = data.last(split, 10)
    assert len(set(held.labels.tolist())) > 1 and torch.equal(held.images, data.last(split, 10).images)
    flat = data.Split(split.images, torch.full((40,), -1), "x")
    assert torch.equal(data.last(flat, 10).images, split.images[-10:])   # file order: the last ones


def test_all_but_last_is_the_complement_of_the_held_out_slice(tmp_path):
    for i in range(40):
        png(tmp_path / "f" / f"c{i % 4}" / f"{i:02d}.png", torch.full((1, 4, 4), i, dtype=torch.uint8))
    for split in (data.load(tmp_path / "f"),                                  # class folder: a shuffle
                  data.Split(torch.arange(40.).view(40, 1, 1, 1), torch.full((40,), -1), "x")):  # file order
        rest, held = data.all_but_last(split, 10), data.last(split, 10)
        values = lambda s: sorted(s.images.flatten(1)[:, 0].tolist())
        assert len(rest.labels) == 30 and not set(values(rest)) & set(values(held))
        assert sorted(values(rest) + values(held)) == values(split)
    assert data.all_but_last(split, 0) is split
    with pytest.raises(DataError, match="leaves none to train on"):
        data.all_but_last(split, 40)
