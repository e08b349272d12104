"""Train an encoder E(x) -> z for a trained generator G, to start the projection near its
answer (the "invert and defend" / InverseGAN idea).

Two losses, every step, on a frozen G:

- latent regression on synthetic pairs: ||E(G(z)) - z||^2 for z ~ N(0, I) (G's prior), which
  teaches E to invert G where G is exact;
- reconstruction on real training images: ||G(E(x)) - x||^2, which is what the projection
  itself minimises, so E learns to land where the projection would go for real data
  (real images are not exactly on G's range, and latent regression alone ignores that).

Only E's weights are updated; G is used under ``requires_grad=False``.

``latent_radius`` r > 0 trains the start the projection actually uses when its latents live
on the sphere ||z|| = r*sqrt(D) (``FAST``): E's output is put on the sphere before G sees it,
in both losses. ``init`` continues from an encoder already trained for this generator
("encoder trained longer"): its weights are the starting point, the rest is unchanged.
``denoise_eps`` e > 0 feeds half of each real batch to E with a random +-e sign haze added,
still asking G(E(.)) for the clean image: E learns to start a hazy input at its clean
image's latent (random noise only: no classifier or attack is involved).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..hardware import describe
from ..models import Encoder, blocks_for
from ..projection import to_sphere


@dataclass(frozen=True)
class EncoderTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    latent_weight: float = 1.0   # weight of ||E(G(z)) - z||^2 (mean over latent dims)
    recon_weight: float = 10.0   # weight of ||G(E(x)) - x||^2 (mean over pixels) on real images
    dim: int = 64                # encoder width (same trunk as the critic)
    precision: str = "fp32"      # "bf16": autocast for the forward passes (AMX / tensor cores)
    seed: int = 0
    max_seconds: float | None = None  # stop early (the card records the steps actually run)
    latent_radius: float = 0.0   # > 0: E's output on the sphere ||z|| = r*sqrt(D) before G (as FAST)
    init: str | None = None      # continue from this encoder file (same generator) instead of scratch
    denoise_eps: float = 0.0     # > 0: half of each real batch reaches E with +-eps sign noise, target clean


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def fit_encoder(generator: nn.Module, real_images: torch.Tensor | None, cfg: EncoderTrainConfig,
                progress=None) -> tuple[Encoder, dict]:
    """Train an encoder for ``generator``. ``real_images`` (N, C, H, W) in [0, 1] on the
    generator's device, or None for synthetic pairs only. Returns (encoder in eval mode, stats)."""
    device = next(generator.parameters()).device
    C, H, W = generator.image_shape.as_tuple()
    D = generator.latent_dim
    torch.manual_seed(cfg.seed)
    rng = torch.Generator(device=device).manual_seed(cfg.seed)
    for p in generator.parameters():
        p.requires_grad_(False)
    generator.eval()
    if cfg.init is None:
        enc = Encoder(D, C, H, W, cfg.dim, blocks_for(H, W)).to(device)  # the critic's trunk for this shape
    else:  # its own architecture (width, depth), for this generator's latent and image shape
        from ..checkpoint import load_module
        enc = load_module(cfg.init, "encoder", device)
        got = tuple(enc.config[k] for k in ("latent_dim", "channels", "height", "width"))
        if got != (D, C, H, W):
            raise ValueError(f"{cfg.init} is an encoder for latent {got[0]} and images {got[1:]}, "
                             f"not this generator's latent {D} and images {(C, H, W)}")
    enc.train()

    def start_of(images: torch.Tensor) -> torch.Tensor:  # E(x) as the projection starts from it
        return to_sphere(enc(images).float(), cfg.latent_radius)
    def noisy(x: torch.Tensor) -> torch.Tensor:
        """The first half of the batch with a random +-eps sign pattern added (an L-inf haze like
        FGSM's, but drawn at random: no classifier involved), clipped to [0, 1]; E must still
        land on the clean image's latent, so a hazy input starts the projection at its digit."""
        if cfg.denoise_eps <= 0:
            return x
        half = len(x) // 2
        sign = torch.randint(0, 2, x[:half].shape, generator=rng, device=x.device).mul_(2).sub_(1)
        return torch.cat([(x[:half] + cfg.denoise_eps * sign).clamp_(0, 1), x[half:]])
    opt = torch.optim.Adam(enc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    start = time.perf_counter()
    steps_run, lat_loss, rec_loss = 0, float("nan"), float("nan")
    for step in range(cfg.steps):
        z = torch.randn(cfg.batch_size, D, generator=rng, device=device)     # (b, D) G's prior
        z = to_sphere(z, cfg.latent_radius)  # the prior as the projection samples it (r > 0: on the sphere)
        with torch.no_grad(), _autocast(device, cfg.precision):
            fake = generator(z).float()                                      # (b, C, H, W)
        with _autocast(device, cfg.precision):
            loss_lat = (start_of(fake) - z).pow(2).mean()
            loss = cfg.latent_weight * loss_lat
            if real_images is not None and cfg.recon_weight > 0:
                idx = torch.randint(len(real_images), (cfg.batch_size,), generator=rng, device=device)
                x = real_images[idx]                                         # (b, C, H, W)
                loss_rec = (generator(start_of(noisy(x))).float() - x).pow(2).mean()
                loss = loss + cfg.recon_weight * loss_rec
            else:
                loss_rec = torch.zeros(())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_lat, loss_rec = loss_lat.detach(), loss_rec.detach()
        opt.step()
        sched.step()
        steps_run = step + 1
        lat_loss, rec_loss = loss_lat.item(), loss_rec.item()
        if progress is not None and (step % 100 == 0 or step + 1 == cfg.steps):
            progress(step + 1, lat_loss, rec_loss)
        if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
            break
    stats = dict(steps_run=steps_run, final_latent_loss=lat_loss, final_recon_loss=rec_loss,
                 wall_seconds=round(time.perf_counter() - start, 1))
    return enc.eval(), stats


@torch.no_grad()
def start_error(generator: nn.Module, encoder: nn.Module, x: torch.Tensor, latent_radius: float = 0.0) -> float:
    """Mean squared error of G(E(x)) to x (fp32), E's output on the sphere of ``latent_radius``
    (> 0) as the projection would start from it."""
    z = to_sphere(encoder(x).float(), latent_radius)
    return (generator(z) - x).pow(2).flatten(1).mean(1).mean().item()


def unseen_holdout(section: dict | None) -> int:
    """How many of the training split's last images the encoder a card section describes never
    trained on: the smallest ``holdout`` along its ``continued_from`` chain (0 when any stage
    trained on the whole split, or the section is missing)."""
    if not section:
        return 0
    held = int(section.get("holdout", {}).get("n", 0))
    if "continued_from" in section:
        held = min(held, unseen_holdout(section["continued_from"]))
    return held


def train(model_dir: str, dataset: str, cfg: EncoderTrainConfig, data_dir: str | None = None,
          device: str = "cpu", command: str | None = None, progress=None,
          image_size: int | None = None, holdout: int | None = None) -> dict:
    """Train an encoder for ``<model_dir>/generator.safetensors`` on ``dataset``'s training
    images (a name or a path, see :func:`purifier.data.load`); save
    ``<model_dir>/encoder.safetensors`` and record the run in the card.

    ``holdout`` N > 0 leaves the split's last N images (:func:`purifier.data.last`, the slice
    ``purifier calibrate`` draws from) out of the training, so that the detection threshold is
    chosen on errors of images the encoder never saw: an encoder fits its own training images
    closer than new ones, and a threshold chosen on those flags more clean traffic than its
    target (docs/service.md). None: the hold-out of the encoder ``cfg.init`` continues (its
    card's record), else 0."""
    from pathlib import Path

    from .. import checkpoint, data

    model_dir = Path(model_dir)
    generator = checkpoint.load_generator(model_dir / "generator.safetensors", device)
    split = data.load(dataset, "train", data_dir, image_size=image_size)
    data.check_shape(split, generator.image_shape.as_tuple(), f"the generator in {model_dir}")
    init_card = None
    if cfg.init is not None:  # the training it continues: the card of the encoder it starts from
        init_card = checkpoint.read_card(Path(cfg.init).parent).get("encoder")
        if not (init_card and Path(cfg.init).name == init_card.get("file")):
            init_card = None
    kept = unseen_holdout(init_card)
    if holdout is None:  # continuing an encoder keeps its hold-out unseen
        holdout = kept
    elif init_card is not None and holdout and kept < holdout:
        print(f"warning: {cfg.init} was trained on some of the last {holdout} images this run holds "
              f"out (it kept only the last {kept} unseen); the card records that calibration images "
              "were seen", flush=True)
    seen = data.all_but_last(split, holdout)
    real = seen.images.to(device)
    enc, stats = fit_encoder(generator, real, cfg, progress=progress)
    recon = start_error(generator, enc, real[:512], cfg.latent_radius)  # E alone, a fixed training slice
    path = model_dir / "encoder.safetensors"
    checkpoint.save_module(enc.cpu(), path, "encoder")
    section = dict(file=path.name, command=command, dataset=dataset, settings=asdict(cfg),
                   train_images=len(seen.labels), train_recon_error_of_encoder_alone=recon, **stats,
                   hardware=describe(device),
                   torch=torch.__version__)
    if holdout:
        unseen = data.last(split, holdout).images[:512].to(device)
        section["holdout"] = {"n": holdout, "slice": f"last {holdout} of the training split",
                              "recon_error_of_encoder_alone": start_error(generator, enc, unseen,
                                                                          cfg.latent_radius)}
    if init_card is not None:
        section["continued_from"] = init_card
    card = checkpoint.read_card(model_dir)
    card["encoder"] = section  # a new encoder's record replaces the old one's (nothing of it carries over)
    checkpoint.write_card(model_dir, card)
    return section
