"""WGAN-GP training of the Defense-GAN generator, resumable.

The recipe is the original's: gradient penalty 10, ``n_critic`` critic steps per generator
step, Adam(1e-4, betas 0.5/0.9), z ~ N(0, I). Optional additions, recorded in the card:
an exponential moving average (EMA) of G's weights, which is what gets exported.

Checkpoints (``<run>/checkpoint.pt``: tensors and numbers only, loaded with
``weights_only=True``) are written every ``--checkpoint-every`` iterations and at the
end; ``--resume`` continues from the last one with the same RNG state.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, data
from .models import Critic, Generator


@dataclass
class GANTrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    run_dir: str = "runs/gan-fashion-mnist"
    out_dir: str | None = None  # model directory to export the generator to
    iterations: int = 20000     # generator steps
    batch_size: int = 64
    n_critic: int = 5
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    gp_weight: float = 10.0
    latent_dim: int = 128
    dim: int = 64
    ema: float = 0.999          # 0 disables the EMA of G
    seed: int = 0
    checkpoint_every: int = 200
    sample_every: int = 1000
    device: str = "cpu"


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """(||grad_x D(x_hat)|| - 1)^2 at random points between real and fake (Gulrajani et al.)."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=gen)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)   # (B, C, H, W)
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1).pow(2).mean()


def _save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow, padding=2)


def train(cfg: GANTrainConfig, resume: bool = False, progress: bool = True,
          max_seconds: float | None = None, export_only: bool = False) -> dict:
    """Train (or, with ``export_only``, just export the last checkpoint) and return a summary."""
    device = torch.device(cfg.device)
    if device.type == "cuda":  # fixed shapes: let cuDNN pick its fastest kernels; TF32 for the fc layers
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path = run / "checkpoint.pt"
    torch.manual_seed(cfg.seed)

    train_split = data.load(cfg.dataset, "train", cfg.data_dir)
    images = train_split.images.to(device)                          # (N, C, H, W)
    C, H, W = images.shape[1:]
    G = Generator(cfg.latent_dim, C, H, W, cfg.dim).to(device)
    D = Critic(C, H, W, cfg.dim).to(device)
    G_ema = copy.deepcopy(G).eval() if cfg.ema else None
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    fixed_z = torch.randn(64, cfg.latent_dim, generator=gen, device=device)
    start, wall = 0, 0.0
    history: list[dict] = []
    segments: list[dict] = []  # one entry per run of train(): settings may change on --resume

    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        G.load_state_dict(state["G"]); D.load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_g"]); opt_d.load_state_dict(state["opt_d"])
        if G_ema is not None and "G_ema" in state and "ema_warmup" in state:
            G_ema.load_state_dict(state["G_ema"])
        elif G_ema is not None:  # no EMA yet, or one made without warm-up: start it from G
            G_ema.load_state_dict(G.state_dict())
        gen.set_state(state["rng"].cpu() if device.type == "cpu" else state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start, wall = int(state["iteration"]), float(state["wall_seconds"])
        history = json.loads(state["history"])
        if "segments" in state:
            segments = json.loads(state["segments"])
        else:  # checkpoints written before segments were recorded: one segment from 0
            old = json.loads(state["config"])
            segments = [{"from_iteration": 0, **{k: old[k] for k in
                         ("batch_size", "n_critic", "lr", "gp_weight", "ema", "device")}}]
        print(f"resumed {ckpt_path} at iteration {start}")
    if not export_only:
        segments.append({"from_iteration": start, "batch_size": cfg.batch_size, "n_critic": cfg.n_critic,
                         "lr": cfg.lr, "gp_weight": cfg.gp_weight, "ema": cfg.ema, "device": cfg.device,
                         "threads": torch.get_num_threads()})

    def save(it: int) -> None:
        state = {"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(),
                 "opt_d": opt_d.state_dict(), "rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "iteration": it, "wall_seconds": wall, "config": json.dumps(asdict(cfg)),
                 "history": json.dumps(history), "segments": json.dumps(segments), "ema_warmup": 1}
        if G_ema is not None:
            state["G_ema"] = G_ema.state_dict()
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)  # never leave a half-written checkpoint

    def batch() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen, device=device)
        return images[idx]

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.iterations, initial=start, desc=f"wgan-gp {cfg.dataset}", unit="it")
    t_session = time.time()
    it = start
    d_loss = g_loss = gp = torch.tensor(0.0)
    while it < cfg.iterations and not export_only:
        t0 = time.time()
        for p in D.parameters():
            p.requires_grad_(True)
        for _ in range(cfg.n_critic):
            real = batch()
            with torch.no_grad():
                fake = G(torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen, device=device))
            gp = gradient_penalty(D, real, fake, gen)
            scores = D(torch.cat([real, fake]))                      # (2B,) one pass for both
            d_loss = scores[real.shape[0]:].mean() - scores[: real.shape[0]].mean() + cfg.gp_weight * gp
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        for p in D.parameters():
            p.requires_grad_(False)
        fake = G(torch.randn(cfg.batch_size, cfg.latent_dim, generator=gen, device=device))
        g_loss = -D(fake).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if G_ema is not None:
            # Warm-up (decay grows to cfg.ema) so the average does not drag in the random
            # initial weights when training runs only a few thousand iterations.
            decay = min(cfg.ema, (1 + it) / (10 + it))
            with torch.no_grad():
                for pe, p in zip(G_ema.parameters(), G.parameters()):
                    pe.lerp_(p, 1 - decay)
        it += 1
        wall += time.time() - t0
        if bar is not None:
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix(d=f"{d_loss.item():.3f}", g=f"{g_loss.item():.3f}", gp=f"{gp.item():.3f}")
        if it % 100 == 0:
            history.append({"iteration": it, "d_loss": round(d_loss.item(), 5),
                            "g_loss": round(g_loss.item(), 5), "gp": round(gp.item(), 5),
                            "wall_seconds": round(wall, 1)})
        if it % cfg.sample_every == 0 or it == cfg.iterations:
            with torch.no_grad():
                _save_grid((G_ema or G)(fixed_z), run / "samples" / f"iter{it:06d}.png")
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save(it)
        if max_seconds is not None and time.time() - t_session > max_seconds:
            save(it)
            print(f"stopping after {max_seconds:.0f}s at iteration {it}; --resume continues")
            break
    if bar is not None:
        bar.close()
    summary = {"iterations": it, "wall_seconds": round(wall, 1), "finished": it >= cfg.iterations,
               "segments": segments, "last_losses": history[-1] if history else None}
    if cfg.out_dir:
        chosen, selection = choose_generator(G, G_ema, train_split.images, device, cfg.seed)
        summary["export_selection"] = selection
        export(cfg, chosen, summary)
    return summary


def choose_generator(G: nn.Module, G_ema: nn.Module | None, images: torch.Tensor,
                     device: torch.device, seed: int, n: int = 200) -> tuple[nn.Module, dict]:
    """Export whichever of G and its EMA projects training images better.

    After a short run the EMA can lag behind G; rather than guess, measure the mean
    reconstruction error of a short projection (L=100, R=4, fixed seed) on ``n`` images.
    """
    from .projection import ProjectionConfig, project

    if G_ema is None:
        return G, {"exported": "G"}
    x = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]].to(device)
    cfg = ProjectionConfig(steps=100, restarts=4, seed=seed)
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


def export(cfg: GANTrainConfig, G: nn.Module, summary: dict) -> None:
    out = Path(cfg.out_dir)
    checkpoint.save_module(G, out / "generator.safetensors", "generator")
    checkpoint.update_card(out, dataset=cfg.dataset, generator={
        "file": "generator.safetensors",
        "architecture": G.config,
        "training": {
            "command": (f"purifier train-gan --dataset {cfg.dataset} --iterations {summary['iterations']} "
                        f"--batch-size {cfg.batch_size} --n-critic {cfg.n_critic} --ema {cfg.ema} "
                        f"--seed {cfg.seed} --run-dir {cfg.run_dir} --out {cfg.out_dir} --resume"),
            "settings": asdict(cfg),
            "iterations": summary["iterations"],
            "segments": summary["segments"],
            "last_losses": summary["last_losses"],
            "wall_seconds": summary["wall_seconds"],
            "hardware": hardware(cfg.device),
            "recipe": (f"WGAN-GP (GP {cfg.gp_weight}, {cfg.n_critic} critic steps per G step, "
                       f"Adam {cfg.lr}, betas {cfg.beta1}/{cfg.beta2}); EMA of G with decay "
                       f"{cfg.ema} (warm-up min(decay, (1+t)/(10+t)))" if cfg.ema else "; no EMA"),
            "export_selection": summary.get("export_selection"),
        },
    })


def hardware(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
