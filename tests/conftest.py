"""Shared fixtures: tiny models with fixed weights, so results are exact and fast on CPU."""

from __future__ import annotations

import pytest
import torch

from purifier import checkpoint
from purifier.models import Classifier, Encoder, Generator

# Tiny tensors: one thread is fastest, and much faster on a busy machine.
torch.set_num_threads(1)

TINY_LATENT = 8
TINY_SHAPE = (1, 8, 8)


def tiny_generator(seed: int = 0, latent_dim: int = TINY_LATENT, shape=TINY_SHAPE, dim: int = 4) -> Generator:
    torch.manual_seed(seed)
    g = Generator(latent_dim, *shape, dim=dim).eval()
    for p in g.parameters():
        p.requires_grad_(False)
    return g


def tiny_classifier(seed: int = 0, shape=TINY_SHAPE) -> Classifier:
    torch.manual_seed(seed)
    return Classifier("D", *shape).eval()


@pytest.fixture
def tiny_gen() -> Generator:
    return tiny_generator()


@pytest.fixture
def sharp_gen(tiny_gen) -> Generator:
    """tiny_gen with its weights scaled x4 so that G(z) depends visibly on z (pixel std ~0.05
    across z); the unscaled tiny generator is nearly constant in z."""
    with torch.no_grad():
        for p in tiny_gen.parameters():
            p.mul_(4.0)
    return tiny_gen


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A model directory like models/<dataset>/ with a tiny generator, classifier, encoder."""
    d = tmp_path / "tiny-model"
    checkpoint.save_module(tiny_generator(), d / "generator.safetensors", "generator")
    checkpoint.save_module(tiny_classifier(), d / "classifier.safetensors", "classifier")
    torch.manual_seed(1)
    checkpoint.save_module(Encoder(TINY_LATENT, *TINY_SHAPE, dim=4), d / "encoder.safetensors", "encoder")
    checkpoint.write_card(d, {"dataset": "tiny", "files": {"generator": "generator.safetensors"},
                              "detection": {"threshold": 0.05, "target_fpr": 0.05}})
    return d


@pytest.fixture(scope="session")
def load_script():
    """``load_script("name")``: scripts/name.py imported as a module (scripts/ is no package)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
