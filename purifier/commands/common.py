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


def add_data(p: argparse.ArgumentParser, default: str = "fashion-mnist") -> None:
    p.add_argument("--dataset", default=default, choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default=None,
                   help="folder with the IDX files (default: PURIFIER_DATA_DIR, /usr/share/datasets/<name>, "
                        "../shared/datasets/<name>, ./data/<name>)")
