"""How z is optimised: project images onto the generator's range.

For a batch x (B, C, H, W) in [0, 1], run R restarts per image together as one (B*R, D)
latent tensor for L steps of gradient descent on the per-latent mean squared error
||G(z) - x||^2 / (C*H*W). The loss is summed over latents, so each latent's step depends
on its own image only (not on B or R). The best restart per image wins; we return G(z*),
its per-image error and z*.

Faster variants (issue 5, measured in ``docs/speed.md``), all opt-in through
:class:`ProjectionConfig`:

- ``optimizer="adam"``: Adam on z converges in far fewer steps than momentum SGD.
- ``prune_after``/``keep``: after a few steps, drop all but the ``keep`` best restarts
  of each image (their best-so-far is kept, so pruning can never make the answer worse
  than the restart it kept).
- ``encoder_starts``: start that many restarts of each image at E(x), a learned inverse;
  ``encoder_jitter``: fresh noise on the first of them too (the others always get 0.5
  init_std), so that the answer without a seed is not the same on every call.
- ``early_stop_tol``: every ``check_every`` steps (once pruning is done), retire each image
  whose restarts all improved their best error by less than this relative amount since the
  last check; the batch shrinks to the images still improving. One host sync per check.
- ``latent_radius=r``: keep every z on the sphere ||z|| = r*sqrt(D) (r=1: where N(0, I) puts
  its mass), starts included. The paper lets z wander; near the origin a WGAN generator makes
  blurry "average" images that fit added noise well, so the constraint keeps the answer
  looking like training data (measured in docs/results.md).
- ``precision="bf16"``: G's forward and backward under bf16 autocast (AMX/AVX512-BF16 on
  recent Xeons, tensor cores on GPUs). Selection of the answer and the returned errors are
  always recomputed in fp32, so lower precision steers the search but never mis-reports it.
  ``precision="auto"`` picks bf16 only where it is native (else it is emulated and slow).
- ``compile=True``: ``torch.compile`` the step (forward + gradient); on CUDA with CUDA
  graphs (``mode="reduce-overhead"``). ``channels_last=True`` runs a channels-last copy of
  the generator (made once per generator and kept while its weights are unchanged; a
  generator already in channels-last, as the service's, is used as it is).
- ``cuda_graph=True`` (CUDA only): capture the *whole* fixed-length search (all L steps,
  the pruning, the choice of the answer) as one CUDA graph per batch size and replay it, so
  a request costs one launch instead of thousands. The random starts (and E(x)) are drawn
  outside the graph and copied in, so restarts stay fresh per call. No early stopping
  (it needs host syncs); elsewhere the result is the eager loop's.

Stopping early for the caller: :func:`project` takes ``should_stop``, a function asked
between steps (host-side only: no device sync); when it answers True the search raises
:class:`Abandoned`. The service uses it to stop a batch whose callers have all gone
(cancelled, or past their deadline). The CUDA-graph path is one launch and is not
interrupted; it only runs the server's default, bounded, configuration.

``select="last"`` (the ``ORIGINAL`` preset) answers as the original Defense-GAN code does
(kabkabm/defensegan ``models/gan.py``): each restart's iterate at the last step's forward
(after L-1 updates; the L-th update is never looked at), the restart with the lowest error
there wins. By default (``select="best"``) every latent's best-so-far (error, z) is tracked
at every step, and the answer is the best over those and the final iterate, so no speed-up
can return a worse reconstruction than the restart it kept would have had at the step it was
last scored.

The generator's weights are never updated: gradients are taken with respect to z only.
:func:`project` runs the generator (and encoder) in eval mode with frozen weights and puts
every module's ``training`` and every weight's ``requires_grad`` back as it found them.

Presets: ``PAPER`` and ``FAST`` below, by name in ``PRESETS``. :func:`preset` is the one
place that turns a preset (or a config) and overrides into settings, and owns the rules
that keep them runnable: a restarts override clamps ``keep`` and ``encoder_starts`` to the
new R; a model without an encoder gets random starts only; ``latent_radius`` overrides the
sphere (0: z unconstrained, as the paper).
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError, DeadlineError, InvalidInputError

OPTIMIZERS = ("sgd", "adam")
SELECTS = ("best", "last")
PRECISIONS = ("fp32", "bf16", "auto")


@functools.lru_cache(maxsize=None)
def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is native on this device (AMX / AVX512-BF16 CPUs, bf16-capable GPUs).
    Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where bf16 is native, else "fp32"."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


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
    encoder_jitter: float = 0.0  # noise (in init_std units) added to the first start at E(x) too
    early_stop_tol: float = 0.0  # 0: run all L steps
    check_every: int = 10
    seed: int | None = None   # None: fresh randomness per call (unpredictable restarts)
    precision: str = "fp32"   # "fp32", "bf16" (autocast for the steps; scoring stays fp32), "auto"
    compile: bool = False     # torch.compile the step (CUDA: with CUDA graphs)
    channels_last: bool = False
    latent_radius: float = 0.0  # > 0: keep every z on the sphere ||z|| = radius * sqrt(latent_dim)
    cuda_graph: bool = False  # CUDA: replay the whole search as one captured graph
    select: str = "best"      # "best": best-so-far over all steps; "last": the original's last step
    # Per-image step size from the starts (0: off): an image whose best start already fits it
    # with an error under ``precise_below`` (clean-looking) is searched with ``precise_lr``
    # instead of ``lr``; the others (attacked-looking: the starts cannot draw their perturbation)
    # keep ``lr``. Decided once, on the errors of the starts, before the first step.
    precise_below: float = 0.0
    precise_lr: float = 0.0
    # Step-size schedule, the same for every image (1.0: constant): from step
    # ``decay_from * steps`` on, each row's step size falls along a half cosine to
    # ``decay_to`` times its own by the last step (see :func:`lr_factor`).
    decay_to: float = 1.0
    decay_from: float = 0.0

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
        if self.init_std is not None and not (self.init_std > 0 and math.isfinite(self.init_std)):
            problems.append(f"init_std must be a positive number or None, got {self.init_std}")
        if self.prune_after < 0 or self.keep < 1:
            problems.append("prune_after must be >= 0 and keep >= 1")
        if self.encoder_starts < 0 or self.encoder_starts > self.restarts:
            problems.append(f"encoder_starts must be in [0, restarts], got {self.encoder_starts}")
        if not (self.encoder_jitter >= 0 and math.isfinite(self.encoder_jitter)):
            problems.append(f"encoder_jitter must be a number >= 0, got {self.encoder_jitter}")
        if self.early_stop_tol < 0 or self.check_every < 1:
            problems.append("early_stop_tol must be >= 0 and check_every >= 1")
        if self.cuda_graph and (self.compile or self.early_stop_tol):
            problems.append("cuda_graph captures the eager loop: it excludes compile and early stopping")
        if not (self.precise_below >= 0 and math.isfinite(self.precise_below)):
            problems.append(f"precise_below must be a number >= 0, got {self.precise_below}")
        if self.precise_below and not (self.precise_lr > 0 and math.isfinite(self.precise_lr)):
            problems.append(f"precise_lr must be a positive number when precise_below is set, got {self.precise_lr}")
        if not (0 < self.decay_to <= 1):
            problems.append(f"decay_to must be in (0, 1], got {self.decay_to}")
        if not (0 <= self.decay_from < 1):
            problems.append(f"decay_from must be in [0, 1), got {self.decay_from}")
        if self.select not in SELECTS:
            problems.append(f"select must be one of {SELECTS}, got {self.select!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if problems:
            raise InvalidInputError("bad projection settings: " + "; ".join(problems))

    def with_(self, **changes) -> "ProjectionConfig":
        return replace(self, **changes)


# The paper's configuration and our measured fast configuration (docs/speed.md): Adam on z,
# 16 starts per image (one at E(x), fifteen random, so the answer stays unpredictable), pruned
# to the best one after the first step, 50 steps in all: 65 latent-steps per image against the
# paper's 2,000, each under bf16 where the hardware has it; z kept on the sphere where the
# prior N(0, I) puts its mass (||z|| = sqrt(D)), which measured better on clean and attacked
# images. The start at E(x) gets fresh noise too (encoder_jitter, 0.5 init_std): without it
# two unseeded calls gave the same bytes (issue 11). Until 2026-11-27 FAST was 100 steps from
# 4 starts pruned after 10 (130 latent-steps); with the encoders trained for the sphere
# (train-encoder --latent-radius 1) this one is 2x faster and more robust under attack on both
# data sets (paired on 1,000 images, docs/speed.md), at a higher clean reconstruction error.
PAPER = ProjectionConfig()
FAST = ProjectionConfig(steps=50, restarts=16, optimizer="adam", lr=0.1, prune_after=1, keep=1,
                        encoder_starts=1, encoder_jitter=0.5, precision="auto", latent_radius=1.0)
# The original code's reconstruction exactly (../shared/notes/original-defensegan.md): PAPER's
# settings, but the answer is read at the last step instead of the best step seen.
ORIGINAL = PAPER.with_(select="last")
# FAST with a step size per image (docs/speed.md, "One bar, two step sizes"): 8 starts (57
# latent-steps); an image whose best start already fits it with an error under 0.045 (clean-
# looking: 1,000 of 1,000 held-out clean MNIST training images, 985 of Fashion-MNIST's, by
# `purifier calibrate --projection fast-precise`) takes Adam steps of 0.025, close to the paper
# configuration's fit; the others (FGSM eps=0.3 lifts the starts' error above it) take steps of
# 0.15, which fit the perturbation less. Paired on 1,000 test images against the paper
# configuration, 54.5x / 56.1x its speed on a 2-core CPU (each at its fastest run, two runs):
# matched (clean, FGSM, transfer within a point or better, clean error not higher) on MNIST's
# three seeded image sets and Fashion-MNIST's two. The bar is absolute (mean squared error of
# images in [0, 1]): for other data, check the share of clean images under it first
# (`purifier calibrate` reports it). Not the default: against the detection-aware BPDA+EOT
# attack (which drives inputs under the bar) it is 7-21 points weaker than FAST.
FAST_PRECISE = FAST.with_(restarts=8, lr=0.15, precise_below=0.045, precise_lr=0.025)
PRESETS = {"paper": PAPER, "fast": FAST, "fast-precise": FAST_PRECISE, "original": ORIGINAL}
SETTINGS = tuple(f.name for f in fields(ProjectionConfig))


# Settings added after bench caches and evaluation records were first written: a record leaves
# them out while they are at their defaults, so the records of searches that never used them
# (hours of paper-configuration projections) keep their keys.
LATER_SETTINGS = {"precise_below": 0.0, "precise_lr": 0.0, "decay_to": 1.0, "decay_from": 0.0}


def settings_record(cfg: "ProjectionConfig | dict") -> dict:
    """``asdict(cfg)`` without the later settings that are at their defaults (see LATER_SETTINGS)."""
    d = dict(cfg) if isinstance(cfg, dict) else asdict(cfg)
    return {k: v for k, v in d.items() if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}


# Projection settings that do not change what a search returns (how it runs, and the seed,
# which an evaluation derives per chunk): ignored when matching an evaluation's projection, when
# grouping a bench's configurations into searches, and when checking a card's threshold.
_RUN_ONLY = ("seed", "compile", "cuda_graph", "channels_last")


def search_settings(cfg: "ProjectionConfig | dict") -> dict:
    """What a search computes: its settings record without those of how it runs (_RUN_ONLY).
    Two configurations with equal search settings are one search run two ways."""
    return {k: v for k, v in settings_record(cfg).items() if k not in _RUN_ONLY}


def settings_differ(a: "ProjectionConfig | dict", b: "ProjectionConfig | dict") -> list[str]:
    """The search settings (:func:`search_settings`) in which two configurations differ, sorted."""
    a, b = search_settings(a), search_settings(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def preset(base: "str | ProjectionConfig" = "paper", *, has_encoder: bool = True,
           **overrides) -> ProjectionConfig:
    """Settings from a preset name (``PRESETS``) or a config, with ``overrides`` (a value of
    None means "the preset's"), under the rules every caller shares:

    - ``restarts=R`` clamps ``keep`` and ``encoder_starts`` to R unless they are given too
      (FAST's one start at E(x) stays one of the R, whatever R is asked for);
    - ``has_encoder=False`` (the model directory has no encoder): no start at E(x);
    - ``latent_radius`` replaces the preset's sphere (0: z unconstrained, as the paper).

    Unknown names and settings raise :class:`ConfigError`; bad values, the config's own
    :class:`InvalidInputError`.
    """
    if isinstance(base, str):
        if base not in PRESETS:
            raise ConfigError(f"unknown projection preset {base!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[base]
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown projection settings {unknown}; settings: {sorted(SETTINGS)}")
    if "restarts" in changes:
        r = changes["restarts"]
        changes.setdefault("keep", min(base.keep, r))
        changes.setdefault("encoder_starts", min(base.encoder_starts, r))
    if not has_encoder:
        changes["encoder_starts"] = 0
    return base.with_(**changes) if changes else base


def latent_steps(cfg: ProjectionConfig) -> int:
    """Generator forward+backward passes per image the search runs at most (early stopping
    only makes it fewer): R per step until the pruning, ``keep`` per step after it."""
    L, R = cfg.steps, cfg.restarts
    if cfg.prune_after and cfg.prune_after <= L and R > cfg.keep:  # as _search prunes
        return R * cfg.prune_after + cfg.keep * (L - cfg.prune_after)
    return R * L


def lr_factor(cfg: ProjectionConfig, step: int) -> float:
    """The schedule's multiplier of the step size at ``step`` (0-based): 1 before step
    ``floor(decay_from * steps)``, then a half cosine down to ``decay_to`` at the last step."""
    if cfg.decay_to == 1.0:
        return 1.0
    start = math.floor(cfg.decay_from * cfg.steps)
    span = cfg.steps - 1 - start
    if step < start:
        return 1.0
    if span <= 0:
        return cfg.decay_to
    frac = min(step - start, span) / span
    return cfg.decay_to + (1.0 - cfg.decay_to) * 0.5 * (1.0 + math.cos(math.pi * frac))


def start_errors(generator: nn.Module, x: torch.Tensor, cfg: ProjectionConfig,
                 encoder: nn.Module | None = None) -> torch.Tensor:
    """(B,) each image's best start error under ``cfg`` (fp32, before any step): what
    ``precise_below`` is compared with. The share of clean images under the bar tells whether
    an absolute bar suits a data set (``purifier calibrate`` reports it)."""
    return project(generator, x, start_settings(cfg), encoder).errors


def start_settings(cfg: ProjectionConfig) -> ProjectionConfig:
    """``cfg`` with no step taken: a projection under it answers each image's best start."""
    return cfg.with_(steps=0, cuda_graph=False, compile=False)


def describe_cost(cfg: ProjectionConfig) -> str:
    """The latent-step count per image, spelled out for error messages."""
    if latent_steps(cfg) == cfg.steps * cfg.restarts:
        return f"{cfg.steps} steps x {cfg.restarts} restarts"
    return (f"{cfg.restarts} restarts x {cfg.prune_after} steps + {cfg.keep} kept x "
            f"{cfg.steps - cfg.prune_after} steps")


class Abandoned(DeadlineError):
    """``should_stop`` answered True: nobody waits for this projection any more."""


@dataclass
class Projection:
    images: torch.Tensor   # (B, C, H, W) G(z*)
    errors: torch.Tensor   # (B,) mean squared error of G(z*) to x
    latents: torch.Tensor  # (B, D) z*
    steps_run: int = 0


@torch.no_grad()
def _reconstruct(generator: nn.Module, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G(z) (B, C, H, W) and its mean squared error to x (B,), in fp32."""
    images = generator(z)
    return images, (images - x).pow(2).flatten(1).mean(1)


def _per_latent_error(generator: nn.Module, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = generator(z)                                   # (N, C, H, W)
    return (out - target).pow(2).flatten(1).mean(1)      # (N,)


# --- the step: per-latent error and its gradient with respect to z --------------------------

def _make_loss(generator: nn.Module, precision: str, device_type: str, cache: bool = True):
    # Graph capture needs autocast's weight-cast cache off (the casts must be in the graph).
    def loss(z: torch.Tensor, target: torch.Tensor):
        if precision == "bf16":
            with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache):
                out = generator(z)                       # (N, C, H, W) bf16
            out = out.float()
        else:
            out = generator(z)                           # (N, C, H, W)
        err = (out - target).pow(2).flatten(1).mean(1)   # (N,)
        return err.sum(), err
    return loss


def _eager_step(loss):
    def step(z, target):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            total, err = loss(z, target)
            (grad,) = torch.autograd.grad(total, z)      # (N, D)
        return err.detach(), grad
    return step


# Compiled steps are cached per generator (weakly, so a dropped model frees its graphs).
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _compiled_step(generator: nn.Module, precision: str, device_type: str):
    per_gen = _COMPILED.setdefault(generator, {})
    key = (precision, device_type)
    if key not in per_gen:
        grad_and_err = torch.func.grad_and_value(_make_loss(generator, precision, device_type),
                                                 has_aux=True)

        def fn(z, target):
            grad, (_, err) = grad_and_err(z, target)
            return err, grad
        # On CUDA, "reduce-overhead" replays the step as a CUDA graph: no per-kernel launch cost.
        mode = "reduce-overhead" if device_type == "cuda" else None
        per_gen[key] = torch.compile(fn, mode=mode)  # a second batch size compiles one dynamic graph
    compiled = per_gen[key]
    if device_type != "cuda":
        return compiled

    def step(z, target):
        # CUDA-graph outputs are overwritten by the next replay: copy them out first.
        torch.compiler.cudagraph_mark_step_begin()
        err, grad = compiled(z, target)
        return err.clone(), grad.clone()
    return step


def _step_function(generator: nn.Module, cfg: ProjectionConfig, device_type: str):
    if cfg.compile:
        return _compiled_step(generator, cfg.precision, device_type)
    return _eager_step(_make_loss(generator, cfg.precision, device_type))


# --- starts, and choosing the answer -----------------------------------------------------

def _initial_latents(generator, encoder, x, cfg: ProjectionConfig, gen: torch.Generator) -> torch.Tensor:
    B, R, D = x.shape[0], cfg.restarts, generator.latent_dim
    std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(D)
    z = torch.randn(B, R, D, generator=gen, device=x.device) * std  # (B, R, D)
    if cfg.encoder_starts:
        if encoder is None:
            raise InvalidInputError("encoder_starts > 0 needs a model with an encoder")
        with torch.no_grad():
            ze = encoder(x).float()                                    # (B, D)
        z[:, : cfg.encoder_starts] = ze.unsqueeze(1)
        if cfg.encoder_starts > 1:  # jitter the copies so they explore different basins
            z[:, 1: cfg.encoder_starts] += 0.5 * std * torch.randn(
                B, cfg.encoder_starts - 1, D, generator=gen, device=x.device)
        if cfg.encoder_jitter:
            # E(x) is deterministic and its start wins the pruning: without this, an unseeded call
            # answers exactly as the last one did (issue 11), and an attacker gets exact gradients.
            # Drawn after the other starts, so configurations without it keep their seeded answers.
            z[:, 0] += cfg.encoder_jitter * std * torch.randn(B, D, generator=gen, device=x.device)
    return z


def to_sphere(z: torch.Tensor, radius: float) -> torch.Tensor:
    """Rescale each row of z (N, D) to norm radius * sqrt(D): where N(0, I) puts its mass
    (radius 0: z unchanged). Differentiable, so encoder training uses it too; the search calls
    it on latents that carry no graph."""
    if not radius:
        return z
    return z * (radius * math.sqrt(z.shape[1]) / z.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def _settle(generator, best_z, best_err, z, target, n_images: int, R: int, rescore_best: bool):
    """Pick each image's answer among its restarts' best-so-far and their final iterates,
    all scored in fp32. Returns (z* (n, D), its error (n,))."""
    if rescore_best:  # best_err came from a lower-precision forward: only a guide
        best_err = _per_latent_error(generator, best_z, target)       # (n*R,)
    err = _per_latent_error(generator, z, target)                      # (n*R,) final iterates
    better = err < best_err
    cand_err = torch.where(better, err, best_err)
    cand_z = torch.where(better.unsqueeze(1), z, best_z)               # (n*R, D)
    pick = cand_err.view(n_images, R).argmin(dim=1)                    # (n,)
    rows = torch.arange(n_images, device=z.device) * R + pick
    return cand_z[rows], cand_err[rows]


def _rng(cfg: ProjectionConfig, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()  # fresh, unpredictable restarts per call
    else:
        gen.manual_seed(cfg.seed)
    return gen


# --- the projection -----------------------------------------------------------------------

def project(generator: nn.Module, x: torch.Tensor, cfg: ProjectionConfig = PAPER,
            encoder: nn.Module | None = None, should_stop: Callable[[], bool] | None = None) -> Projection:
    """Project a validated batch x (B, C, H, W) in [0, 1] onto the range of ``generator``.

    ``generator`` and ``x`` must be on the same device; the device is the caller's choice.
    ``should_stop`` is asked before every step (not in the CUDA-graph path); True raises
    :class:`Abandoned`.
    """
    device = x.device
    if cfg.cuda_graph and device.type != "cuda":
        raise InvalidInputError("cuda_graph needs a CUDA device")
    gen = _rng(cfg, device)
    if cfg.channels_last:
        generator = _channels_last(generator)
    cfg = cfg.with_(precision=resolve_precision(cfg.precision, device))
    with _frozen(generator), _frozen(encoder):
        z0 = _initial_latents(generator, encoder, x, cfg, gen)       # (B, R, D)
        if cfg.cuda_graph:
            return _project_graphed(generator, x, z0, cfg)
        step_fn = _step_function(generator, cfg, device.type)
        out_z, steps_run = _search(generator, step_fn, z0, x, cfg, should_stop)
        return Projection(*_reconstruct(generator, out_z, x), out_z, steps_run)


@contextmanager
def _frozen(module: nn.Module | None):
    """Eval mode and no weight gradients for the call; each module's ``training`` and each
    weight's ``requires_grad`` are put back afterwards, as the caller had them. Set on the
    attributes, not through ``train()``: an exported program refuses a mode switch."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for m, _ in modes:
            m.training = False
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


# Channels-last copies of callers' generators (weakly: dropping the generator frees its copy),
# with the weights' version counters at copy time, so an update made since forces a new copy.
_CHANNELS_LAST: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _channels_last(generator: nn.Module) -> nn.Module:
    """A channels-last generator with the caller's weights. Converting the caller's module in
    place would change it under them; a copy made per call would hand a captured CUDA graph
    weights that are freed after the call. So: the generator itself when it is channels-last
    already, else one cached copy per generator."""
    weights = [p for p in generator.parameters() if p.dim() == 4]
    if all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
        return generator
    versions = tuple(p._version for p in generator.parameters())
    cached = _CHANNELS_LAST.get(generator)
    if cached is None or cached[0] != versions:
        cached = (versions, copy.deepcopy(generator).to(memory_format=torch.channels_last))
        _CHANNELS_LAST[generator] = cached
    return cached[1]


def _search(generator: nn.Module, step_fn, z0: torch.Tensor, x: torch.Tensor,
            cfg: ProjectionConfig, should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, int]:
    """The descent from starts z0 (B, R, D) toward x (B, C, H, W): returns (z* (B, D), steps run).
    Without early stopping it makes no host syncs (so it can be captured as a CUDA graph)."""
    device = x.device
    B, R, D = z0.shape
    rescore = cfg.precision != "fp32"
    z = z0.reshape(B * R, D).clone()                                 # (N, D), N = B*R
    z = to_sphere(z, cfg.latent_radius)
    images_left = torch.arange(B, device=device)                     # (b,) image of each active row group
    target = x.repeat_interleave(R, dim=0)                           # (N, C, H, W)
    best_err = torch.full((B * R,), float("inf"), device=device)     # (N,)
    best_z = z.clone()                                               # (N, D)
    state1 = torch.zeros_like(z)   # momentum buffer / Adam first moment
    state2 = torch.zeros_like(z)   # Adam second moment
    lr = cfg.lr                    # a number, or (N, 1) per row with precise_below
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    out_z = torch.zeros(B, D, device=device)                          # answers, filled as images retire
    last_check = None
    pruning_pending = bool(cfg.prune_after) and cfg.prune_after <= cfg.steps and R > cfg.keep
    steps_run = 0

    for step in range(cfg.steps):
        if should_stop is not None and should_stop():
            raise Abandoned(f"projection stopped after {step} of {cfg.steps} steps: nobody waits for it")
        err, grad = step_fn(z, target)                               # (N,), (N, D)
        with torch.no_grad():
            if cfg.precise_below and step == 0:   # each image's best start, before any step
                start = err.view(B, R).amin(1).repeat_interleave(R).unsqueeze(1)   # (N, 1)
                lr = torch.where(start < cfg.precise_below, cfg.precise_lr, cfg.lr).to(z.dtype)
            if cfg.select == "last":   # the original: only the last forward counts
                best_err, best_z = err, z
            else:
                better = err < best_err                              # error of z *before* this step
                best_err = torch.where(better, err, best_err)
                best_z = torch.where(better.unsqueeze(1), z, best_z)
            f = lr_factor(cfg, step)                                 # a Python number: graph-safe
            step_lr = lr if f == 1.0 else lr * f
            if cfg.optimizer == "sgd":
                state1.mul_(cfg.momentum).add_(grad)
                z = z - step_lr * state1
            else:
                t = step + 1
                state1.mul_(beta1).add_(grad, alpha=1 - beta1)
                state2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state2 / (1 - beta2 ** t)).sqrt_().add_(eps)
                z = z - step_lr * (state1 / (1 - beta1 ** t)) / denom
            z = to_sphere(z, cfg.latent_radius)
        steps_run = step + 1

        if pruning_pending and step + 1 == cfg.prune_after:
            # Keep the `keep` restarts of each image with the lowest best-so-far error.
            b, k = images_left.numel(), cfg.keep
            idx = best_err.view(b, R).topk(k, dim=1, largest=False).indices        # (b, k)
            rows = (idx + torch.arange(b, device=device).unsqueeze(1) * R).reshape(-1)  # (b*k,)
            z, best_z, best_err, target = z[rows], best_z[rows], best_err[rows], target[rows]
            state1, state2 = state1[rows], state2[rows]
            if torch.is_tensor(lr):
                lr = lr[rows]
            R, pruning_pending, last_check = k, False, None

        if cfg.early_stop_tol and not pruning_pending and (step + 1) % cfg.check_every == 0:
            b = images_left.numel()
            if last_check is not None:
                gain = ((last_check - best_err) / last_check.clamp_min(1e-12)).view(b, R).amax(1)
                done = gain < cfg.early_stop_tol                     # (b,)
                n_done = int(done.sum())                             # the one host sync per check
                if n_done:
                    rows = done.repeat_interleave(R)                 # (b*R,)
                    zs, _ = _settle(generator, best_z[rows], best_err[rows],
                                    (best_z if cfg.select == "last" else z)[rows], target[rows],
                                    n_done, R, rescore)
                    out_z[images_left[done]] = zs
                    keep_rows = ~rows
                    z, best_z, best_err = z[keep_rows], best_z[keep_rows], best_err[keep_rows]
                    target, state1, state2 = target[keep_rows], state1[keep_rows], state2[keep_rows]
                    if torch.is_tensor(lr):
                        lr = lr[keep_rows]
                    images_left = images_left[~done]
                    if images_left.numel() == 0:
                        break
            last_check = best_err.clone()

    if cfg.select == "last" and steps_run:
        z = best_z   # the last scored iterate: the original never looks at the L-th update
    with torch.no_grad():
        if cfg.early_stop_tol:
            if images_left.numel():
                zs, _ = _settle(generator, best_z, best_err, z, target, images_left.numel(), R, rescore)
                out_z[images_left] = zs
        else:  # every image is still in the batch, in order: no indexing (and no host sync)
            out_z, _ = _settle(generator, best_z, best_err, z, target, B, R, rescore)
    return out_z, steps_run


# --- the whole search as one CUDA graph ----------------------------------------------------

# Captured graphs, per generator (weakly) and per (batch shape, settings).
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _project_graphed(generator: nn.Module, x: torch.Tensor, z0: torch.Tensor,
                     cfg: ProjectionConfig) -> Projection:
    key = (tuple(x.shape), tuple(z0.shape), x.device, cfg.with_(seed=None))
    per_gen = _GRAPHS.setdefault(generator, {})
    if key not in per_gen:
        static_x, static_z0 = x.clone(), z0.clone()
        step_fn = _eager_step(_make_loss(generator, cfg.precision, "cuda", cache=False))

        def body():
            out_z, _ = _search(generator, step_fn, static_z0, static_x, cfg)
            return (*_reconstruct(generator, out_z, static_x), out_z)

        side = torch.cuda.Stream(x.device)   # warm up (allocator, cuDNN plans) off the capture
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = body()
        per_gen[key] = (graph, static_x, static_z0, static_out)
    graph, static_x, static_z0, static_out = per_gen[key]
    static_x.copy_(x)
    static_z0.copy_(z0)
    graph.replay()
    images, errors, out_z = (t.clone() for t in static_out)  # the next replay overwrites them
    return Projection(images, errors, out_z, cfg.steps)
