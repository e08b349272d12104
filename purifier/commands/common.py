"""Arguments several subcommands share."""

from __future__ import annotations

import argparse

import torch


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, all cores)")


def resolve_device(args) -> str:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_data(p: argparse.ArgumentParser, default: str = "fashion-mnist") -> None:
    p.add_argument("--dataset", default=default, choices=["mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default=None,
                   help="folder with the IDX files (default: PURIFIER_DATA_DIR, /usr/share/datasets/<name>, "
                        "../shared/datasets/<name>, ./data/<name>)")
