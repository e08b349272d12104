"""Benchmark the projection: speed (images/s, latency percentiles) and quality at that speed
(reconstruction error, clean and FGSM accuracy after purification, paired against the
paper's configuration).

Every configuration is measured in the same process, one after another, so ratios hold on a
noisy machine. Quality runs on the same seeded test images for every configuration, and
the differences are *paired*: per image, fast minus paper, with a 95% interval.

Purified results can be cached in a folder (``cache_dir``): one file per (models, images,
condition, configuration), so the expensive paper configuration is computed once and can be
reused by later benches and by the evaluation. A cache file is a ``torch.save`` dict of
tensors (load with ``weights_only=True``): ``indices`` (n,) into the test split, ``images``
(n, C, H, W) purified, ``errors`` (n,), ``seconds`` (wall time of the purification), and
``meta`` (a JSON string of the key).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..evaluation import attacks  # the ART-tested FGSM: bench and `purifier eval` attack alike
from ..errors import ConfigError
from ..hardware import describe
from ..projection import PAPER, ProjectionConfig, preset, project
from ..stats import paired


def parse_config(spec: str) -> tuple[str, ProjectionConfig]:
    """``NAME`` (a preset) or ``NAME=BASE[:key=value,...]``, e.g.
    ``fast-bf16=fast:precision=bf16`` or ``adam100=paper:optimizer=adam,lr=0.05,steps=100``."""
    name, _, rest = spec.partition("=")
    base_name, _, changes = (rest or name).partition(":")
    fields = {f: type(v) for f, v in asdict(PAPER).items()}
    kw = {}
    for item in filter(None, changes.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise ConfigError(f"unknown projection setting {key!r} in {spec!r}; settings: {sorted(fields)}")
        if key in ("init_std", "seed"):
            kw[key] = None if value == "none" else (float(value) if key == "init_std" else int(value))
        elif key in ("compile", "channels_last", "cuda_graph"):
            kw[key] = value.lower() in ("1", "true", "yes")
        elif key in ("optimizer", "precision"):
            kw[key] = value
        else:
            kw[key] = fields[key](float(value)) if fields[key] is int else fields[key](value)
    return name, preset(base_name, **kw)


# --- environment ---------------------------------------------------------------------------

def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(describe(device), purifier_commit=commit)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- speed ---------------------------------------------------------------------------------

def time_config(generator, encoder, images: torch.Tensor, cfg: ProjectionConfig, batch_size: int,
                repeats: int = 1, warmup: int = 1) -> dict:
    """Throughput over all ``images`` in batches of ``batch_size`` and the per-batch latency
    percentiles. ``warmup`` batches first (not timed: compilation, allocator, caches)."""
    device = images.device
    n = len(images)
    for i in range(warmup):
        project(generator, images[:batch_size], cfg.with_(seed=None), encoder)
    _sync(device)
    latencies = []
    t_all = time.perf_counter()
    for _ in range(repeats):
        for s in range(0, n, batch_size):
            t0 = time.perf_counter()
            project(generator, images[s: s + batch_size], cfg, encoder)
            _sync(device)
            latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    lat = torch.tensor(latencies, dtype=torch.float64)

    def pct(q):
        return round(1e3 * float(torch.quantile(lat, q)), 2)
    return dict(batch_size=batch_size, images=n * repeats, seconds=round(total, 3),
                images_per_s=round(n * repeats / total, 3),
                latency_ms=dict(p50=pct(0.5), p90=pct(0.9), p99=pct(0.99), mean=round(1e3 * float(lat.mean()), 2)),
                calls=len(latencies))


def latent_steps_per_image(generator, encoder, images, cfg: ProjectionConfig) -> float:
    """Mean generator forward+backward passes per image that ``cfg`` spends (counted, not timed)."""
    count = [0]
    hook = generator.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + o.shape[0])
                                           if torch.is_grad_enabled() else None)
    try:
        project(generator, images, cfg.with_(compile=False, cuda_graph=False), encoder)
    finally:
        hook.remove()
    return count[0] / len(images)


# --- quality -------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike | None) -> str | None:
    if path is None or not Path(path).exists():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def purify_cached(generator, encoder, x: torch.Tensor, cfg: ProjectionConfig, batch_size: int,
                  key: dict, cache_dir: str | os.PathLike | None, seed: int = 0) -> dict:
    """Purify ``x`` with ``cfg`` (seeded per batch: ``seed + batch index``), or load the
    result from ``cache_dir`` when the same key was computed before."""
    key = dict(key, projection=asdict(cfg.with_(compile=False, cuda_graph=False)), seed=seed, batch_size=batch_size)
    if not cfg.encoder_starts:
        key.pop("encoder", None)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{digest}.pt" if cache_dir else None
    if path is not None and path.exists():
        hit = torch.load(path, map_location=x.device, weights_only=True)
        return dict(images=hit["images"], errors=hit["errors"], seconds=float(hit["seconds"]), cached=True)
    images, errors = [], []
    _sync(x.device)
    t0 = time.perf_counter()
    for b, s in enumerate(range(0, len(x), batch_size)):
        p = project(generator, x[s: s + batch_size], cfg.with_(seed=seed + b), encoder)
        images.append(p.images)
        errors.append(p.errors)
    _sync(x.device)
    seconds = time.perf_counter() - t0
    out = dict(images=torch.cat(images), errors=torch.cat(errors), seconds=seconds, cached=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(dict(indices=torch.tensor(key["indices"]), images=out["images"].cpu(),
                        errors=out["errors"].cpu(), seconds=torch.tensor(seconds),
                        meta=json.dumps(key)), tmp)
        os.replace(tmp, path)
    return out


@torch.no_grad()
def _predict(classifier, x, batch=500):
    return torch.cat([classifier(x[s: s + batch]).argmax(1) for s in range(0, len(x), batch)])


# --- the whole bench -----------------------------------------------------------------------

@dataclass
class BenchSettings:
    configs: list[tuple[str, ProjectionConfig]]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    speed_images: int = 64          # images per throughput measurement
    quality_images: int = 0         # 0: speed only
    quality_batch: int = 100
    eps: float = 0.3
    conditions: tuple[str, ...] = ("clean", "fgsm")
    seed: int = 0                   # which test images, and the projection seeds
    cache_dir: str | None = None


def run_bench(bundle, test_split, settings: BenchSettings, device: str, dataset: str = "?",
              log=print) -> dict:
    """``bundle``: a loaded :class:`purifier.checkpoint.ModelBundle` (generator, classifier,
    encoder). ``test_split``: :class:`purifier.data.Split`. The first config is the reference
    (normally ``paper``) for ratios and paired differences."""
    from .. import data

    dev = torch.device(device)
    G, clf, E = bundle.generator, bundle.classifier, bundle.encoder
    ref_name = settings.configs[0][0]
    result = dict(dataset=dataset, environment=environment(device),
                  settings=dict(batch_sizes=settings.batch_sizes, speed_images=settings.speed_images,
                                quality_images=settings.quality_images, quality_batch=settings.quality_batch,
                                eps=settings.eps, seed=settings.seed, reference=ref_name,
                                configs={n: asdict(c) for n, c in settings.configs}),
                  speed=[], quality={})

    # Speed: every config at every batch size, one after another.
    if settings.speed_images:
        xs = data.subset(test_split, settings.speed_images, seed=settings.seed + 1).images.to(dev)
        for name, cfg in settings.configs:
            steps = latent_steps_per_image(G, E, xs[: min(len(xs), 64)], cfg.with_(seed=0))
            for bs in settings.batch_sizes:
                n_img = len(xs) if bs > 1 else max(1, min(len(xs), 16 if name == ref_name else 64))
                row = dict(config=name, latent_steps_per_image=round(steps, 1),
                           **time_config(G, E, xs[:n_img], cfg, bs))
                result["speed"].append(row)
                log(f"speed {name} batch {bs}: {row['images_per_s']} images/s, "
                    f"p50 {row['latency_ms']['p50']} ms ({steps:.0f} latent-steps/image)")
        ref = {r["batch_size"]: r["images_per_s"] for r in result["speed"] if r["config"] == ref_name}
        for r in result["speed"]:
            r["speedup_vs_reference"] = round(r["images_per_s"] / ref[r["batch_size"]], 2)

    # Quality: the same seeded test images for every config, clean and attacked.
    if settings.quality_images:
        if clf is None:
            raise ConfigError("the quality part needs a classifier in the model directory")
        sub = data.subset(test_split, settings.quality_images, seed=settings.seed)
        indices = torch.randperm(len(test_split.labels),
                                 generator=torch.Generator().manual_seed(settings.seed))[: len(sub.labels)]
        x, y = sub.images.to(dev), sub.labels.to(dev)
        key = dict(dataset=dataset, n=len(y), subset_seed=settings.seed, indices=indices.tolist(),
                   generator=file_digest(bundle.path / "generator.safetensors"),
                   encoder=file_digest(bundle.path / "encoder.safetensors"))
        for cond in settings.conditions:
            if cond == "clean":
                xin, ckey = x, dict(key, condition="clean")
            elif cond == "fgsm":
                xin = torch.cat([attacks.fgsm(clf, x[s: s + 500], y[s: s + 500], settings.eps)
                                 for s in range(0, len(x), 500)])
                ckey = dict(key, condition=f"fgsm-{settings.eps}",
                            classifier=file_digest(bundle.path / "classifier.safetensors"))
            else:
                raise ConfigError(f"unknown condition {cond!r}; use clean and/or fgsm")
            undefended = (_predict(clf, xin) == y).float()
            per_cfg, rows = {}, {}
            for name, cfg in settings.configs:
                out = purify_cached(G, E, xin, cfg, settings.quality_batch, ckey, settings.cache_dir,
                                    settings.seed)
                correct = (_predict(clf, out["images"]) == y).float()
                per_cfg[name] = (correct, out["errors"].double())
                rows[name] = dict(accuracy=float(correct.mean()), mean_error=float(out["errors"].mean()),
                                  seconds=round(out["seconds"], 1), cached=out["cached"],
                                  images_per_s=round(len(y) / out["seconds"], 3))
                log(f"quality {cond} {name}: accuracy {rows[name]['accuracy']:.4f}, "
                    f"mean error {rows[name]['mean_error']:.5f}, {rows[name]['seconds']} s"
                    + (" (cached)" if out["cached"] else ""))
            ref_correct, ref_err = per_cfg[ref_name]
            for name in rows:
                if name != ref_name:
                    correct, err = per_cfg[name]
                    rows[name]["paired_vs_reference"] = dict(
                        accuracy_diff=paired(correct.double() - ref_correct.double()),
                        error_diff=paired(err - ref_err))
            result["quality"][cond] = dict(undefended_accuracy=float(undefended.mean()), configs=rows)
    return result
