"""Datasets as tensors, from where users keep them.

``load(spec, split)`` returns a :class:`Split`: float images in [0, 1], (N, C, H, W), C 1 or 3,
and int64 labels (-1 where the source has none). ``spec`` is one of:

- ``mnist`` / ``fashion-mnist``: the IDX files, searched for in the ``data_dir`` given (or
  ``PURIFIER_DATA_DIR``), then ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist``),
  ``../shared/datasets/<name>``, and ``./data/<name>``. With ``download=True`` torchvision
  fetches the files into ``./data`` (needs internet; nothing here downloads unless asked).
- a folder of images (``torchvision.datasets.folder.IMG_EXTENSIONS``: PNG, JPEG, BMP, PPM/PGM,
  TIFF, WEBP; and GIF), decoded by PIL. With class subfolders it is read as torchvision's ``ImageFolder`` reads it (classes
  are the sorted subfolder names, label = index; images found recursively); with the images
  directly inside it is unlabelled (for GAN training, calibration). Files whose names start
  with ``.`` and files of other types are skipped. A folder with ``train/`` and ``test/``
  subfolders holds the two splits (each in either layout; the test split uses the training
  split's classes). A folder with IDX files (``train-images-idx3-ubyte[.gz]`` ...) is read as IDX.
- a ``.npy`` file (images only) or a ``.npz`` file: images under ``x`` or ``images``, labels
  (optional) under ``y`` or ``labels``; or per split ``x_train``/``y_train``,
  ``x_test``/``y_test`` (Keras's names). Images are uint8 (0-255) or float in [0, 1], laid out
  (N, H, W) grayscale, (N, H, W, C) or (N, C, H, W) with C 1 or 3 (NHWC when the last axis
  is 1 or 3).
- an IDX images file; its labels are the file of the same name with ``images``/``idx3``
  replaced by ``labels``/``idx1``, when it exists.

A source with no split of its own (a folder without ``train/``/``test/``, a ``.npy``, an
``.npz`` without ``*_train`` keys, one IDX file) gives the same images for every split, and
says so (``Split.whole``); what needs a separate test split holds part of it out itself.

Images: grayscale (PNG/PGM "L", or a 1-channel array) gives C=1, colour C=3; an alpha channel
is dropped; a folder mixing grayscale and colour files gives C=3 with the gray ones repeated.
Size: without ``image_size`` every image must have the first image's size (else a
:class:`DataError` naming the file that differs); with ``image_size=S`` each image's shorter
side is resized to S (bilinear, antialiased) and the centre S x S is cropped.
Every problem is a :class:`DataError` naming the file: unreadable or corrupt images, mixed
sizes, empty folders, bad array layouts.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

DATASETS = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip- or xz-compressed) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:6] == b"\xfd7zXZ\x00":  # xz: ~15% smaller than gzip, for moving data sets around
            raw = lzma.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, lzma.LZMAError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: IDX body has {len(body)} bytes, header shape {shape} needs {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = []
    if data_dir:
        dirs += [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("PURIFIER_DATA_DIR")
    if env:
        dirs += [Path(env), Path(env) / name]
    here = Path(__file__).resolve().parent.parent
    dirs += [Path("/usr/share/datasets") / name, here.parent / "shared" / "datasets" / name,
             Path("data") / name, here / "data" / name]
    return dirs


def _find(name: str, stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in [base / (stem + ext) for base in (d, d / "raw") for ext in ("", ".gz", ".xz")]:
            if candidate.is_file():
                return candidate
    return None


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64; -1 where the source has no labels
    source: str
    classes: tuple[str, ...] | None = None  # class names (folder layout), label i = classes[i]
    whole: bool = False   # the source has no splits: every split is these same images

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def load(spec: str | os.PathLike, split: str = "train", data_dir: str | os.PathLike | None = None,
         download: bool = False, image_size: int | None = None) -> Split:
    """Load a split of ``spec`` (a data set name or a path, see the module docstring) as float
    images in [0, 1] and int64 labels; ``image_size`` S: shorter side to S, centre crop S x S."""
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    if image_size is not None and image_size < 1:
        raise DataError(f"--image-size must be >= 1, got {image_size}")
    if str(spec) in DATASETS:
        return _load_named(str(spec), split, data_dir, download, image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        if os.sep not in str(spec) and not path.suffix:
            raise DataError(f"unknown dataset {str(spec)!r}; choose one of {sorted(DATASETS)}, or give a path: "
                            f"a folder of images, a .npy/.npz file or an IDX images file")
        raise DataError(f"{path} does not exist; give mnist, fashion-mnist, a folder of images, "
                        f"a .npy/.npz file or an IDX images file")
    if path.is_dir():
        if any(_find(str(path), stem, [path]) is not None for stems in _FILES.values() for stem in stems):
            return _load_idx_pair(path, split, image_size)
        return _load_folder(path, split, image_size)
    if path.suffix.lower() in (".npy", ".npz"):
        return _load_arrays(path, split, image_size)
    return _load_idx_file(path, image_size)


def name_of(spec: str | os.PathLike) -> str:
    """A short name for ``spec``, for default folders (runs/gan-<name>, models/<name>)."""
    if str(spec) in DATASETS:
        return str(spec)
    path = Path(spec).expanduser()
    return (path.name if path.is_dir() else path.stem) or "data"


def flags(spec: str | os.PathLike, image_size: int | None = None) -> str:
    """The command-line flags that name this data again (for the commands cards record)."""
    import shlex

    out = f"--dataset {spec}" if str(spec) in DATASETS else f"--data {shlex.quote(str(spec))}"
    return out + (f" --image-size {image_size}" if image_size else "")


def card_fields(image_size: int | None) -> dict:
    """What a model card records beside ``dataset`` so later commands load the same images."""
    return {"image_size": image_size} if image_size else {}


def check_shape(split: Split, shape, what: str = "the generator") -> None:
    """A :class:`DataError` when ``split``'s images are not (C, H, W) ``shape`` (what a model
    was built for), with what to do about it."""
    have, want = split.image_shape, tuple(int(s) for s in shape)
    if have == want:
        return
    names = {1: "grayscale", 3: "RGB"}
    if have[0] != want[0]:
        hint = (f"{names.get(have[0], have[0])} images for a {names.get(want[0], want[0])} model: "
                f"convert the images, or train models for them")
    elif want[1] == want[2]:
        hint = f"pass --image-size {want[1]} to resize them"
    else:
        hint = "resize the images to the model's size"
    raise DataError(f"{split.source}: images are {'x'.join(map(str, have))}, {what} expects "
                    f"{'x'.join(map(str, want))} (C x H x W); {hint}")


def require_labels(split: Split, what: str) -> None:
    if not split.labelled:
        raise DataError(f"{split.source} has no labels (a flat folder of images, or arrays without y/labels); "
                        f"{what} needs labelled data: class subfolders, or labels beside the images")


def _load_named(name: str, split: str, data_dir, download: bool, image_size: int | None) -> Split:
    dirs = candidate_dirs(name, data_dir)
    img_stem, lbl_stem = _FILES[split]
    img_path, lbl_path = _find(name, img_stem, dirs), _find(name, lbl_stem, dirs)
    if (img_path is None or lbl_path is None) and download:
        import torchvision  # only imported when a user asks for the download

        getattr(torchvision.datasets, DATASETS[name])(root=f"data/{name}-tv", train=split == "train",
                                                       download=True)
        dirs.append(Path(f"data/{name}-tv") / DATASETS[name])
        img_path, lbl_path = _find(name, img_stem, dirs), _find(name, lbl_stem, dirs)
    if img_path is None or lbl_path is None:
        searched = ", ".join(str(d) for d in dirs)
        hint = ("`apt-get install dataset-fashion-mnist`, " if name == "fashion-mnist" else "")
        raise DataError(
            f"{name} {split} files ({img_stem}[.gz], {lbl_stem}[.gz]) not found in: {searched}. "
            f"Get them with {hint}--data-dir pointing at a folder holding the IDX files, "
            f"or --download (needs internet).")
    return _idx_split(img_path, lbl_path, image_size)


def _idx_split(img_path: Path, lbl_path: Path | None, image_size: int | None, whole: bool = False) -> Split:
    images = read_idx(img_path)
    labels = read_idx(lbl_path) if lbl_path is not None else None
    if images.ndim != 3 or (labels is not None and (labels.ndim != 1 or len(images) != len(labels))):
        raise DataError(f"{img_path} / {lbl_path}: expected (N,H,W) images and (N,) labels, "
                        f"got {images.shape} and {None if labels is None else labels.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)    # (N, 1, H, W) uint8
    y = (torch.from_numpy(labels.astype(np.int64)) if labels is not None
         else torch.full((len(images),), -1, dtype=torch.int64))
    return Split(_to_float(_fit(x, image_size)), y, str(img_path.parent), whole=whole)


def _load_idx_pair(folder: Path, split: str, image_size: int | None) -> Split:
    img_stem, lbl_stem = _FILES[split]
    img_path = _find(str(folder), img_stem, [folder])
    lbl_path = _find(str(folder), lbl_stem, [folder])
    if img_path is None:
        raise DataError(f"{folder} holds IDX files but not the {split} images ({img_stem}[.gz/.xz])")
    return _idx_split(img_path, lbl_path, image_size)


def _load_idx_file(path: Path, image_size: int | None) -> Split:
    name = path.name.replace("images", "labels").replace("idx3", "idx1")
    labels = path.with_name(name) if name != path.name else None
    return _idx_split(path, labels if labels is not None and labels.is_file() else None, image_size, whole=True)


# --- images: resize rule, folders, arrays ------------------------------------------------------

def _fit(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """The one resize rule: shorter side to ``size`` (bilinear, antialiased), then the centre
    ``size`` x ``size``. ``x`` (..., C, H, W), uint8 or float; unchanged without ``size``."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(x, size, antialias=True), [size, size])


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS) + (".gif",)


def _is_image(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(_image_extensions())


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file as uint8 (C, H, W), C 1 (grayscale) or 3 (colour; alpha dropped).

    PIL decodes, as torchvision's ``ImageFolder`` loader does (torchvision's own decoders are
    deprecated from 0.29), but keeps grayscale as one channel where that loader converts
    everything to RGB. An animated GIF gives its first frame."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise DataError(f"{path}: {im.mode} images (more than 8 bits per channel) are not supported; "
                                f"save it with 8 bits per channel")
            img = pil_to_tensor(im.convert("L" if im.mode in ("1", "L", "LA") else "RGB"))  # (C, H, W)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise DataError(f"cannot read image {path}: {str(exc).strip() or type(exc).__name__}") from exc
    if img.shape[1] < 1 or img.shape[2] < 1:
        raise DataError(f"{path}: cannot use an image of shape {tuple(img.shape)}")
    return img


def _images_from_files(files: list[str], image_size: int | None) -> torch.Tensor:
    """Decode, check sizes (or fit them), stack: uint8 (N, C, H, W)."""
    out, first = [], None
    for f in files:
        img = read_image(f)
        if image_size is not None:
            img = _fit(img, image_size)
        elif first is None:
            first = (f, tuple(img.shape[1:]))
        elif tuple(img.shape[1:]) != first[1]:
            (h, w), (h0, w0) = img.shape[1:], first[1]
            raise DataError(f"{f} is {w}x{h} pixels but {first[0]} is {w0}x{h0}: the images differ in size; "
                            f"pass --image-size S to resize every image (shorter side to S, centre crop S x S)")
        out.append(img)
    if any(i.shape[0] == 3 for i in out):  # some colour: the gray ones become gray RGB
        out = [i.expand(3, -1, -1) if i.shape[0] == 1 else i for i in out]
    return torch.stack(out)


def _folder_samples(root: Path, class_to_idx: dict[str, int] | None,
                    test: bool) -> tuple[list[str], list[int], tuple[str, ...] | None]:
    """ImageFolder's listing (torchvision's ``find_classes``/``make_dataset``) or a flat one."""
    from torchvision.datasets.folder import find_classes, make_dataset

    entries = [e for e in sorted(os.scandir(root), key=lambda e: e.name) if not e.name.startswith(".")]
    files = [e.path for e in entries if e.is_file() and _is_image(e.path)]
    subdirs = [e.path for e in entries if e.is_dir()]
    nested = [d for d in subdirs if any(_is_image(os.path.join(w, f)) for w, _, fs in os.walk(d) for f in fs)]
    if files and nested:
        raise DataError(f"{root} holds both images ({Path(files[0]).name}, ...) and subfolders with images "
                        f"({Path(nested[0]).name}/, ...): put every image in a class subfolder (labelled) "
                        f"or none in subfolders (unlabelled)")
    if files:
        return files, [-1] * len(files), None
    if not nested:
        raise DataError(f"{root} holds no images (looked for {', '.join(_image_extensions())}, "
                        f"directly or in class subfolders)")
    if class_to_idx is None:
        classes, class_to_idx = find_classes(str(root))
    else:
        classes = tuple(sorted(class_to_idx, key=class_to_idx.get))
        unknown = sorted({Path(d).name for d in nested} - set(class_to_idx))
        if unknown:
            raise DataError(f"{root} has classes the training split lacks: {', '.join(unknown)}")
    empty = [c for c in classes if not test and not any(
        _is_image(os.path.join(w, f)) for w, _, fs in os.walk(root / c) for f in fs)]
    if empty:
        raise DataError(f"{root}: the class folder(s) {', '.join(empty)} hold no images; add images or remove them")
    try:
        samples = make_dataset(str(root), class_to_idx, is_valid_file=_is_image, allow_empty=test)
    except FileNotFoundError as exc:  # a class folder without images
        raise DataError(f"{root}: {exc}") from exc
    return [p for p, _ in samples], [c for _, c in samples], tuple(classes)


def _load_folder(path: Path, split: str, image_size: int | None) -> Split:
    if (path / "train").is_dir() or (path / "test").is_dir():
        root = path / split
        if not root.is_dir():
            raise DataError(f"{path} has {'train' if split == 'test' else 'test'}/ but no {split}/ subfolder")
        class_to_idx = None
        if split == "test" and (path / "train").is_dir():
            _, _, train_classes = _folder_samples(path / "train", None, False)
            class_to_idx = {c: i for i, c in enumerate(train_classes)} if train_classes else None
        whole = False
    else:
        root, class_to_idx, whole = path, None, True
    files, labels, classes = _folder_samples(root, class_to_idx, split == "test" and class_to_idx is not None)
    x = _to_float(_images_from_files(files, image_size))                 # (N, C, H, W)
    return Split(x, torch.tensor(labels, dtype=torch.int64), str(root), classes, whole)


def _array_images(x: np.ndarray, where: str) -> torch.Tensor:
    """An array of images, as the module docstring lays out, to (N, C, H, W) uint8 or float."""
    if x.ndim == 3:
        x = x[:, None]                                       # (N, 1, H, W)
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)                          # NHWC -> NCHW
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DataError(f"{where}: images of shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                        f"with C 1 or 3")
    if len(x) == 0:
        raise DataError(f"{where} holds no images")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
            raise DataError(f"{where}: float images must lie in [0, 1], these span [{lo}, {hi}]")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise DataError(f"{where}: images of dtype {x.dtype}; use uint8 (0-255) or float in [0, 1]")


def _load_arrays(path: Path, split: str, image_size: int | None) -> Split:
    import zipfile

    try:
        arrays = np.load(path, allow_pickle=False)
        if isinstance(arrays, np.ndarray):
            x, y, whole, where = arrays, None, True, str(path)
        else:
            keys = set(arrays.files)
            xk = next((k for k in (f"x_{split}", f"images_{split}") if k in keys), None)
            if xk is not None:
                yk, whole = next((k for k in (f"y_{split}", f"labels_{split}") if k in keys), None), False
            elif any(k.startswith(("x_", "images_")) for k in keys):
                raise DataError(f"{path} has no x_{split} (its arrays: {', '.join(sorted(keys))})")
            else:
                xk = next((k for k in ("x", "images") if k in keys), None)
                if xk is None:
                    raise DataError(f"{path} has no images under x or images (its arrays: {', '.join(sorted(keys))})")
                yk, whole = next((k for k in ("y", "labels") if k in keys), None), True
            x, y, where = arrays[xk], (arrays[yk] if yk else None), f"{path}[{xk}]"
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    images = _array_images(x, where)                         # (N, C, H, W)
    if y is None:
        labels = torch.full((len(images),), -1, dtype=torch.int64)
    else:
        if y.ndim != 1 or len(y) != len(images) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise DataError(f"{path}: labels must be N={len(images)} non-negative integers, got {y.dtype} {y.shape}")
        labels = torch.from_numpy(y.astype(np.int64))
    return Split(_to_float(_fit(images, image_size)), labels, str(path), whole=whole)


def _end_split(split: Split, n: int) -> tuple[Split, Split]:
    """(all but the last ``n``, the last ``n``) of the split. A class-folder listing is sorted
    by class, so its last ``n`` would be the last classes only; there the order is a fixed
    shuffle that spans the classes."""
    def pick(idx):
        return Split(split.images[idx], split.labels[idx], split.source, split.classes, split.whole)
    if split.classes is None:
        return pick(slice(None, -n)), pick(slice(-n, None))
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))
    return pick(order[:-n]), pick(order[-n:])


def last(split: Split, n: int) -> Split:
    """The last ``n`` examples: the held-out slice of the training split that ``calibrate``
    and export selection use (of a fixed shuffle for a class folder: :func:`_end_split`)."""
    return _end_split(split, n)[1]


def all_but_last(split: Split, n: int) -> Split:
    """Everything :func:`last` leaves out: train on this and ``last(split, n)`` stays unseen
    (the encoder's ``--holdout``, so that ``calibrate`` measures errors on images it never saw).
    ``n`` 0 is the whole split."""
    if n <= 0:
        return split
    if n >= len(split.labels):
        raise DataError(f"holding out the last {n} of the {len(split.labels)} images of {split.source} "
                        "leaves none to train on")
    return _end_split(split, n)[0]


def subset(split: Split, n: int | None, seed: int = 0) -> Split:
    """A seeded random choice of ``n`` examples (all when n is None or too large)."""
    if n is None or n >= len(split.labels):
        return split
    idx = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:n]
    return Split(split.images[idx], split.labels[idx], split.source, split.classes, split.whole)
