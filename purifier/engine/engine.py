"""The compute behind the service: one model bundle on one device, with the server's
limits. Synchronous and free of gRPC, so a notebook can use it as the server does::

    engine = Engine.load("models/fashion-mnist", device="cpu", projection="fast")
    x = engine.validate(uint8_images)                 # (B, C, H, W) float in [0, 1]
    images, errors = engine.project(x, engine.config(steps=50))
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import checkpoint, projection, validation
from ..errors import ConfigError, InvalidInputError, ModelLoadError
from ..projection import preset


MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed's largest; purifier.v1 carries a uint64


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 64
    max_steps: int = 1000
    max_restarts: int = 20
    # steps x restarts x images one request may ask for; the default is a full batch of 64 at
    # the paper's L=200, R=10 (the caps alone allow 10x that: ~14 s of CPU for one request)
    max_compute: int = 128_000


@contextmanager
def asked_at_every_layer(generator: torch.nn.Module, should_stop: Callable[[], bool] | None):
    """Ask ``should_stop`` after each of the generator's weighted layers runs forward, and
    again when backward reaches that layer's output; True raises ``projection.Abandoned`` from
    inside the step. Between steps is not often enough on the CPU: one eager step of a batch at
    the caps (64 images x 20 restarts = 1,280 latents) is one call into torch of 0.9 s on this
    2-core machine idle, about 4 s at load 8, and a request arriving after an abandoned one
    waited for it (1.26 s, issue 11). Per layer, the wait is a fraction of a step, and the
    step itself is unchanged (same batch, same kernels, no host sync); a check costs a Python
    call per layer. The hooks live only for this call."""
    if should_stop is None:
        yield
        return

    def check(*_):
        if should_stop():
            raise projection.Abandoned("projection stopped inside a step: nobody waits for it")

    def after_forward(module, inputs, output):
        check()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(check)        # runs when backward reaches this layer

    layers = [m for m in generator.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [m.register_forward_hook(after_forward) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Engine:
    def __init__(self, bundle: checkpoint.ModelBundle, device: str | torch.device = "cpu",
                 default: projection.ProjectionConfig = projection.PAPER, limits: Limits = Limits(),
                 cuda_graphs: str = "auto"):
        self.bundle = bundle
        self.device = torch.device(device)
        self.limits = limits
        self.default = preset(default, has_encoder=bundle.encoder is not None)
        full = projection.latent_steps(self.default) * limits.max_batch_size
        if full > limits.max_compute:
            raise ConfigError(f"--max-compute {limits.max_compute} is below a full batch of the default projection "
                              f"({limits.max_batch_size} images x ({projection.describe_cost(self.default)}) = "
                              f"{full} latent-steps): raise it, or lower --max-batch-size")
        if cuda_graphs == "on" and self.device.type != "cuda":
            raise ModelLoadError("--cuda-graphs on needs a CUDA device")
        # On CUDA the default projection replays as one captured graph per batch-size bucket
        # (measured on an H200: batch-1 p50 17 ms against 217 ms eager, docs/speed.md); requests
        # that change steps or restarts, and early stopping, run eagerly.
        self.graphs = self.device.type == "cuda" and cuda_graphs != "off" and not self.default.early_stop_tol
        if self.graphs:
            torch.backends.cudnn.benchmark = True  # shapes are fixed per bucket
            bundle.generator.to(memory_format=torch.channels_last)  # once, not per request
            self._graph_cfg = self.default.with_(cuda_graph=True)
        elif self.device.type == "cpu":
            # oneDNN's transposed convolutions are faster channels-last, measured on a 2-core
            # CPU (docs/speed.md, "Each search at its fastest run"): fast's batch-1 p50 91-94 ->
            # 77-78 ms, batch 64 +2-10%, the paper configuration +10-20%. Once, in place.
            bundle.generator.to(memory_format=torch.channels_last)
        # Captured batch sizes: powers of two up to the batch limit, and the limit itself.
        self.buckets = sorted({min(2 ** k, limits.max_batch_size)
                               for k in range(max(limits.max_batch_size - 1, 1).bit_length() + 1)})
        # The generator is shared; torch modules are not re-entrant across threads for autograd
        # bookkeeping, so batches run one at a time (the batcher sends one at a time anyway).
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir, device: str = "cpu", projection: str = "paper", limits: Limits = Limits(),
             cuda_graphs: str = "auto") -> "Engine":
        default = preset(projection)  # an unknown name fails before the weights load
        bundle = checkpoint.load_bundle(model_dir, device)
        return cls(bundle, device, default, limits, cuda_graphs)

    def bucket(self, n: int) -> int:
        """The captured batch size a batch of n runs at: the next power of two, capped."""
        return next((b for b in self.buckets if b >= n), n)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.bundle.image_shape

    @property
    def threshold(self) -> float | None:
        t = self.bundle.threshold
        return None if t is None else float(t)

    @property
    def threshold_settings_differ(self) -> list[str]:
        """The search settings in which this server's default projection differs from the one
        the card's threshold was calibrated with (``purifier calibrate --projection``); [] when
        they agree or the card has no threshold. A threshold measured under another search flags
        clean traffic at another rate (e.g. fewer steps leave larger errors)."""
        det = self.bundle.card.get("detection") or {}
        if det.get("threshold") is None or not det.get("projection"):
            return []
        return projection.settings_differ(det["projection"], self.default)

    def config(self, steps: int | None = None, restarts: int | None = None,
               seed: int | None = None) -> projection.ProjectionConfig:
        """The server default with a request's overrides, within the server's caps."""
        problems = []
        if steps is not None and steps > self.limits.max_steps:
            problems.append(f"steps {steps} is above this server's limit of {self.limits.max_steps}")
        if restarts is not None and restarts > self.limits.max_restarts:
            problems.append(f"restarts {restarts} is above this server's limit of {self.limits.max_restarts}")
        if restarts is not None and restarts < 1:
            problems.append(f"restarts must be at least 1, got {restarts}")
        if steps is not None and steps < 0:
            problems.append(f"steps must be >= 0, got {steps}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            problems.append(f"seed must be in 0..{MAX_SEED} (2^64 - 1), got {seed}")
        if problems:
            raise InvalidInputError("; ".join(problems))
        return preset(self.default, steps=steps, restarts=restarts, seed=None if seed is None else int(seed))

    def validate(self, images) -> torch.Tensor:
        """Array or tensor (B, C, H, W), float in [0, 1] or uint8 -> float32 (B, C, H, W) on the CPU."""
        return validation.to_float_images(images, self.image_shape, self.limits.max_batch_size)

    def check_compute(self, cfg: projection.ProjectionConfig, n_images: int) -> None:
        """Refuse a request whose latent-steps (generator passes: images x steps x restarts,
        counting the restarts a pruning drops as it drops them) are above ``Limits.max_compute``
        (before it queues: a request can no longer buy seconds of compute within the caps)."""
        cost = projection.latent_steps(cfg) * n_images
        if cost > self.limits.max_compute:
            raise InvalidInputError(
                f"{n_images} images x ({projection.describe_cost(cfg)}) = {cost} latent-steps is above "
                f"this server's limit of {self.limits.max_compute} per request (max_compute); ask for fewer "
                "steps, restarts or images, or split the batch")

    def project(self, x: torch.Tensor, cfg: projection.ProjectionConfig,
                should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Purify a validated batch; returns (images (B, C, H, W) float32, errors (B,)) as numpy.
        ``should_stop`` (asked between steps, and in eager steps at every generator layer, see
        ``asked_at_every_layer``) abandons the batch with ``projection.Abandoned``; the
        CUDA-graph path (the default configuration only) runs to its end, one launch."""
        with self._lock:
            if should_stop is not None and should_stop():  # its callers left while it waited for the lock
                raise projection.Abandoned("projection not started: nobody waits for it")
            x = x.to(self.device)
            n = x.shape[0]
            if self.graphs and cfg.with_(seed=None) == self.default.with_(seed=None):
                b = self.bucket(n)
                if b > n:  # pad with copies of the last image; their answers are dropped
                    x = torch.cat([x, x[-1:].expand(b - n, *x.shape[1:])])
                cfg = self._graph_cfg.with_(seed=cfg.seed)
            stop = None if cfg.cuda_graph else should_stop
            with asked_at_every_layer(self.bundle.generator, None if cfg.compile else stop):
                p = projection.project(self.bundle.generator, x, cfg, self.bundle.encoder, stop)
            return p.images[:n].detach().cpu().numpy(), p.errors[:n].detach().cpu().numpy()

    def flags(self, errors: np.ndarray) -> np.ndarray:
        """(B,) bool: error above the calibrated threshold (all False when none is calibrated)."""
        if self.threshold is None:
            return np.zeros(len(errors), dtype=bool)
        return np.asarray(errors) > self.threshold

    def warm_up(self) -> None:
        """One tiny batch through every code path, so the first request pays no start-up cost."""
        x = torch.full((1, *self.image_shape), 0.5)
        self.project(x, self.default.with_(steps=2, seed=0))
        if self.graphs:  # capture every bucket's graph now, not on a user's request
            for b in self.buckets:
                self.project(torch.full((b, *self.image_shape), 0.5), self.default)
