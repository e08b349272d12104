"""Train one of the paper's classifiers (A/B/C/D) on clean images and export it to a
model directory, recording the command, settings and test accuracy in the card."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, data, hardware
from ..errors import DataError
from ..models import Classifier


@dataclass
class ClassifierTrainConfig:
    dataset: str = "fashion-mnist"  # a name or a path: anything purifier.data.load takes
    data_dir: str | None = None
    image_size: int | None = None   # resize rule of purifier.data (shorter side, centre crop)
    arch: str = "A"
    out_dir: str = "models/fashion-mnist"
    name: str = "classifier"      # file stem: classifier.safetensors, substitute.safetensors
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    shift: int = 0                # random translation augmentation, in pixels (0: off)
    seed: int = 0
    device: str = "cpu"


def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in x and y, filling with zeros."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pixels,) * 4)                 # (B, C, H+2p, W+2p)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, B), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + H, dx[i]: dx[i] + W] for i in range(B)])


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(images[i: i + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[i: i + batch_size]).sum().item()
    return correct / len(labels)


HELD_OUT = 0.1  # share of a split-less source kept for the test accuracy


def splits(cfg: ClassifierTrainConfig) -> tuple[data.Split, data.Split, str]:
    """Training and test images. A source with no test split of its own (``Split.whole``)
    gives a seeded ``HELD_OUT`` share to the test, untouched by training."""
    tr = data.load(cfg.dataset, "train", cfg.data_dir, image_size=cfg.image_size)
    data.require_labels(tr, "train-classifier")
    if tr.whole:
        # A seeded random share, not the last files: a class-per-folder listing is sorted by class.
        n_test = max(1, int(len(tr.labels) * HELD_OUT))
        if len(tr.labels) - n_test < 1:
            raise DataError(f"{tr.source}: {len(tr.labels)} images are too few to hold a test share out")
        perm = torch.randperm(len(tr.labels), generator=torch.Generator().manual_seed(cfg.seed))
        test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
        test = data.Split(tr.images[test_idx], tr.labels[test_idx], tr.source, tr.classes, True)
        train_part = data.Split(tr.images[train_idx], tr.labels[train_idx], tr.source, tr.classes, True)
        return train_part, test, (f"{n_test} images of {tr.source} held out from training "
                                  f"({HELD_OUT:.0%}, seed {cfg.seed})")
    te = data.load(cfg.dataset, "test", cfg.data_dir, image_size=cfg.image_size)
    data.require_labels(te, "train-classifier's test accuracy")
    return tr, te, f"the test split of {cfg.dataset}"


def train(cfg: ClassifierTrainConfig, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    tr, te, test_from = splits(cfg)
    C, H, W = tr.images.shape[1:]
    classes = len(tr.classes) if tr.classes else int(max(tr.labels.max(), te.labels.max())) + 1
    model = Classifier(cfg.arch, C, H, W, num_classes=classes).to(device)
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    n = len(tr.labels)
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        batches = range(0, n, cfg.batch_size)
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"{cfg.arch} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for i in batches:
            idx = perm[i: i + cfg.batch_size]
            xb = tr.images[idx]
            if cfg.shift:
                xb = random_shift(xb, cfg.shift, gen)
            loss = F.cross_entropy(model(xb.to(device)), tr.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, te.images, te.labels):.4f}", flush=True)
    wall = time.time() - t0
    acc = accuracy(model, te.images, te.labels)
    out = Path(cfg.out_dir)
    checkpoint.save_module(model, out / f"{cfg.name}.safetensors", "classifier")
    summary = {
        "file": f"{cfg.name}.safetensors",
        "architecture": model.config,
        "training": {
            "command": (f"purifier train-classifier {data.flags(cfg.dataset, cfg.image_size)} --arch {cfg.arch} "
                        f"--epochs {cfg.epochs} --batch-size {cfg.batch_size} --lr {cfg.lr} "
                        f"--shift {cfg.shift} --seed {cfg.seed} --out {cfg.out_dir} --name {cfg.name}"),
            "settings": asdict(cfg),
            "train_images": n,
            "epochs": cfg.epochs,
            "wall_seconds": round(wall, 1),
            "hardware": hardware.summary(cfg.device),
        },
        "metrics": {"clean_test_accuracy": round(acc, 4), "test_images": len(te.labels), "test_from": test_from},
    }
    if tr.classes is not None:
        summary["classes"] = list(tr.classes)  # label i is classes[i] (the folder names)
    checkpoint.update_card(out, dataset=cfg.dataset, **data.card_fields(cfg.image_size), **{cfg.name: summary})
    return summary
