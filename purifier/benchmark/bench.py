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
from ..projection import PAPER, ProjectionConfig, preset, project, search_settings, settings_differ, settings_record
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
                repeats: int = 1, warmup: int = 1, max_seconds: float | None = None) -> dict:
    """Throughput over all ``images`` in batches of ``batch_size`` (or the batches that start
    within ``max_seconds``: at least one; a slow configuration needs fewer) and the per-batch latency
    percentiles. ``warmup`` batches first, at the timed shape (not timed: compilation,
    allocator, oneDNN's per-shape kernels); eager configurations warm up on a few steps only,
    since the paper configuration's whole batch of 64 is a minute of CPU that measures nothing."""
    device = images.device
    n = len(images)
    warm = cfg if (cfg.compile or cfg.cuda_graph) else cfg.with_(steps=min(cfg.steps, 20))
    for i in range(warmup):
        project(generator, images[:batch_size], warm.with_(seed=None), encoder)
    _sync(device)
    latencies, done = [], 0
    cpu0 = time.process_time()   # CPU seconds of this process (all its threads): what it got, not waited for
    t_all = time.perf_counter()
    for _ in range(repeats):
        for s in range(0, n, batch_size):
            if max_seconds is not None and latencies and time.perf_counter() - t_all >= max_seconds:
                break
            t0 = time.perf_counter()
            project(generator, images[s: s + batch_size], cfg, encoder)
            _sync(device)
            latencies.append(time.perf_counter() - t0)
            done += len(images[s: s + batch_size])
    total = time.perf_counter() - t_all
    cpu = time.process_time() - cpu0
    lat = torch.tensor(latencies, dtype=torch.float64)

    def pct(q):
        return round(1e3 * float(torch.quantile(lat, q)), 2)
    return dict(batch_size=batch_size, images=done, seconds=round(total, 3),
                images_per_s=round(done / total, 3),
                cpu_seconds=round(cpu, 3), images_per_cpu_s=round(done / cpu, 3) if cpu > 0 else None,
                latency_ms=dict(p50=pct(0.5), p90=pct(0.9), p99=pct(0.99), mean=round(1e3 * float(lat.mean()), 2)),
                calls=len(latencies))


def latent_steps_per_image(generator, encoder, images, cfg: ProjectionConfig) -> float:
    """Mean generator forward+backward passes per image that ``cfg`` spends (counted, not timed)."""
    count = [0]
    hook = generator.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + o.shape[0])
                                           if torch.is_grad_enabled() else None)
    try:
        # channels_last off too: it runs a cached copy of the generator, which would not carry
        # this hook (or would keep a stale one from an earlier count)
        project(generator, images, cfg.with_(compile=False, cuda_graph=False, channels_last=False), encoder)
    finally:
        hook.remove()
    return count[0] / len(images)


def machine_load() -> dict:
    """The 1/5/15-minute load averages and ``uptime``'s line: timings taken on a shared machine
    mean little without them."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        line = None
    return dict(time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                loadavg=[round(v, 2) for v in os.getloadavg()], uptime=line, cpus=os.cpu_count())


def speed_summary(rows: list[dict], reference: str, metric: str = "images_per_s",
                  searches: dict[str, str] | None = None) -> dict:
    """Per round and configuration: the batch-size sweep and its best batch; the speed-up of
    each configuration's best batch over the reference's best batch (best-vs-best: what a user
    choosing between them sees, each run as well as it can) and, beside it, the ratio at each
    batch size both were timed at (same-batch). The headline is the lowest best-vs-best over
    the rounds, so that it survives a rerun; ``spread`` is (max - min) / min over the rounds.
    ``metric``: "images_per_s" (wall clock) or "images_per_cpu_s" (per CPU-second the process
    got: on a shared machine the minutes-long paper measurement and the seconds-long fast one
    see different loads, and CPU time is what is left of the comparison once waiting is out).
    ``searches``: config name -> what it computes (its settings except how it runs: compile,
    channels-last, CUDA graphs, seed). Configurations with the same search are one search run
    different ways, and a user would run each search its fastest way: per round, each config also
    gets ``speedup_best_run_vs_best_run``, its search's fastest (any config of it, any batch)
    against the reference search's fastest."""
    rounds = sorted({r.get("round", 0) for r in rows})
    per_round = []
    for rnd in rounds:
        sweep: dict[str, dict[int, float]] = {}
        for r in rows:
            if r.get("round", 0) == rnd:
                sweep.setdefault(r["config"], {})[r["batch_size"]] = r[metric]
        best = {name: max(sw.items(), key=lambda kv: kv[1]) for name, sw in sweep.items()}
        ref_bs, ref_ips = best[reference]
        configs = {}
        for name, sw in sweep.items():
            bs, ips = best[name]
            configs[name] = dict(
                sweep_images_per_s={str(b): v for b, v in sorted(sw.items())},
                best_batch_size=bs, best_images_per_s=ips,
                speedup_best_vs_best=round(ips / ref_ips, 2),
                speedup_same_batch={str(b): round(v / sweep[reference][b], 2)
                                    for b, v in sorted(sw.items()) if b in sweep[reference]})
        entry = dict(round=rnd, reference_best_batch_size=ref_bs, configs=configs)
        if searches:
            fastest = {}   # search -> (its fastest config, images/s)
            for name, (bs, ips) in best.items():
                k = searches.get(name, name)
                if ips > fastest.get(k, (None, -1.0))[1]:
                    fastest[k] = (name, ips)
            entry["reference_fastest_run"], ref_fast = fastest[searches.get(reference, reference)]
            for name in configs:
                own_name, own = fastest[searches.get(name, name)]
                configs[name]["fastest_run_of_its_search"] = own_name
                configs[name]["speedup_best_run_vs_best_run"] = round(own / ref_fast, 2)
        per_round.append(entry)
    headline = {}
    for name in per_round[0]["configs"]:
        vals = [pr["configs"][name]["speedup_best_vs_best"] for pr in per_round if name in pr["configs"]]
        same = {}
        for pr in per_round:
            for b, v in pr["configs"][name]["speedup_same_batch"].items():
                same.setdefault(b, []).append(v)
        headline[name] = dict(speedup_best_vs_best=min(vals), speedup_best_vs_best_per_round=vals,
                              spread=round((max(vals) - min(vals)) / min(vals), 3) if min(vals) else None,
                              speedup_same_batch={b: min(v) for b, v in same.items()},
                              best_batch_size_per_round=[pr["configs"][name]["best_batch_size"]
                                                         for pr in per_round if name in pr["configs"]])
        if searches:
            runs = [pr["configs"][name]["speedup_best_run_vs_best_run"] for pr in per_round if name in pr["configs"]]
            headline[name].update(speedup_best_run_vs_best_run=min(runs), speedup_best_run_vs_best_run_per_round=runs)
    rule = ("best-vs-best: each configuration at its own fastest batch size, same process and threads; "
            "headline = the lowest over rounds")
    if searches:
        rule += ("; best-run-vs-best-run: each search at its fastest configuration (how it runs: compile, "
                 "channels-last) and batch size against the reference search's fastest")
    return dict(reference=reference, metric=metric, rounds=per_round, headline=headline, rule=rule)


def format_speed_summary(summary: dict) -> str:
    lines = [f"speed summary ({summary.get('metric', 'images_per_s')}, reference {summary['reference']}, "
             f"best batch vs best batch; same batch beside)"]
    for name, h in summary["headline"].items():
        same = ", ".join(f"b{b} {v}x" for b, v in h["speedup_same_batch"].items())
        run = (f"; its search's fastest run vs the reference's: {h['speedup_best_run_vs_best_run']}x"
               if "speedup_best_run_vs_best_run" in h else "")
        lines.append(f"  {name}: best-vs-best {h['speedup_best_vs_best']}x{run} (rounds: "
                     f"{h['speedup_best_vs_best_per_round']}, best batch {h['best_batch_size_per_round']}); "
                     f"same batch: {same}")
    return "\n".join(lines)


# --- quality -------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike | None) -> str | None:
    if path is None or not Path(path).exists():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fgsm_in_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, chunk: int = 500) -> torch.Tensor:
    """FGSM on ``model`` for all of x, ``chunk`` images at a time (bounded memory)."""
    return torch.cat([attacks.fgsm(model, x[s: s + chunk], y[s: s + chunk], eps) for s in range(0, len(x), chunk)])


def purify_cached(generator, encoder, x: torch.Tensor, cfg: ProjectionConfig, batch_size: int,
                  key: dict, cache_dir: str | os.PathLike | None, seed: int = 0,
                  done_only: bool = False) -> dict:
    """Purify ``x`` with ``cfg`` (seeded per batch: ``seed + batch index``), or load the
    result from ``cache_dir`` when the same key was computed before. ``done_only``: compute
    nothing; return the leading batches already in the cache (a run still going, or stopped),
    so fewer images than ``x`` may come back."""
    key = dict(key, projection=settings_record(cfg.with_(compile=False, cuda_graph=False)), seed=seed,
               batch_size=batch_size)
    if not cfg.encoder_starts:
        key.pop("encoder", None)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{digest}.pt" if cache_dir else None
    if path is not None and path.exists():
        hit = torch.load(path, map_location=x.device, weights_only=True)
        return dict(images=hit["images"], errors=hit["errors"], seconds=float(hit["seconds"]), cached=True)
    # Batches done so far are kept beside the final file (``<digest>.parts/``), so a run stopped
    # half-way (the paper configuration is an hour per 1,000 images on a loaded CPU) resumes.
    parts = path.with_suffix(".parts") if path is not None else None
    images, errors, seconds = [], [], 0.0
    for b, s in enumerate(range(0, len(x), batch_size)):
        part_path = parts / f"{b:05d}.pt" if parts is not None else None
        if part_path is not None and part_path.exists():
            part = torch.load(part_path, map_location=x.device, weights_only=True)
        elif done_only:
            break
        else:
            _sync(x.device)
            t0 = time.perf_counter()
            p = project(generator, x[s: s + batch_size], cfg.with_(seed=seed + b), encoder)
            _sync(x.device)
            part = dict(images=p.images, errors=p.errors, seconds=torch.tensor(time.perf_counter() - t0))
            if part_path is not None:
                part_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({k: v.cpu() for k, v in part.items()}, part_path.with_suffix(".tmp"))
                os.replace(part_path.with_suffix(".tmp"), part_path)
        images.append(part["images"])
        errors.append(part["errors"])
        seconds += float(part["seconds"])
    if done_only:
        if not images:
            raise ConfigError(f"no finished batch of {key.get('condition')} in the cache {cache_dir} "
                              f"for {asdict(cfg)}: run it first")
        return dict(images=torch.cat(images), errors=torch.cat(errors), seconds=seconds, cached=True)
    out = dict(images=torch.cat(images), errors=torch.cat(errors), seconds=seconds, cached=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(dict(indices=torch.tensor(key["indices"]), images=out["images"].cpu(),
                        errors=out["errors"].cpu(), seconds=torch.tensor(seconds),
                        meta=json.dumps(key)), tmp)
        os.replace(tmp, path)
        if parts.exists():
            for f in parts.iterdir():
                f.unlink()
            parts.rmdir()
    return out


# The bench's conditions as `purifier eval` names them (threat, attack); clean has no attack.
_EVAL_THREATS = {"fgsm": ("oblivious", "fgsm"), "transfer": ("transfer", "fgsm")}


class EvalReference:
    """The reference configuration's purified results, read from a finished ``purifier eval``
    run in ``eval_dir`` instead of computed: the paper configuration on 1,000 images costs the
    bench an hour on a CPU, and an evaluation of the same models has usually computed it already.

    Refused (ConfigError) unless the pairing is exact: the evaluation used the same generator,
    classifier (and substitute when ``transfer`` is among the conditions), data set and seed,
    the same projection settings (all but how it runs), at least ``n`` seeded test images (its
    images' fingerprint recomputed here), and, checked per condition by :meth:`load`, its
    adversarial images equal the bench's bit for bit."""

    def __init__(self, eval_dir: str | os.PathLike, model_dir: Path, test_split, cfg: ProjectionConfig,
                 seed: int, n: int, conditions: tuple[str, ...]):
        from .. import data
        from ..evaluation.evaluate import _sha256, images_digest

        self.root, self.cfg = Path(eval_dir), cfg
        run_json, results_json = self.root / "cache" / "run.json", self.root / "results.json"
        if not run_json.is_file() or not results_json.is_file():
            raise ConfigError(f"--reference-eval {self.root}: no finished `purifier eval` run there "
                              f"(it needs cache/run.json and results.json)")
        fp = json.loads(run_json.read_text())
        settings = json.loads(results_json.read_text()).get("settings", {})
        models = fp.get("models", {})
        wanted = {"generator.safetensors": "generator.safetensors", "classifier.safetensors": "classifier.safetensors"}
        if cfg.encoder_starts:
            wanted["encoder.safetensors"] = "encoder.safetensors"
        if "transfer" in conditions:
            wanted["substitute"] = "substitute.safetensors"
        problems = []
        for key, file in wanted.items():
            path = model_dir / file
            if models.get(key) != (_sha256(path) if path.is_file() else None):
                problems.append(f"its {key.removesuffix('.safetensors')} is not {path}")
        if fp.get("seed") != seed:
            problems.append(f"its seed is {fp.get('seed')}, this bench's --seed {seed}")
        n_eval = int(fp.get("n", 0))
        if n_eval < n:
            problems.append(f"it has {n_eval} test images, this bench asks for {n}")
        diff = settings_differ(cfg, settings.get("projection") or {})
        if diff:
            problems.append(f"its projection differs from the reference configuration in {', '.join(diff)}")
        if not problems:
            chosen = data.subset(test_split, n_eval, seed)
            if images_digest(chosen.images, chosen.labels) != fp.get("test_images_sha256"):
                problems.append("its test images are not this bench's (data set or data directory differ)")
        if problems:
            raise ConfigError(f"--reference-eval {self.root} cannot stand in for the reference: " + "; ".join(problems))

    def _cell(self, kind: str, cond: str, eps: float) -> dict[str, torch.Tensor]:
        folder = self.root / "cache" / kind
        files = sorted(folder.glob("*.pt"))
        if not files:
            raise ConfigError(f"--reference-eval {self.root}: no {cond} results in {folder} "
                              f"(run the evaluation with this attack and eps {eps:g})")
        parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "seconds"}
        out["seconds"] = float(sum(float(p["seconds"].sum()) for p in parts))
        return out

    def load(self, cond: str, eps: float, x_in: torch.Tensor) -> dict:
        """``{"pred", "errors", "seconds", "cached": True, "source"}`` for ``x_in``, the bench's
        first ``len(x_in)`` seeded test images under ``cond``; ``pred`` is the evaluation's
        prediction on its float purified images."""
        from ..evaluation.evaluate import _proj_tag, attack_cell_name

        name = "clean" if cond == "clean" else attack_cell_name(*_EVAL_THREATS[cond], eps, pgd_steps=0)
        k = len(x_in)
        if cond != "clean":
            adv = self._cell(f"adv/{name}", cond, eps)["x"][:k]
            if adv.shape != x_in.shape or not torch.equal(adv, x_in.detach().cpu()):
                raise ConfigError(f"--reference-eval {self.root}: its {name} images differ from this bench's "
                                  f"(another attack implementation or eps); compute the reference instead")
        pur = self._cell(f"purified/{name}/{_proj_tag(self.cfg)}", cond, eps)
        if len(pur["pred"]) < k:
            raise ConfigError(f"--reference-eval {self.root}: {name} has {len(pur['pred'])} purified images, "
                              f"this bench asks for {k}")
        return dict(pred=pur["pred"][:k], errors=pur["error"][:k].float(),
                    seconds=pur["seconds"] * k / len(pur["pred"]), cached=True, source=str(self.root))


def _substitute(model_dir: Path, device: torch.device) -> nn.Module:
    from ..checkpoint import load_module

    path = Path(model_dir) / "substitute.safetensors"
    if not path.is_file():
        raise ConfigError(f"the transfer condition needs {path} (`purifier train-classifier --arch B "
                          f"--name substitute`), or drop 'transfer' from the conditions")
    model = load_module(path, "classifier", device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def _predict(classifier, x, batch=500):
    return torch.cat([classifier(x[s: s + batch]).argmax(1) for s in range(0, len(x), batch)])


# --- the whole bench -----------------------------------------------------------------------

@dataclass
class BenchSettings:
    configs: list[tuple[str, ProjectionConfig]]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    # per configuration name: its own sweep instead of batch_sizes (the paper configuration is
    # fastest at small batches and costs minutes per large one; fast gains up to hundreds)
    batch_sizes_for: dict[str, list[int]] = field(default_factory=dict)
    speed_images: int = 64          # images per throughput measurement
    quality_images: int = 0         # 0: speed only
    quality_batch: int = 100
    eps: float = 0.3
    conditions: tuple[str, ...] = ("clean", "fgsm")
    seed: int = 0                   # which test images, and the projection seeds
    cache_dir: str | None = None
    speed_seconds: float | None = None  # per (config, batch size): stop starting batches after this
    rounds: int = 1                 # the whole speed sweep this many times (a rerun in the same process)
    # matched quality (issue 15): each accuracy within this much of the reference (or better),
    # and the clean reconstruction error not higher
    max_accuracy_drop: float = 0.01
    reference_done_only: bool = False  # pair on the reference's finished cached batches only
    reference_eval: str | None = None  # read the reference from this finished `purifier eval` run


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
                  settings=dict(batch_sizes=settings.batch_sizes,
                                batch_sizes_for={k: list(v) for k, v in settings.batch_sizes_for.items()},
                                speed_images=settings.speed_images,
                                quality_images=settings.quality_images, quality_batch=settings.quality_batch,
                                eps=settings.eps, seed=settings.seed, reference=ref_name,
                                rounds=settings.rounds, speed_seconds=settings.speed_seconds, threads=torch.get_num_threads(),
                                reference_eval=settings.reference_eval,
                                configs={n: asdict(c) for n, c in settings.configs}),
                  speed=[], quality={})

    # Speed: every config at every batch size, one after another, `rounds` times over.
    if settings.speed_images:
        xs = data.subset(test_split, settings.speed_images, seed=settings.seed + 1).images.to(dev)
        # Counted on 8 images: exact without early stopping, and the paper configuration's 64
        # would cost as much as its whole sweep.
        steps = {name: latent_steps_per_image(G, E, xs[: min(len(xs), 8)], cfg.with_(seed=0))
                 for name, cfg in settings.configs}
        result["load"] = [dict(when="start", **machine_load())]
        for rnd in range(settings.rounds):
            for name, cfg in settings.configs:
                for bs in settings.batch_sizes_for.get(name, settings.batch_sizes):
                    n_img = len(xs) if bs > 1 else max(1, min(len(xs), 16 if name == ref_name else 64))
                    load_before = os.getloadavg()[0]
                    row = dict(config=name, round=rnd, latent_steps_per_image=round(steps[name], 1),
                               **time_config(G, E, xs[:n_img], cfg, bs, max_seconds=settings.speed_seconds))
                    row["load1_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                    result["speed"].append(row)
                    log(f"speed round {rnd} {name} batch {bs}: {row['images_per_s']} images/s, "
                        f"p50 {row['latency_ms']['p50']} ms ({steps[name]:.0f} latent-steps/image)")
            result["load"].append(dict(when=f"after round {rnd}", **machine_load()))
        ref = {(r["round"], r["batch_size"]): r["images_per_s"] for r in result["speed"] if r["config"] == ref_name}
        for r in result["speed"]:
            if (r["round"], r["batch_size"]) in ref:
                r["speedup_vs_reference"] = round(r["images_per_s"] / ref[r["round"], r["batch_size"]], 2)
        searches = {name: json.dumps(search_settings(cfg), sort_keys=True) for name, cfg in settings.configs}
        result["speed_summary"] = speed_summary(result["speed"], ref_name, searches=searches)
        log(format_speed_summary(result["speed_summary"]))
        if all(r.get("images_per_cpu_s") for r in result["speed"]):
            result["speed_summary_cpu_time"] = speed_summary(result["speed"], ref_name, "images_per_cpu_s",
                                                             searches=searches)
            log(format_speed_summary(result["speed_summary_cpu_time"]))

    # Quality: the same seeded test images for every config, clean and attacked.
    if settings.quality_images:
        if clf is None:
            raise ConfigError("the quality part needs a classifier in the model directory")
        sub = data.subset(test_split, settings.quality_images, seed=settings.seed)
        indices = torch.randperm(len(test_split.labels),
                                 generator=torch.Generator().manual_seed(settings.seed))[: len(sub.labels)]
        x, y = sub.images.to(dev), sub.labels.to(dev)
        errors_of = {}  # condition -> config -> (n,) per-image errors, for the detection rows
        reference = (EvalReference(settings.reference_eval, bundle.path, test_split, settings.configs[0][1],
                                   settings.seed, len(y), settings.conditions) if settings.reference_eval else None)
        key = dict(dataset=dataset, n=len(y), subset_seed=settings.seed, indices=indices.tolist(),
                   generator=file_digest(bundle.path / "generator.safetensors"),
                   encoder=file_digest(bundle.path / "encoder.safetensors"))
        for cond in settings.conditions:
            if cond == "clean":
                xin, ckey = x, dict(key, condition="clean")
            elif cond in ("fgsm", "transfer"):
                # fgsm: defense-oblivious, on the protected classifier itself; transfer: made on
                # the separately trained substitute (model B) and sent to the protected one.
                which = "classifier" if cond == "fgsm" else "substitute"
                attacked = clf if cond == "fgsm" else _substitute(bundle.path, dev)
                xin = fgsm_in_chunks(attacked, x, y, settings.eps)
                ckey = dict(key, condition=f"fgsm-{settings.eps}" if cond == "fgsm" else f"transfer-fgsm-{settings.eps}",
                            **{which: file_digest(bundle.path / f"{which}.safetensors")})
            else:
                raise ConfigError(f"unknown condition {cond!r}; use clean, fgsm and/or transfer")
            # With reference_done_only the reference is what its (slow) run has finished so far,
            # and every configuration is compared on those leading images only.
            if reference is not None:
                ref_out = reference.load(cond, settings.eps, xin)
            else:
                ref_out = purify_cached(G, E, xin, settings.configs[0][1], settings.quality_batch, ckey,
                                        settings.cache_dir, settings.seed, done_only=settings.reference_done_only)
            k = len(ref_out["errors"])
            undefended = (_predict(clf, xin[:k]) == y[:k]).float()
            per_cfg, rows = {}, {}
            for name, cfg in settings.configs:
                out = ref_out if name == ref_name else purify_cached(
                    G, E, xin, cfg, settings.quality_batch, ckey, settings.cache_dir, settings.seed)
                ran = len(out["errors"])   # images this configuration's seconds are for
                if "pred" in out:    # the reference, read from an evaluation's predictions
                    correct = (out["pred"][:k].to(y.device) == y[:k]).float()
                else:
                    out = dict(out, images=out["images"][:k])
                    correct = (_predict(clf, out["images"]) == y[:k]).float()
                out = dict(out, errors=out["errors"][:k].to(y.device))
                per_cfg[name] = (correct, out["errors"].double())
                errors_of.setdefault(cond, {})[name] = out["errors"].double().cpu()
                rows[name] = dict(accuracy=float(correct.mean()), mean_error=float(out["errors"].mean()),
                                  n=k, seconds=round(out["seconds"], 1), cached=out["cached"],
                                  images_per_s=round(ran / out["seconds"], 3),
                                  **({"source": out["source"]} if "source" in out else {}))
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
            result["quality"][cond] = dict(undefended_accuracy=float(undefended.mean()), n=k,
                                           n_asked=len(y), configs=rows)
        result["matched_quality"] = matched_quality(result["quality"], ref_name, settings.max_accuracy_drop)
        if "clean" in errors_of and len(errors_of) > 1:
            result["detection"] = detection_rows(errors_of)
            for cond, rows in result["detection"].items():
                for name, r in rows.items():
                    log(f"detection {cond} {name}: AUC {r['auc']:.4f}, {r['tpr_at_fpr']:.1%} flagged "
                        f"over the threshold that flags {r['target_fpr']:.0%} of the clean images")
    return result


def detection_rows(errors_of: dict, target_fpr: float = 0.05) -> dict:
    """Per attacked condition and configuration: how well the reconstruction error tells the
    attacked images from the same images clean (the service's ``adversarial`` flag). ROC AUC,
    and the share of attacked images over the threshold that flags ``target_fpr`` of these
    clean images (chosen on the images it is measured on, so an optimistic operating point;
    ``purifier calibrate`` sets the service's on training images)."""
    from ..detection import rates_at, roc_auc, threshold_for_fpr

    out = {}
    for cond, by_config in errors_of.items():
        if cond == "clean":
            continue
        rows = {}
        for name, attacked in by_config.items():
            clean = errors_of["clean"].get(name)
            if clean is None:
                continue
            n = min(len(clean), len(attacked))  # paired images (a partial reference run has fewer)
            neg, pos = clean[:n].numpy(), attacked[:n].numpy()
            t = threshold_for_fpr(neg, target_fpr)
            rows[name] = dict(auc=round(roc_auc(neg, pos), 4),
                              tpr_at_fpr=round(rates_at(t, neg, pos)["tpr"], 4), target_fpr=target_fpr, n=n)
        out[cond] = rows
    return out


def matched_quality(quality: dict, reference: str, max_drop: float = 0.01) -> dict:
    """Per configuration: does it match the reference? Each condition's mean paired accuracy
    difference >= -max_drop, and the clean reconstruction error's mean paired difference <= 0
    (on attacked images a higher error is the detector's signal, so it is reported, not
    required). The 95% intervals are beside each number; at 1,000 images they are about
    +-1.5 points wide, wider than max_drop, so a pass is on the mean."""
    out = {}
    names = {n for q in quality.values() for n in q["configs"] if n != reference}
    for name in sorted(names):
        checks = {}
        for cond, q in quality.items():
            pv = q["configs"][name]["paired_vs_reference"]
            acc = pv["accuracy_diff"]
            checks[f"{cond}_accuracy"] = dict(diff=round(acc["mean"], 4), ci95=[round(v, 4) for v in acc["ci95"]],
                                              ok=acc["mean"] >= -max_drop - 1e-12)
            if cond == "clean":
                err = pv["error_diff"]
                checks["clean_error"] = dict(diff=err["mean"], ci95=err["ci95"], ok=err["mean"] <= 0)
        n = min(q.get("n", 0) for q in quality.values())
        out[name] = dict(matched=all(c["ok"] for c in checks.values()), checks=checks,
                         conditions=sorted(quality), n_paired=n,
                         complete=all(q.get("n") == q.get("n_asked") for q in quality.values()))
    return out
