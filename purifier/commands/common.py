"""Arguments several subcommands share."""

from __future__ import annotations

import argparse


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, all cores)")


def resolve_device(args) -> str:
    from ..hardware import choose_device

    return choose_device(args.device, getattr(args, "threads", None))


def add_data(p: argparse.ArgumentParser, default: str | None = "fashion-mnist", paths: bool = False) -> None:
    """--dataset and --data-dir; with ``paths`` also --data PATH and --image-size (read them
    back with :func:`data_spec`)."""
    p.add_argument("--dataset", default=None if paths else default, choices=["mnist", "fashion-mnist"],
                   help=f"a shipped data set by name{f' (default {default})' if default else ''}"
                        f"{'; --data takes any other' if paths else ''}")
    p.add_argument("--data-dir", default=None,
                   help="folder with the IDX files (default: PURIFIER_DATA_DIR, /usr/share/datasets/<name>, "
                        "../shared/datasets/<name>, ./data/<name>)")
    if paths:
        p.set_defaults(dataset_default=default)
        p.add_argument("--data", default=None, metavar="PATH",
                       help="your data instead of --dataset: a folder of images (class subfolders, or flat "
                            "for unlabelled; train/ and test/ inside for splits), a .npy/.npz file, or an "
                            "IDX images file (docs/your-data.md)")
        p.add_argument("--image-size", type=int, default=None, metavar="S",
                       help="resize every image: shorter side to S, then the centre S x S (default: keep "
                            "the size, which all images must share; or the model card's)")


def data_spec(args, card: dict | None = None) -> tuple[str | None, int | None]:
    """(spec, image size) from --data / --dataset / --image-size, else the model card's
    ``dataset`` and ``image_size``, else add_data's default."""
    from ..errors import ConfigError

    if args.data and args.dataset:
        raise ConfigError(f"give --dataset {args.dataset} or --data {args.data}, not both")
    card = card or {}
    spec = args.data or args.dataset or card.get("dataset") or getattr(args, "dataset_default", None)
    return spec, args.image_size or card.get("image_size")
