"""Training checkpoints written as parts of bounded size, reassembled and verified on load.

A lent GPU returns at most a few files of 16 MiB each, while a WGAN-GP checkpoint (G, its
EMA, the critic and both Adam states) is ~37 MB. So a checkpoint is a folder::

    <dir>/manifest.json    {"format": 1, "bytes": N, "sha256": ..., "parts": [{"name", "bytes", "sha256"}]}
    <dir>/part-000.bin     the first `part_bytes` of one ``torch.save`` stream, and so on

Writing goes to ``<dir>.tmp`` and is swapped in with renames, so a crash never leaves a
half-written checkpoint where ``--resume`` looks. Loading checks every part's size and hash
and loads with ``weights_only=True`` (tensors and plain values only, no code).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"
DEFAULT_PART_BYTES = 15 * 2**20  # under the 16 MiB a lent machine returns per file


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, corrupt or not a checkpoint."""


def save(obj, directory: str | os.PathLike, part_bytes: int = DEFAULT_PART_BYTES) -> list[Path]:
    """``torch.save`` ``obj`` into ``directory`` as parts of at most ``part_bytes``; returns the parts."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(obj, buf)
    blob = buf.getbuffer()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts = []
    for i, start in enumerate(range(0, max(len(blob), 1), part_bytes)):
        chunk = bytes(blob[start:start + part_bytes])
        name = f"part-{i:03d}.bin"
        (tmp / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"format": 1, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "parts": parts}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return [directory / p["name"] for p in parts]


def exists(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def load(directory: str | os.PathLike, map_location=None):
    """Reassemble, verify and load a checkpoint written by :func:`save`."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory} has no readable {MANIFEST}: {exc}") from exc
    chunks = []
    for p in manifest.get("parts", []):
        path = directory / p["name"]
        try:
            chunk = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"checkpoint part {path} is missing: {exc}") from exc
        if len(chunk) != p["bytes"] or hashlib.sha256(chunk).hexdigest() != p["sha256"]:
            raise CheckpointError(f"checkpoint part {path} is damaged (size or sha256 differ from the manifest)")
        chunks.append(chunk)
    blob = b"".join(chunks)
    if len(blob) != manifest.get("bytes") or hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(f"{directory}: reassembled checkpoint does not match its manifest")
    return torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
