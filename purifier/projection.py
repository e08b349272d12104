"""How z is optimised: project images onto the generator's range.

For a batch x (B, C, H, W) in [0, 1], run R restarts per image together as one (B*R, D)
latent tensor for L steps of gradient descent on the per-latent mean squared error
||G(z) - x||^2 / (C*H*W). The loss is summed over latents, so each latent's step depends
on its own image only (not on B or R). The best restart per image wins; we return G(z*),
its per-image error and z*.

Faster variants (issue 5), all opt-in through :class:`ProjectionConfig`:
- ``optimizer="adam"``: Adam on z converges in far fewer steps than momentum SGD.
- ``prune_after``/``keep``: after a few steps, drop all but the ``keep`` best restarts
  of each image (their best-so-far is kept, so pruning can never make the answer worse
  than the restart it kept).
- ``encoder_starts``: start that many restarts of each image at E(x), a learned inverse.
- ``early_stop_tol``: every ``check_every`` steps, stop once no latent's best error improved
  by more than this relative amount (one host sync per check, none in between).

The generator's weights are never updated: gradients are taken with respect to z only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import InvalidInputError

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class ProjectionConfig:
    steps: int = 200          # L
    restarts: int = 10        # R
    lr: float = 10.0          # the original's step size for momentum SGD on the mean error
    optimizer: str = "sgd"    # "sgd" (momentum) or "adam"
    momentum: float = 0.7     # sgd only
    init_std: float | None = None  # default 1/sqrt(latent_dim), as the original
    prune_after: int = 0      # 0: never prune
    keep: int = 1             # restarts per image kept after pruning
    encoder_starts: int = 0   # restarts per image started at E(x) (needs an encoder)
    early_stop_tol: float = 0.0  # 0: run all L steps
    check_every: int = 10
    seed: int | None = None   # None: fresh randomness per call (unpredictable restarts)

    def __post_init__(self):
        problems = []
        if self.steps < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        if self.restarts < 1:
            problems.append(f"restarts must be >= 1, got {self.restarts}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.prune_after < 0 or self.keep < 1:
            problems.append("prune_after must be >= 0 and keep >= 1")
        if self.encoder_starts < 0 or self.encoder_starts > self.restarts:
            problems.append(f"encoder_starts must be in [0, restarts], got {self.encoder_starts}")
        if self.early_stop_tol < 0 or self.check_every < 1:
            problems.append("early_stop_tol must be >= 0 and check_every >= 1")
        if problems:
            raise InvalidInputError("bad projection settings: " + "; ".join(problems))

    def with_(self, **changes) -> "ProjectionConfig":
        return replace(self, **changes)


# The paper's configuration and our measured fast configuration (see README, "Speed").
PAPER = ProjectionConfig()
FAST = ProjectionConfig(steps=60, restarts=4, optimizer="adam", lr=0.05, prune_after=10, keep=1,
                        encoder_starts=1)


@dataclass
class Projection:
    images: torch.Tensor   # (B, C, H, W) G(z*)
    errors: torch.Tensor   # (B,) mean squared error of G(z*) to x
    latents: torch.Tensor  # (B, D) z*
    steps_run: int = 0


def _per_latent_error(generator: nn.Module, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = generator(z)                                   # (N, C, H, W)
    return (out - target).pow(2).flatten(1).mean(1)      # (N,)


def _initial_latents(generator, encoder, x, cfg: ProjectionConfig, gen: torch.Generator) -> torch.Tensor:
    B, R, D = x.shape[0], cfg.restarts, generator.latent_dim
    std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(D)
    z = torch.randn(B, R, D, generator=gen, device=x.device) * std  # (B, R, D)
    if cfg.encoder_starts:
        if encoder is None:
            raise InvalidInputError("encoder_starts > 0 needs a model with an encoder")
        with torch.no_grad():
            ze = encoder(x)                                            # (B, D)
        z[:, : cfg.encoder_starts] = ze.unsqueeze(1)
        if cfg.encoder_starts > 1:  # jitter the copies so they explore different basins
            z[:, 1: cfg.encoder_starts] += 0.5 * z[:, 1: cfg.encoder_starts].std() * torch.randn(
                B, cfg.encoder_starts - 1, D, generator=gen, device=x.device)
    return z


def project(generator: nn.Module, x: torch.Tensor, cfg: ProjectionConfig = PAPER,
            encoder: nn.Module | None = None) -> Projection:
    """Project a validated batch x (B, C, H, W) in [0, 1] onto the range of ``generator``.

    ``generator`` and ``x`` must be on the same device; the device is the caller's choice.
    """
    device = x.device
    B = x.shape[0]
    D = generator.latent_dim
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()  # fresh, unpredictable restarts per call
    else:
        gen.manual_seed(cfg.seed)

    z0 = _initial_latents(generator, encoder, x, cfg, gen)           # (B, R, D)
    R = z0.shape[1]
    z = z0.reshape(B * R, D).clone()                                 # (B*R, D)
    owner = torch.arange(B, device=device).repeat_interleave(R)      # (B*R,) image of each latent
    target = x[owner]                                                # (B*R, C, H, W)
    best_err = torch.full((B * R,), float("inf"), device=device)
    best_z = z.clone()
    state1 = torch.zeros_like(z)   # momentum buffer / Adam first moment
    state2 = torch.zeros_like(z)   # Adam second moment
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    last_check = None
    steps_run = 0

    for step in range(cfg.steps):
        z.requires_grad_(True)
        with torch.enable_grad():
            err = _per_latent_error(generator, z, target)            # (N,)
            (grad,) = torch.autograd.grad(err.sum(), z)              # (N, D)
        z = z.detach()
        err = err.detach()
        with torch.no_grad():
            better = err < best_err                                  # error of z *before* this step
            best_err = torch.where(better, err, best_err)
            best_z = torch.where(better.unsqueeze(1), z, best_z)
            if cfg.optimizer == "sgd":
                state1.mul_(cfg.momentum).add_(grad)
                z = z - cfg.lr * state1
            else:
                t = step + 1
                state1.mul_(beta1).add_(grad, alpha=1 - beta1)
                state2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state2 / (1 - beta2 ** t)).sqrt_().add_(eps)
                z = z - cfg.lr * (state1 / (1 - beta1 ** t)) / denom
        steps_run = step + 1

        if cfg.prune_after and step + 1 == cfg.prune_after and R > cfg.keep:
            # Keep the `keep` restarts of each image with the lowest best-so-far error.
            k = cfg.keep
            idx = best_err.view(B, R).topk(k, dim=1, largest=False).indices       # (B, k)
            flat = (idx + torch.arange(B, device=device).unsqueeze(1) * R).reshape(-1)  # (B*k,)
            z, best_z, best_err = z[flat], best_z[flat], best_err[flat]
            state1, state2 = state1[flat], state2[flat]
            owner, target = owner[flat], target[flat]
            R = k

        if cfg.early_stop_tol and (step + 1) % cfg.check_every == 0:
            current = best_err.clone()
            if last_check is not None:
                gain = ((last_check - current) / last_check.clamp_min(1e-12)).max()
                if float(gain) < cfg.early_stop_tol:  # the one host sync, every check_every steps
                    break
            last_check = current

    with torch.no_grad():
        err = _per_latent_error(generator, z, target)   # the final z has not been scored yet
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_z = torch.where(better.unsqueeze(1), z, best_z)
        pick = best_err.view(B, R).argmin(dim=1)                      # (B,)
        z_star = best_z.view(B, R, D)[torch.arange(B, device=device), pick]  # (B, D)
        images = generator(z_star)                                    # (B, C, H, W)
        errors = (images - x).pow(2).flatten(1).mean(1)               # (B,)
    return Projection(images, errors, z_star, steps_run)
