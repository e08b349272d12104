"""WGAN-GP training of the Defense-GAN generator: resumable, and graph-captured on CUDA.

The recipe is the original's: gradient penalty 10, ``n_critic`` critic steps per generator
step, Adam(1e-4, betas 0.5/0.9), z ~ N(0, I). Optional addition, recorded in the card: an
exponential moving average (EMA) of G's weights with warm-up.

One generator iteration is :meth:`WGANGP.step` = :meth:`WGANGP.draw` (all of the
iteration's random numbers: batch indices, latents, interpolation weights) followed by
:meth:`WGANGP.update` (the ``n_critic`` critic updates with the gradient penalty, which is a
double backward, the generator update and the EMA update). The same code runs two ways:

- eager (the CPU path, and the reference);
- on CUDA, captured once as a CUDA graph and replayed (``cuda_graph``). At batch 64 the
  eager loop is launch-bound (~35 iterations/s on an H200: thousands of tiny kernels, each
  waiting on Python). In the graph the training set lives on the GPU, batches and latents
  are drawn there from a generator registered with the graph, Adam is ``capturable``, the
  EMA decay is computed on the device, and the host syncs only every ``log_every``
  iterations. ``torch.compile`` cannot take the penalty's double backward; plain stream
  capture of the eager step can. :func:`check_graph` replays the captured update against
  the eager one on identical random inputs before anything long is trained.

:func:`train_many` trains several data sets in one process, each on its own CUDA stream,
so their small kernels share the GPU. Checkpoints (G, EMA, critic, both optimisers, RNG,
iteration, history) are written in parts under 16 MiB (:mod:`purifier.parts`), so they fit
what a lent machine can return; ``--resume`` reassembles them. Generators at chosen
iterations (``snapshot_at``) are kept for the robustness-vs-training study.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, data
from . import parts
from ..errors import DataError
from ..hardware import summary as hardware
from ..models import gan_pair


@dataclass
class GANTrainConfig:
    dataset: str = "fashion-mnist"  # a name or a path: anything purifier.data.load takes
    data_dir: str | None = None
    image_size: int | None = None   # resize rule of purifier.data (shorter side, centre crop)
    run_dir: str = "runs/gan-fashion-mnist"
    out_dir: str | None = None  # model directory to export the generator to
    iterations: int = 20000     # generator steps
    batch_size: int = 64
    n_critic: int = 5
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    gp_weight: float = 10.0
    # Spectral normalisation on the critic (Miyato et al. 2018). With gp_weight 0 it replaces the
    # penalty (no double backward: ~5x cheaper per iteration at one critic step on a CPU); an
    # experiment of issue 9, judged by the robustness of what it trains (docs/results.md).
    spectral_norm: bool = False
    latent_dim: int = 128
    dim: int = 64
    ema: float = 0.999          # 0 disables the EMA of G
    seed: int = 0
    checkpoint_every: int = 200
    sample_every: int = 1000
    device: str = "cpu"
    cuda_graph: str = "auto"    # auto: capture on CUDA, fall back to eager if capture fails; on; off
    log_every: int = 100        # history interval; in graph mode also the host-sync interval
    snapshot_at: tuple[int, ...] = field(default_factory=tuple)  # keep G and EMA at these iterations
    part_mib: float = 15.0      # checkpoint part size
    select_images: int = 200    # training images on which G and its EMA are compared at export
    select_by: str = "reconstruction"  # or "transfer" / "defense": purified accuracy (purifier.training.selection)
    warm_start: str | None = None  # model dir (generator + critic + card) to continue from without a checkpoint

    def __post_init__(self):
        from ..errors import ConfigError

        if not self.gp_weight >= 0:
            raise ConfigError(f"gp_weight must be >= 0, got {self.gp_weight}")
        if self.warm_start and self.spectral_norm:
            raise ConfigError("--warm-start continues a plain critic; a spectrally normalised run continues "
                              "with --resume from its checkpoint")

    def recipe(self) -> str:
        crit = f"{self.n_critic} critic step{'s' if self.n_critic != 1 else ''} per G step"
        sn = "spectral norm on the critic, " if self.spectral_norm else ""
        if self.gp_weight:
            head = f"WGAN-GP (GP {self.gp_weight}" + (", spectral norm on the critic" if sn else "")
        else:
            head = f"WGAN loss ({sn}no GP"
        return (f"{head}, {crit}, Adam {self.lr}, betas {self.beta1}/{self.beta2})"
                + (f"; EMA of G with decay {self.ema} (warm-up min(decay, (1+t)/(10+t)))" if self.ema else "; no EMA"))


# --- the model and its step --------------------------------------------------------------------

def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor) -> torch.Tensor:
    """(||grad_x D(x_hat)|| - 1)^2 at x_hat = alpha*real + (1-alpha)*fake (Gulrajani et al.)."""
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)   # (B, C, H, W)
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1).pow(2).mean()


def spectrally_normalise(critic: nn.Module) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) on every conv and linear layer, in place."""
    from torch.nn.utils.parametrizations import spectral_norm

    for mod in list(critic.modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            spectral_norm(mod)
    return critic


def plain_critic(critic: nn.Module) -> nn.Module:
    """A copy with spectral normalisation folded into the weights (W / sigma(W)), so the exported
    critic is a plain :class:`purifier.models.Critic` whatever the recipe."""
    from torch.nn.utils import parametrize

    out = copy.deepcopy(critic)
    for mod in list(out.modules()):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return out


def _init_adam_state(opt: torch.optim.Adam) -> None:
    """Create Adam's state up front (as its first step would), so a graph capture or a state
    snapshot finds every tensor in place rather than created lazily."""
    for group in opt.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                              else torch.tensor(0.0, dtype=torch.float32))
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class WGANGP:
    """G, its EMA, the critic D, their optimisers, the training images and one iteration's step."""

    def __init__(self, cfg: GANTrainConfig, images: torch.Tensor, device: torch.device):
        self.cfg, self.device = cfg, device
        self.images = images.to(device)                                     # (N, C, H, W) in [0, 1]
        C, H, W = self.images.shape[1:]
        torch.manual_seed(cfg.seed)  # the weights' initialisation
        G, D = gan_pair(C, H, W, cfg.latent_dim, cfg.dim)  # the family member for this shape
        if cfg.spectral_norm:
            spectrally_normalise(D)
        self.G, self.D = G.to(device), D.to(device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema else None
        # capturable: Adam's step count lives on the GPU, so the update needs no host sync.
        kw = dict(capturable=True, foreach=True) if device.type == "cuda" else {}
        self.opt_g = torch.optim.Adam(self.G.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)
        self.opt_d = torch.optim.Adam(self.D.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)
        _init_adam_state(self.opt_g)
        _init_adam_state(self.opt_d)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.fixed_z = torch.randn(64, cfg.latent_dim, generator=self.gen, device=device)
        self.count = torch.zeros((), device=device)   # iterations done; the EMA warm-up reads it
        self.stats = torch.zeros(3, device=device)    # last iteration's critic loss, G loss, penalty
        self.graph: torch.cuda.CUDAGraph | None = None

    # One iteration = draw + update.
    def draw(self) -> tuple[torch.Tensor, ...]:
        c, B, L, N = self.cfg.n_critic, self.cfg.batch_size, self.cfg.latent_dim, len(self.images)
        g, dev = self.gen, self.device
        idx = torch.randint(0, N, (c, B), generator=g, device=dev)          # (c, B) real batches
        z_d = torch.randn(c, B, L, generator=g, device=dev)                 # (c, B, L) critic fakes
        alpha = torch.rand(c, B, 1, 1, 1, generator=g, device=dev)          # (c, B, 1, 1, 1)
        z_g = torch.randn(B, L, generator=g, device=dev)                    # (B, L) generator step
        return idx, z_d, alpha, z_g

    def update(self, idx: torch.Tensor, z_d: torch.Tensor, alpha: torch.Tensor, z_g: torch.Tensor) -> None:
        cfg, G, D = self.cfg, self.G, self.D
        B = cfg.batch_size
        D.requires_grad_(True)
        for k in range(cfg.n_critic):
            real = self.images[idx[k]]                                       # (B, C, H, W)
            with torch.no_grad():
                fake = G(z_d[k])
            # without a penalty, alpha is drawn all the same: one random stream whatever the recipe
            gp = (gradient_penalty(D, real, fake, alpha[k]) if cfg.gp_weight
                  else torch.zeros((), device=real.device))
            scores = D(torch.cat([real, fake]))                              # (2B,) one pass for both
            d_loss = scores[B:].mean() - scores[:B].mean() + cfg.gp_weight * gp
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        D.requires_grad_(False)
        g_loss = -D(G(z_g)).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        if self.G_ema is not None:
            # Warm-up: decay grows to cfg.ema, so the average does not drag in the random
            # initial weights. A device tensor, so the graph replays it with the right count.
            decay = torch.clamp((1 + self.count) / (10 + self.count), max=cfg.ema)
            with torch.no_grad():
                for pe, p in zip(self.G_ema.parameters(), G.parameters()):
                    pe.lerp_(p, 1 - decay)
        self.count += 1
        self.stats.copy_(torch.stack([d_loss.detach(), g_loss.detach(), gp.detach()]))

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.update(*self.draw())

    # State: what a checkpoint holds, and what a capture must leave untouched.
    def state_tensors(self) -> list[torch.Tensor]:
        ts = [*self.G.state_dict().values(), *self.D.state_dict().values(), self.count, self.stats]
        if self.G_ema is not None:
            ts += list(self.G_ema.state_dict().values())
        for opt in (self.opt_g, self.opt_d):
            for st in opt.state.values():
                ts += [st["step"], st["exp_avg"], st["exp_avg_sq"]]
        return ts

    def state_dict(self) -> dict:
        try:
            rng = self.gen.get_state()
        except RuntimeError:  # a graph-registered CUDA generator may not expose its state
            rng = None
        s = {"G": self.G.state_dict(), "D": self.D.state_dict(), "opt_g": self.opt_g.state_dict(),
             "opt_d": self.opt_d.state_dict(), "count": self.count, "ema_warmup": 1}
        if rng is not None:
            s["rng"] = rng
        if self.G_ema is not None:
            s["G_ema"] = self.G_ema.state_dict()
        return s

    def load_state_dict(self, s: dict, iteration: int) -> None:
        """Load in place (tensors keep their storage, so a captured graph stays valid)."""
        self.G.load_state_dict(s["G"])
        self.D.load_state_dict(s["D"])
        for opt, key in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            saved = s[key]["state"]
            for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
                for name in ("step", "exp_avg", "exp_avg_sq"):
                    opt.state[p][name].copy_(saved[i][name])
        self.count.fill_(float(s.get("count", iteration)))
        if self.G_ema is not None:
            if "G_ema" in s and "ema_warmup" in s:
                self.G_ema.load_state_dict(s["G_ema"])
            else:  # no EMA yet, or one made without warm-up: start it from G
                self.G_ema.load_state_dict(self.G.state_dict())
        try:  # RNG states are CPU byte tensors, wherever loaded
            self.gen.set_state(s["rng"].cpu())
        except (KeyError, RuntimeError):  # not saved, or from another device type (a CUDA run
            # resumed on the CPU): a fresh, still deterministic stream
            self.gen.manual_seed(self.cfg.seed + 1_000_003 * iteration)

    # CUDA graph.
    def capture(self, warmup: int = 3, inputs: tuple[torch.Tensor, ...] | None = None) -> None:
        """Capture one iteration as a CUDA graph; the model's state is left as it was.

        ``inputs`` (static tensors shaped like :meth:`draw`'s) captures :meth:`update` alone
        on them, for :func:`check_graph`; by default the graph draws its own random numbers.
        """
        before = [t.clone() for t in self.state_tensors()]
        body = (lambda: self.update(*inputs)) if inputs is not None else (lambda: self.update(*self.draw()))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: cuDNN autotuning and allocator, outside the graph
            for _ in range(warmup):
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.gen)
        with torch.cuda.graph(graph):
            body()
        torch.cuda.synchronize(self.device)
        with torch.no_grad():
            for t, v in zip(self.state_tensors(), before):
                t.copy_(v)
        self.graph = graph


def check_graph(cfg: GANTrainConfig, images: torch.Tensor, device: torch.device,
                iterations: int = 10) -> dict:
    """Run ``iterations`` eager updates and the same number of graph replays from the same
    seed on identical random inputs (fp32, deterministic cuDNN, no TF32); compare weights.

    ``ok`` when every weight's difference between the two is within 1% of how far eager
    training moved it (and 1e-5 absolute), i.e. the graph trains the same model.
    """
    flags = (torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager, graphed = WGANGP(cfg, images, device), WGANGP(cfg, images, device)
        start = [p.detach().clone() for p in _weights(eager)]
        draws = [eager.draw() for _ in range(iterations)]
        static = tuple(t.clone() for t in draws[0])
        graphed.capture(inputs=static)
        for r in draws:
            eager.update(*r)
            for s, v in zip(static, r):
                s.copy_(v)
            graphed.graph.replay()
        torch.cuda.synchronize(device)
        worst_rel, worst_abs = 0.0, 0.0
        for p0, pe, pg in zip(start, _weights(eager), _weights(graphed)):
            moved = float((pe - p0).norm())
            diff = float((pe - pg).norm())
            worst_abs = max(worst_abs, float((pe - pg).abs().max()))
            worst_rel = max(worst_rel, diff / max(moved, 1e-12))
        return {"ok": worst_rel <= 0.01 or worst_abs <= 1e-5, "iterations": iterations,
                "max_abs_diff": worst_abs, "max_diff_over_movement": worst_rel}
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = flags


def _weights(m: WGANGP) -> list[torch.Tensor]:
    out = [*m.G.parameters(), *m.D.parameters()]
    return out + (list(m.G_ema.parameters()) if m.G_ema is not None else [])


# --- a training run: data, resume, checkpoints, samples, snapshots -----------------------------

def training_images(cfg: GANTrainConfig) -> torch.Tensor:
    """The run's training images, (N, C, H, W) in [0, 1], checked against what the
    generator family can draw."""
    split = data.load(cfg.dataset, "train", cfg.data_dir, image_size=cfg.image_size)
    _, H, W = split.image_shape
    if H % 4 or W % 4:
        raise DataError(f"{split.source}: images are {W}x{H} pixels; the generator needs a width and height "
                        f"divisible by 4 (28, 32, 64 ...): pass --image-size 32 or 64")
    return split.images



class Run:
    """One data set's training run and its bookkeeping (files under ``cfg.run_dir``)."""

    def __init__(self, cfg: GANTrainConfig, resume: bool):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.train_images = training_images(cfg)                                 # (N, C, H, W)
        self.model = WGANGP(cfg, self.train_images, self.device)
        self.it, self.wall = 0, 0.0
        self.history: list[dict] = []
        self.segments: list[dict] = []  # one per invocation: settings may change on --resume
        self.mode = "eager"
        self.stream = None
        if resume:
            self.resume()
        if self.it == 0 and cfg.warm_start:
            self.warm_start(Path(cfg.warm_start))

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoint"

    def resume(self) -> None:
        legacy = self.dir / "checkpoint.pt"
        if parts.exists(self.ckpt_dir):
            state = parts.load(self.ckpt_dir, map_location=self.device)
        elif legacy.exists():
            state = torch.load(legacy, map_location=self.device, weights_only=True)
        else:
            return
        self.it, self.wall = int(state["iteration"]), float(state["wall_seconds"])
        saved = json.loads(state["config"]) if "config" in state else {}
        if bool(saved.get("spectral_norm", False)) != self.cfg.spectral_norm:
            from ..errors import ConfigError
            raise ConfigError(f"{self.ckpt_dir} was trained {'with' if saved.get('spectral_norm') else 'without'} "
                              f"--spectral-norm; resume it the same way (its critic's weights are stored "
                              f"{'as spectral-norm parametrisations' if saved.get('spectral_norm') else 'plain'})")
        try:
            self.model.load_state_dict(state, self.it)
        except RuntimeError as exc:  # a size mismatch: the data changed under the run
            shape = "x".join(map(str, self.train_images.shape[1:]))
            raise DataError(f"{self.ckpt_dir} holds a generator for other images than {self.cfg.dataset} "
                            f"({shape}): use another --run-dir, or the data it was trained on") from exc
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"].cpu())
        self.history = json.loads(state["history"])
        if "segments" in state:
            self.segments = json.loads(state["segments"])
        else:  # checkpoints written before segments were recorded: one segment from 0
            old = json.loads(state["config"])
            self.segments = [{"from_iteration": 0, **{k: old[k] for k in
                              ("batch_size", "n_critic", "lr", "gp_weight", "ema", "device")}}]
        print(f"{self.cfg.dataset}: resumed {self.dir} at iteration {self.it}", flush=True)

    def warm_start(self, model_dir: Path) -> None:
        """Continue from an exported model (its generator and critic) when no checkpoint exists.

        Not an exact resume: G and its EMA both start from the shipped generator, Adam starts
        afresh (with betas 0.5/0.9 its moments forget within ~10 steps) and the RNG stream is
        new; the iteration count, segments and loss history continue from the card.
        """
        train = checkpoint.read_card(model_dir).get("generator", {}).get("training", {})
        G = checkpoint.load_module(model_dir / "generator.safetensors", "generator", self.device)
        D = checkpoint.load_module(model_dir / "critic.safetensors", "critic", self.device)
        m = self.model
        if G.config != m.G.config or D.config != m.D.config:
            want = "x".join(map(str, G.image_shape.as_tuple()))
            have = "x".join(map(str, self.train_images.shape[1:]))
            raise DataError(f"--warm-start {model_dir}: its generator draws {want} images ({G.config}), "
                            f"{self.cfg.dataset} has {have} images ({m.G.config}); warm-start from a model "
                            f"trained on images of this shape, or drop --warm-start")
        m.G.load_state_dict(G.state_dict())
        m.D.load_state_dict(D.state_dict())
        if m.G_ema is not None:
            m.G_ema.load_state_dict(G.state_dict())
        self.it, self.wall = int(train.get("iterations", 0)), float(train.get("wall_seconds", 0.0))
        m.count.fill_(float(self.it))
        m.gen.manual_seed(self.cfg.seed + 1_000_003 * self.it)
        self.segments = list(train.get("segments", []))
        self.history = [train["last_losses"]] if train.get("last_losses") else []
        print(f"{self.cfg.dataset}: warm start from {model_dir} at iteration {self.it}", flush=True)

    def prepare(self) -> None:
        """Choose eager or graph replay for this invocation and record the segment."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True          # fixed shapes: autotune once
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            self.stream = torch.cuda.Stream(self.device)
            if cfg.cuda_graph in ("auto", "on"):
                try:
                    with torch.cuda.stream(self.stream):
                        self.model.capture()
                    self.mode = "cuda_graph"
                except Exception as exc:  # noqa: BLE001 - auto falls back to the eager step
                    if cfg.cuda_graph == "on":
                        raise
                    print(f"{cfg.dataset}: CUDA graph capture failed ({exc!r}); training eagerly", flush=True)
                    self.model.graph = None
        self.segments.append({"from_iteration": self.it, "batch_size": cfg.batch_size, "n_critic": cfg.n_critic,
                              "lr": cfg.lr, "gp_weight": cfg.gp_weight, "ema": cfg.ema, "device": cfg.device,
                              **({"spectral_norm": True} if cfg.spectral_norm else {}),
                              "hardware": hardware(cfg.device), "mode": self.mode,
                              "threads": torch.get_num_threads()})

    @property
    def chunk(self) -> int:
        """Iterations between host syncs: every iteration eagerly, ``log_every`` in a graph."""
        return self.cfg.log_every if self.mode == "cuda_graph" else 1

    def advance(self) -> int:
        """Queue iterations up to the next chunk boundary (asynchronously on CUDA)."""
        n = min(self.chunk - self.it % self.chunk, self.cfg.iterations - self.it)
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            for _ in range(n):
                self.model.step()
        return n

    def book(self, n: int, seconds: float) -> None:
        """After ``n`` iterations that took ``seconds``: history, samples, snapshots, checkpoint."""
        if self.stream is not None:
            self.stream.synchronize()
        prev, self.it = self.it, self.it + n
        self.wall += seconds
        cfg = self.cfg

        def crossed(every: int) -> bool:
            return every > 0 and prev // every != self.it // every

        if crossed(cfg.log_every) or self.it == cfg.iterations:
            d, g, gp = (round(v, 5) for v in self.model.stats.tolist())
            self.history.append({"iteration": self.it, "d_loss": d, "g_loss": g, "gp": gp,
                                 "wall_seconds": round(self.wall, 1)})
        if crossed(cfg.sample_every) or self.it == cfg.iterations:
            self.sample()
        for s in cfg.snapshot_at:
            if prev < s <= self.it:
                self.snapshot()
        if crossed(cfg.checkpoint_every) or self.it == cfg.iterations:
            self.save()

    def sample(self) -> None:
        with torch.no_grad():
            _save_grid((self.model.G_ema or self.model.G)(self.model.fixed_z),
                       self.dir / "samples" / f"iter{self.it:06d}.png")

    def snapshot(self) -> None:
        out = self.dir / "snapshots"
        checkpoint.save_module(self.model.G, out / f"iter{self.it:06d}-G.safetensors", "generator")
        if self.model.G_ema is not None:
            checkpoint.save_module(self.model.G_ema, out / f"iter{self.it:06d}-G_ema.safetensors", "generator")

    def save(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        state = self.model.state_dict()
        state.update({"torch_rng": torch.get_rng_state(), "iteration": self.it, "wall_seconds": self.wall,
                      "config": json.dumps(asdict(self.cfg)), "history": json.dumps(self.history),
                      "segments": json.dumps(self.segments)})
        parts.save(state, self.ckpt_dir, int(self.cfg.part_mib * 2**20))

    def summary(self) -> dict:
        return {"dataset": self.cfg.dataset, "iterations": self.it, "wall_seconds": round(self.wall, 1),
                "finished": self.it >= self.cfg.iterations, "segments": self.segments,
                "last_losses": self.history[-1] if self.history else None}


def _save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow, padding=2)


# --- the training loop ----------------------------------------------------------------------------

def train(cfg: GANTrainConfig, resume: bool = False, progress: bool = True,
          max_seconds: float | None = None, export_only: bool = False) -> dict:
    """Train one generator (or, with ``export_only``, export its last checkpoint); a summary."""
    return train_many([cfg], resume, progress, max_seconds, export_only)[0]


def train_many(cfgs: list[GANTrainConfig], resume: bool = False, progress: bool = True,
               max_seconds: float | None = None, export_only: bool = False) -> list[dict]:
    """Train several generators at once (one CUDA stream each), round-robin, until each
    reaches its ``iterations`` or ``max_seconds`` pass; checkpoint, then export each."""
    runs = [Run(cfg, resume or export_only) for cfg in cfgs]
    stopped_by = None
    if not export_only:
        for r in runs:
            r.prepare()
            print(f"{r.cfg.dataset}: training from iteration {r.it} ({r.mode})", flush=True)
        stopped_by = _loop(runs, progress, max_seconds)
    summaries = []
    for r in runs:
        summary = r.summary()
        if stopped_by:
            summary["stopped_by"] = stopped_by
        if r.cfg.out_dir and stopped_by in (None, "time limit"):  # a signal wants us gone: no export
            if r.cfg.select_by in ("transfer", "defense") and r.model.G_ema is not None:
                from . import selection as sel

                cands = {"G": r.model.G, "G_ema": r.model.G_ema}
                name, selection = sel.choose({k: copy.deepcopy(v) for k, v in cands.items()}, r.cfg.out_dir,
                                             r.cfg.dataset, r.cfg.data_dir, r.cfg.select_images, seed=r.cfg.seed,
                                             device=r.device, image_size=r.cfg.image_size,
                                             by=r.cfg.select_by)
                chosen = cands[name]
            else:
                chosen, selection = choose_generator(r.model.G, r.model.G_ema, r.train_images, r.device,
                                                     r.cfg.seed, r.cfg.select_images)
            summary["export_selection"] = selection
            export(r.cfg, chosen, r.model.D, summary)
        summaries.append(summary)
    return summaries


class _StopOnSignal:
    """SIGTERM or SIGINT (Ctrl-C, a preempted pod, `timeout`) asks the loop to finish the
    iteration, checkpoint and stop, so a long run loses nothing; a second signal stops at once.
    Only the main thread may install handlers; elsewhere (a notebook's worker) this does nothing."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a checkpoint")
        self.name = signal.Signals(signum).name
        print(f"{self.name}: checkpointing after this iteration (send it again to stop at once)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _rate(n: int, seconds: float) -> str:
    r = n / max(seconds, 1e-9)
    return f"{r:.0f}" if r >= 10 else f"{r:.2f}"  # a CPU trains ~1.5 it/s: "1" or "2" said nothing


def _loop(runs: list[Run], progress: bool, max_seconds: float | None) -> str | None:
    """Train until every run is done (None), ``max_seconds`` pass ("time limit") or a signal
    arrives ("SIGTERM"/"SIGINT"); in the last two cases checkpoint first."""
    with _StopOnSignal() as stop:
        return _train_until(runs, progress, max_seconds, stop)


def _train_until(runs: list[Run], progress: bool, max_seconds: float | None, stop: _StopOnSignal) -> str | None:
    bars = {}
    if progress:
        from tqdm import tqdm
        bars = {id(r): tqdm(total=r.cfg.iterations, initial=r.it, desc=f"wgan-gp {r.cfg.dataset}", unit="it")
                for r in runs}
    t_start = time.time()
    last_report = t_start
    active = [r for r in runs if r.it < r.cfg.iterations]
    report_from = {id(r): r.it for r in runs}
    reason = None
    while active:
        t0 = time.time()
        done = [(r, r.advance()) for r in active]   # all runs' work queued before any sync
        for r, n in done:
            r.book(n, time.time() - t0)
            if id(r) in bars:
                bars[id(r)].update(n)
        now = time.time()
        if not progress and now - last_report > 30:  # a line every 30 s for logs
            rates = ", ".join(f"{r.cfg.dataset} {r.it} ({_rate(r.it - report_from[id(r)], now - last_report)} it/s)"
                              for r in runs)
            print(f"[{now - t_start:.0f}s] {rates}", flush=True)
            report_from, last_report = {id(r): r.it for r in runs}, now
        active = [r for r in active if r.it < r.cfg.iterations]
        reason = stop.name or ("time limit" if max_seconds is not None and now - t_start > max_seconds else None)
        if active and reason:
            for r in active:
                r.save()
                r.sample()
                why = stop.name or f"after {max_seconds:.0f}s"
                print(f"{r.cfg.dataset}: stopping ({why}) at iteration {r.it}; checkpoint saved, "
                      f"--resume continues", flush=True)
            break
    for b in bars.values():
        b.close()
    return reason if active else None


# --- export --------------------------------------------------------------------------------------

def choose_generator(G: nn.Module, G_ema: nn.Module | None, images: torch.Tensor,
                     device: torch.device, seed: int, n: int = 200) -> tuple[nn.Module, dict]:
    """Export whichever of G and its EMA projects training images better.

    After a short run the EMA can lag behind G; rather than guess, measure the mean
    reconstruction error of a short projection (L=100, R=4, fixed seed) on ``n`` images.
    """
    from ..projection import preset, project

    if G_ema is None:
        return G, {"exported": "G"}
    x = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]].to(device)
    cfg = preset("paper", steps=100, restarts=4, seed=seed)
    scores = {}
    for name, g in (("G", G), ("G_ema", G_ema)):
        g.eval()
        for p in g.parameters():
            p.requires_grad_(False)
        scores[name] = round(float(project(g, x, cfg).errors.mean()), 6)
    best = min(scores, key=scores.get)
    return (G if best == "G" else G_ema), {
        "exported": best, "mean_reconstruction_error": scores,
        "measured_on": f"{n} training images, projection L=100 R=4 seed {seed}"}


def export(cfg: GANTrainConfig, G: nn.Module, D: nn.Module, summary: dict) -> None:
    out = Path(cfg.out_dir)
    checkpoint.save_module(G, out / "generator.safetensors", "generator")
    checkpoint.save_module(plain_critic(D), out / "critic.safetensors", "critic")  # lets --warm-start continue
    modes = sorted({s.get("mode", "eager") for s in summary["segments"]})
    checkpoint.update_card(out, dataset=cfg.dataset, **data.card_fields(cfg.image_size), generator={
        "file": "generator.safetensors",
        "architecture": G.config,
        "training": {
            "command": (f"purifier train-gan {data.flags(cfg.dataset, cfg.image_size)} "
                        f"--iterations {summary['iterations']} "
                        f"--batch-size {cfg.batch_size} --n-critic {cfg.n_critic} --ema {cfg.ema} "
                        + ("--spectral-norm " if cfg.spectral_norm else "")
                        + (f"--gp-weight {cfg.gp_weight} " if cfg.gp_weight != GANTrainConfig.gp_weight else "")
                        + (f"--lr {cfg.lr} " if cfg.lr != GANTrainConfig.lr else "")
                        + (f"--beta1 {cfg.beta1} " if cfg.beta1 != GANTrainConfig.beta1 else "")
                        + (f"--beta2 {cfg.beta2} " if cfg.beta2 != GANTrainConfig.beta2 else "")
                        + f"--seed {cfg.seed} --run-dir {cfg.run_dir} --out {cfg.out_dir} --resume"),
            "settings": asdict(cfg),
            "iterations": summary["iterations"],
            "segments": summary["segments"],
            "step": modes,
            "last_losses": summary["last_losses"],
            "wall_seconds": summary["wall_seconds"],
            "hardware": ", ".join(sorted({s["hardware"] for s in summary["segments"] if s.get("hardware")}))
                        or hardware(cfg.device),
            "recipe": cfg.recipe(),
            "export_selection": summary.get("export_selection"),
            "critic": "critic.safetensors (the critic at the last iteration; `--warm-start` continues from it)",
        },
    })
