"""Self-describing model files: safetensors weights with their architecture config in the
file's metadata, and a JSON model card per model directory.

A model directory (``models/fashion-mnist/``) holds::

    card.json                 dataset, training commands and settings, metrics, threshold
    generator.safetensors     weights + {"kind": "generator", "config": {...}}
    classifier.safetensors    weights + {"kind": "classifier", "config": {...}}
    encoder.safetensors       optional: starts the projection near the answer

safetensors cannot run code when loaded, unlike pickle. Users may also bring a generator
exported with ``torch.export`` (``*.pt2``) beside a JSON card giving ``latent_dim`` and
``image_shape``; see :func:`load_generator`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import models
from .errors import ModelLoadError

CARD = "card.json"


def save_module(module: nn.Module, path: str | os.PathLike, kind: str) -> None:
    from safetensors.torch import save_file

    meta = {"kind": kind, "config": json.dumps(module.config)}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_module(path: str | os.PathLike, kind: str | None = None,
                device: torch.device | str = "cpu") -> nn.Module:
    """Load a module saved by :func:`save_module`; it comes back in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "config" not in meta or "kind" not in meta:
        raise ModelLoadError(f"{path} has no purifier config in its metadata")
    if kind is not None and meta["kind"] != kind:
        raise ModelLoadError(f"{path} holds a {meta['kind']}, expected a {kind}")
    try:
        module = models.build(meta["kind"], json.loads(meta["config"]))
        module.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: weights do not match their config: {exc}") from exc
    return module.to(device).eval()


class ExportedGenerator(nn.Module):
    """A user's ``torch.export`` generator wrapped to look like ours."""

    def __init__(self, program_module: nn.Module, latent_dim: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.inner = program_module
        self.latent_dim = latent_dim
        self.image_shape = models.ImageShape(*image_shape)
        self.config = dict(arch="torch.export", latent_dim=latent_dim, channels=image_shape[0],
                           height=image_shape[1], width=image_shape[2])

    def train(self, mode: bool = True) -> "ExportedGenerator":
        # An exported program is fixed in the mode it was exported in and refuses
        # train()/eval(); there is nothing to switch.
        self.training = mode
        return self

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z)


def load_generator(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Load a generator: our safetensors, or a ``.pt2`` from ``torch.export`` with a card
    ``<same name>.json`` holding ``{"latent_dim": 128, "image_shape": [C, H, W]}``."""
    path = Path(path)
    if path.suffix != ".pt2":
        gen = load_module(path, "generator", device)
    else:
        card_path = path.with_suffix(".json")
        try:
            card = json.loads(card_path.read_text())
            latent_dim = int(card["latent_dim"])
            shape = tuple(int(s) for s in card["image_shape"])
            assert len(shape) == 3
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise ModelLoadError(
                f"{card_path}: need a JSON card with latent_dim and image_shape [C,H,W] "
                f"beside the exported generator ({exc})") from exc
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch raises many types for a bad archive
            raise ModelLoadError(f"{path} is not a torch.export archive: {exc}") from exc
        gen = ExportedGenerator(program.module(), latent_dim, shape).to(device)
        probe = gen(torch.zeros(2, latent_dim, device=device))
        if tuple(probe.shape[1:]) != shape:
            raise ModelLoadError(f"{path} produces images of shape {tuple(probe.shape[1:])}, "
                                 f"its card says {list(shape)}")
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen.eval()


@dataclass
class ModelBundle:
    """Everything in one model directory, loaded onto one device."""

    path: Path
    card: dict
    generator: nn.Module
    classifier: nn.Module | None = None
    encoder: nn.Module | None = None
    extras: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.generator.image_shape.as_tuple()

    @property
    def latent_dim(self) -> int:
        return self.generator.latent_dim

    @property
    def threshold(self) -> float | None:
        det = self.card.get("detection") or {}
        return det.get("threshold")


def read_card(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / CARD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def write_card(model_dir: str | os.PathLike, card: dict) -> None:
    path = Path(model_dir) / CARD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def update_card(model_dir: str | os.PathLike, **sections) -> dict:
    """Merge top-level sections into the card (read, update, atomic write)."""
    card = read_card(model_dir)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(card.get(key), dict):
            card[key].update(value)
        else:
            card[key] = value
    write_card(model_dir, card)
    return card


def generator_file(model_dir: str | os.PathLike, card: dict) -> Path:
    """The generator of a model directory: the card's ``files.generator``, else
    generator.safetensors or generator.pt2, whichever exists."""
    model_dir = Path(model_dir)
    name = card.get("files", {}).get("generator")
    if name is None:
        name = next((n for n in ("generator.safetensors", "generator.pt2")
                     if (model_dir / n).exists()), "generator.safetensors")
    return model_dir / name


def load_bundle(model_dir: str | os.PathLike, device: torch.device | str = "cpu",
                need_classifier: bool = False) -> ModelBundle:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    card = read_card(model_dir)
    generator = load_generator(generator_file(model_dir, card), device)
    classifier = encoder = None
    if (model_dir / "classifier.safetensors").exists():
        classifier = load_module(model_dir / "classifier.safetensors", "classifier", device)
        for p in classifier.parameters():
            p.requires_grad_(False)
    elif need_classifier:
        raise ModelLoadError(f"{model_dir} has no classifier.safetensors")
    if (model_dir / "encoder.safetensors").exists():
        encoder = load_module(model_dir / "encoder.safetensors", "encoder", device)
        for p in encoder.parameters():
            p.requires_grad_(False)
    return ModelBundle(model_dir, card, generator, classifier, encoder)
