"""The robustness evaluation behind ``purifier eval``.

One run takes a seeded choice of ``n`` test images and measures, per *cell*:

- ``oblivious`` (the paper's threat model): FGSM, PGD-Linf and CW-L2 computed on the
  classifier alone, then purified;
- ``transfer`` (black box): FGSM or PGD computed on a separately trained substitute
  classifier, sent through the purifier to the target classifier;
- ``adaptive``: BPDA+EOT PGD on classifier(purify(x)), on the first ``n_adaptive`` images.
- ``blackbox``: the Defense-GAN paper's black-box protocol (Papernot et al. 2017 substitute
  training, as the original code's ``blackbox.py`` runs it): the first ``blackbox_holdout``
  test images (file order) are the attacker's, labelled by querying the *defended* model
  (purify, then classify: the pipeline of the purified column); a substitute of architecture
  ``blackbox_arch`` is trained on them for ``blackbox_rounds`` rounds of ``blackbox_epochs``
  epochs, its set doubled between rounds by Jacobian-based augmentation (lambda
  ``blackbox_lambda``), each new point labelled by the defended model; FGSM crafted on the
  final substitute (its own predictions as labels, clipped to [0, 1]) is measured on the next
  ``blackbox_n`` test images (the original: 1,850, the rest of the first 2,000). Weaker than
  ``transfer``, whose substitute learnt from the whole labelled training set.

Each cell gives accuracy without and with the defense (95% Wilson intervals), and the
detection ROC of reconstruction errors against the clean images. Optional sweeps purify
the clean and one adversarial set at several L (steps) and R (restarts).

Everything expensive is computed in chunks, each saved under ``<out>/cache/<cell>/`` as it
finishes, so an interrupted run continues with ``resume=True`` and a rerun that only adds
attacks or sweep points costs only the new cells. ``<out>/cache/run.json`` fingerprints what
the cached numbers depend on (models, data, seed, chunking); resuming with another
fingerprint is refused instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint, data, detection
from . import attacks
from ..errors import ConfigError
from ..projection import PRESETS as PROJECTIONS
from ..projection import ProjectionConfig, preset, project
from ..stats import wilson_interval

ATTACKS = ("fgsm", "pgd", "cw", "transfer", "bpda", "blackbox", "bpda-detect", "manifold")
# The detection-aware attacks (issue 13) run only when asked for: they cost as much as bpda again
# per lambda.
DEFAULT_ATTACKS = ATTACKS[:6]
BLACKBOX_LABELS = ("defended", "true")
BLACKBOX_BATCH, BLACKBOX_LR = 128, 1e-3   # the original's substitute training (cleverhans' Adam)


@dataclass(frozen=True)
class EvalConfig:
    model_dir: str
    out_dir: str
    dataset: str | None = None          # a name or a path (purifier.data.load); default: the model card's
    data_dir: str | None = None
    image_size: int | None = None       # resize rule of purifier.data; default: the model card's
    n: int = 1000                       # test images for clean, oblivious and transfer cells
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eps: tuple[float, ...] = (0.1, 0.2, 0.3)
    projection: str = "paper"           # preset; steps/restarts override its L and R
    steps: int | None = None
    restarts: int | None = None
    latent_radius: float | None = None  # override the preset's (0: z unconstrained, as the paper)
    pgd_steps: int = 40
    cw_steps: int = 100
    cw_search_steps: int = 5
    transfer_method: str = "fgsm"       # how adversarial examples are made on the substitute
    substitute: str | None = None       # default: <model_dir>/substitute.safetensors
    n_adaptive: int = 100               # images for BPDA+EOT (each step runs the projection)
    adaptive_steps: int = 40
    eot_samples: int = 4
    lambdas: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0)  # bpda-detect: weights of the error term
    lambda_eps: tuple[float, ...] = ()  # eps where every lambda runs (empty: all); elsewhere lambda_other
    lambda_other: float = 1.0
    detect_kappa: float = 2.0           # logit margin at which bpda-detect and manifold count a success
    manifold_steps: int = 100           # Adam steps on z per binary-search round (manifold)
    manifold_search_steps: int = 3
    sweep_l: tuple[int, ...] = ()
    sweep_r: tuple[int, ...] = ()
    sweep_n: int = 200
    sweep_attack: str = "fgsm"
    sweep_eps: float = 0.3
    blackbox_holdout: int = 150         # the attacker's test images (the first, in file order)
    blackbox_n: int = 1850              # test images after them, attacked and measured
    blackbox_rounds: int = 6            # substitute training rounds; the set doubles between rounds
    blackbox_lambda: float = 0.1        # Jacobian augmentation step
    blackbox_epochs: int = 10           # substitute epochs per round
    blackbox_arch: str = "B"            # substitute architecture (the rerun's: B, model A protected)
    blackbox_labels: str = "defended"   # the holdout's labels: the defended model's, or "true" (the
                                        # original script's: it queries only for the new points)
    blackbox_oracle: str | None = None  # host:port of a served model (V2 gRPC) whose answers label the
                                        # substitute's data instead of this run's own defended model:
                                        # a running purifier, queried as a real black-box attacker would
    blackbox_oracle_model: str = "classifier"  # the model name asked there
    batch_size: int = 250               # images per project() call and per cached chunk
    adaptive_batch: int = 20            # images per cached BPDA chunk (minutes each on a CPU)
    seed: int = 0
    device: str = "cpu"
    n_show: int = 8                     # images per figure grid

    def __post_init__(self):
        problems = []
        bad = sorted(set(self.attacks) - set(ATTACKS))
        if bad:
            problems.append(f"unknown attacks {bad}; choose from {','.join(ATTACKS)}")
        if self.projection not in PROJECTIONS:
            problems.append(f"projection must be one of {sorted(PROJECTIONS)}, got {self.projection!r}")
        if self.n < 1 or self.n_adaptive < 0 or self.sweep_n < 1:
            problems.append("n and sweep_n must be >= 1, n_adaptive >= 0")
        if any(not 0 < e <= 1 for e in self.eps):
            problems.append(f"every eps must be in (0, 1] (images are in [0, 1]), got {list(self.eps)}")
        if not self.eps and set(self.attacks) & {"fgsm", "pgd", "transfer", "bpda"}:
            problems.append("give at least one eps for fgsm/pgd/transfer/bpda")
        if min(self.blackbox_holdout, self.blackbox_n, self.blackbox_rounds, self.blackbox_epochs) < 1:
            problems.append("blackbox_holdout, blackbox_n, blackbox_rounds and blackbox_epochs must be >= 1")
        if not self.blackbox_lambda > 0:
            problems.append(f"blackbox_lambda must be > 0, got {self.blackbox_lambda}")
        if self.blackbox_arch not in ("A", "B", "C", "D"):
            problems.append(f"blackbox_arch must be one of A, B, C, D, got {self.blackbox_arch!r}")
        if self.blackbox_labels not in BLACKBOX_LABELS:
            problems.append(f"blackbox_labels must be one of {BLACKBOX_LABELS}, got {self.blackbox_labels!r}")
        if any(not (v >= 0 and np.isfinite(v)) for v in (*self.lambdas, self.lambda_other)):
            problems.append("lambdas and lambda_other must be finite numbers >= 0")
        if "bpda-detect" in self.attacks and not self.lambdas:
            problems.append("bpda-detect needs at least one lambda")
        if not self.detect_kappa >= 0 or min(self.manifold_steps, self.manifold_search_steps) < 1:
            problems.append("detect_kappa must be >= 0, manifold steps and search steps >= 1")
        if self.transfer_method not in ("fgsm", "pgd"):
            problems.append(f"transfer_method must be fgsm or pgd, got {self.transfer_method!r}")
        if self.sweep_attack not in ("fgsm", "pgd"):
            problems.append(f"sweep_attack must be fgsm or pgd, got {self.sweep_attack!r}")
        if min(self.pgd_steps, self.cw_steps, self.cw_search_steps, self.adaptive_steps,
               self.eot_samples, self.batch_size, self.adaptive_batch) < 1:
            problems.append("step counts, eot_samples and batch sizes must be >= 1")
        if any(v < 0 for v in self.sweep_l) or any(v < 1 for v in self.sweep_r):
            problems.append("sweep L values must be >= 0 and R values >= 1")
        if problems:
            raise ConfigError("bad evaluation settings: " + "; ".join(problems))

    def command(self) -> str:
        """The ``purifier eval`` command line for these settings, every option explicit (the
        device and --resume aside: they do not change the numbers)."""
        import shlex

        def csv(values):
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

        parts = ["purifier", "eval", self.model_dir, "--out", self.out_dir]
        skip = {"model_dir", "out_dir", "device"}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in skip or value is None or value == ():
                continue
            parts += ["--" + f.name.replace("_", "-"), csv(value) if isinstance(value, tuple) else f"{value:g}"
                      if isinstance(value, float) else str(value)]
        return " ".join(shlex.quote(p) for p in parts)

    def projection_config(self, has_encoder: bool) -> ProjectionConfig:
        return preset(self.projection, has_encoder=has_encoder, steps=self.steps, restarts=self.restarts,
                      latent_radius=self.latent_radius)


# --- statistics ---------------------------------------------------------------------------

def accuracy(correct: torch.Tensor) -> dict:
    k, n = int(correct.sum()), int(correct.numel())
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "ci95": [lo, hi], "correct": k, "n": n}


# --- the chunk cache ----------------------------------------------------------------------

def _derive_seed(base: int, *parts) -> int:
    return (base * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2 ** 31)


class ChunkCache:
    """Results of expensive loops, one file per chunk of images, written atomically."""

    def __init__(self, root: Path, progress: bool = True):
        self.root, self.progress = root, progress

    def run(self, name: str, n: int, chunk: int, fn, desc: str | None = None) -> dict[str, torch.Tensor]:
        """Call ``fn(start, end) -> {key: tensor with first dim end - start}`` for each chunk
        not cached yet; return the chunks concatenated, plus ``seconds`` of compute."""
        from tqdm.auto import tqdm

        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        parts, seconds = [], 0.0
        with tqdm(total=n, desc=desc or name, unit="img", disable=not self.progress, leave=False) as bar:
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                path = folder / f"{start:06d}-{end:06d}.pt"
                if path.is_file():
                    part = torch.load(path, weights_only=True)
                else:
                    t0 = time.perf_counter()
                    part = {k: v.detach().cpu() for k, v in fn(start, end).items()}
                    part["seconds"] = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    tmp = path.with_suffix(".tmp")
                    torch.save(part, tmp)
                    os.replace(tmp, path)
                seconds += float(part.pop("seconds").sum())
                parts.append(part)
                bar.update(end - start)
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        out["seconds"] = seconds
        return out


# --- the run ------------------------------------------------------------------------------

@dataclass
class Cell:
    """One row of the results table: a threat model, an attack and its strength."""

    threat: str            # clean | oblivious | transfer | adaptive | blackbox
    attack: str            # none | fgsm | pgd | cw | bpda
    eps: float | None
    name: str              # cache key, e.g. "oblivious-fgsm-eps0.3"
    n: int
    extra: dict = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _proj_tag(cfg: ProjectionConfig) -> str:
    tag = f"L{cfg.steps}-R{cfg.restarts}-{cfg.optimizer}-lr{cfg.lr:g}"
    if cfg.prune_after:
        tag += f"-prune{cfg.prune_after}k{cfg.keep}"
    if cfg.encoder_starts:
        tag += f"-enc{cfg.encoder_starts}"
    if cfg.early_stop_tol:
        tag += f"-tol{cfg.early_stop_tol:g}"
    if cfg.latent_radius:
        tag += f"-sphere{cfg.latent_radius:g}"
    if cfg.select != "best":
        tag += f"-select{cfg.select}"   # the original's answer at the last step
    if cfg.precise_below:
        tag += f"-precise{cfg.precise_below:g}lr{cfg.precise_lr:g}"
    if cfg.decay_to != 1.0:
        tag += f"-decay{cfg.decay_to:g}from{cfg.decay_from:g}"
    return tag


def images_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """The fingerprint of an evaluation's test images (``run.json``'s ``test_images_sha256``)."""
    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()


def attack_cell_name(threat: str, attack: str, eps: float, pgd_steps: int) -> str:
    """The cache name of an oblivious or transfer cell (FGSM, PGD): its adversarial images are
    under ``adv/<name>``, their purifications under ``purified/<name>/<projection tag>``."""
    return f"{threat}-{attack}-eps{eps:g}-s{pgd_steps if attack == 'pgd' else 1}"


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class Evaluation:
    """Holds the models and data of one run; :meth:`run` returns the results dict."""

    def __init__(self, cfg: EvalConfig, resume: bool = False, progress: bool = True, log=print, oracle=None):
        """``oracle``: labels (N,) for images (N, C, H, W) from the black box at
        ``cfg.blackbox_oracle`` (``purifier.server.oracle.RemoteLabels``; the evaluation itself
        speaks no gRPC), required when that is set."""
        self.cfg, self.log = cfg, log
        if cfg.blackbox_oracle and "blackbox" in cfg.attacks and oracle is None:
            raise ConfigError(f"blackbox_oracle {cfg.blackbox_oracle}: pass the oracle that asks it "
                              "(purifier eval --blackbox-oracle builds one)")
        self.oracle = oracle
        self.device = torch.device(cfg.device)
        self.out = Path(cfg.out_dir)
        self.bundle = checkpoint.load_bundle(cfg.model_dir, self.device, need_classifier=True)
        self.dataset = cfg.dataset or self.bundle.card.get("dataset")
        if self.dataset is None:
            raise ConfigError(f"{cfg.model_dir}/card.json names no dataset: pass --dataset or --data")
        self.pcfg = cfg.projection_config(self.bundle.encoder is not None)
        self.substitute = None
        self.substitute_path = None
        if "transfer" in cfg.attacks:
            path = Path(cfg.substitute or Path(cfg.model_dir) / "substitute.safetensors")
            if not path.is_file():
                raise ConfigError(
                    f"transfer attack needs a substitute classifier; {path} does not exist. Train one "
                    f"with `purifier train-classifier {data.flags(self.dataset)} --arch B --out "
                    f"{cfg.model_dir} --name substitute`, pass --substitute PATH, or drop 'transfer'")
            self.substitute_path = path
            self.substitute = checkpoint.load_module(path, "classifier", self.device)
            for p in self.substitute.parameters():
                p.requires_grad_(False)

        test = data.load(self.dataset, "test", cfg.data_dir,
                         image_size=cfg.image_size or self.bundle.card.get("image_size"))
        data.check_shape(test, self.bundle.image_shape, f"the generator in {cfg.model_dir}")
        data.require_labels(test, "purifier eval")
        chosen = data.subset(test, cfg.n, cfg.seed)   # seeded; every smaller count is a prefix
        self.x, self.y = chosen.images, chosen.labels  # (n, C, H, W) on the host, (n,)
        self.n = len(self.y)
        self.data_source = test.source
        self.blackbox = None
        if "blackbox" in cfg.attacks:
            h = cfg.blackbox_holdout
            if len(test.labels) <= h:
                raise ConfigError(f"blackbox: the test split has {len(test.labels)} images, the attacker "
                                  f"holds out {h}; lower --blackbox-holdout")
            # File order, as the original: the attacker's images first, the measured ones next.
            self.blackbox = {"holdout": (test.images[:h], test.labels[:h]),
                             "eval": (test.images[h:h + cfg.blackbox_n], test.labels[h:h + cfg.blackbox_n])}
            self._blackbox_model = None

        self.fingerprint = self._fingerprint()
        self.cache = ChunkCache(self.out / "cache", progress)
        self._check_cache(resume)

    # -- bookkeeping

    def _fingerprint(self) -> dict:
        md = Path(self.cfg.model_dir)
        files = {p.name: _sha256(p) for p in sorted(md.glob("*.safetensors")) + sorted(md.glob("*.pt2"))}
        if self.substitute_path is not None:
            files["substitute"] = _sha256(self.substitute_path)
        c = self.cfg
        return {"models": files, "dataset": self.dataset, "n": self.n, "seed": c.seed,
                "batch_size": c.batch_size, "adaptive_batch": c.adaptive_batch,
                "test_images_sha256": images_digest(self.x, self.y)}

    def _check_cache(self, resume: bool) -> None:
        path = self.out / "cache" / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if not resume:
                raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it "
                                  f"(cached cells are reused) or choose another --out")
            if old != self.fingerprint:
                changed = sorted(k for k in set(old) | set(self.fingerprint)
                                 if old.get(k) != self.fingerprint.get(k))
                raise ConfigError(f"cannot resume {self.out}: its cached results were computed with "
                                  f"different {', '.join(changed)}; choose another --out")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.fingerprint, indent=2) + "\n")

    # -- building blocks

    def _predict(self, model, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(self.device)).argmax(1).cpu()

    def _adversarial(self, name: str, n: int, chunk: int, make, images=None) -> dict:
        """Adversarial images for the first n test images (or of ``images``, a pair (x, y)):
        {"x", "pred"} (pred: target, no defense)."""
        xs, ys = images if images is not None else (self.x, self.y)

        def fn(s, e):
            x, y = xs[s:e].to(self.device), ys[s:e].to(self.device)
            adv = make(x, y, s)
            return {"x": adv, "pred": self._predict(self.bundle.classifier, adv)}
        return self.cache.run("adv/" + name, n, chunk, fn, desc=f"attack {name}")

    def _purified(self, set_name: str, x: torch.Tensor, cfg: ProjectionConfig) -> dict:
        """Purify x in chunks: {"pred", "error", "image" (uint8)}, seeded per set and chunk."""
        tag = _proj_tag(cfg)

        def fn(s, e):
            seed = _derive_seed(self.cfg.seed, "purify", set_name, tag, s)
            proj = project(self.bundle.generator, x[s:e].to(self.device), cfg.with_(seed=seed),
                           self.bundle.encoder)
            return {"pred": self._predict(self.bundle.classifier, proj.images), "error": proj.errors,
                    "image": _to_uint8(proj.images)}
        return self.cache.run(f"purified/{set_name}/{tag}", len(x), self.cfg.batch_size, fn,
                              desc=f"purify {set_name} {tag}")

    def _attack_fn(self, attack: str, eps: float | None, model):
        c = self.cfg
        if attack == "fgsm":
            return lambda x, y, s: attacks.fgsm(model, x, y, eps)
        if attack == "pgd":
            def pgd(x, y, s):
                gen = torch.Generator(device=self.device).manual_seed(
                    _derive_seed(c.seed, "pgd", eps, s))
                return attacks.pgd_linf(model, x, y, eps, steps=c.pgd_steps, generator=gen)
            return pgd
        if attack == "cw":
            return lambda x, y, s: attacks.cw_l2(model, x, y, steps=c.cw_steps,
                                                 binary_search_steps=c.cw_search_steps)
        raise ValueError(attack)

    # -- the run

    def _cell_name(self, threat: str, attack: str, eps: float | None, lam: float | None = None) -> str:
        """The cache key: everything the cell's adversarial images depend on, beyond the run's
        fingerprint (so changing --pgd-steps, say, computes new cells instead of reusing old ones)."""
        c = self.cfg
        if attack == "cw":
            return f"{threat}-cw-s{c.cw_steps}x{c.cw_search_steps}"
        if attack == "bpda":
            return f"{threat}-bpda-eps{eps:g}-s{c.adaptive_steps}-eot{c.eot_samples}-{_proj_tag(self.pcfg)}"
        if attack == "bpda-detect":
            if self.bundle.threshold is None:
                raise ConfigError(f"bpda-detect attacks the detector: {c.model_dir}/card.json has no "
                                  f"threshold (run `purifier calibrate`) ")
            return (f"{threat}-bpdadetect-eps{eps:g}-lam{lam:g}-k{c.detect_kappa:g}-s{c.adaptive_steps}-"
                    f"eot{c.eot_samples}-thr{self.bundle.threshold:.6g}-{_proj_tag(self.pcfg)}")
        if attack == "manifold":
            return (f"{threat}-manifold-s{c.manifold_steps}x{c.manifold_search_steps}-k{c.detect_kappa:g}-"
                    f"{_proj_tag(self.pcfg)}")
        if threat == "blackbox":
            return f"blackbox-{attack}-eps{eps:g}-{self._blackbox_tag()}"
        return attack_cell_name(threat, attack, eps, c.pgd_steps)

    def cells(self) -> list[Cell]:
        c = self.cfg
        wanted = [("oblivious", a, e) for a in ("fgsm", "pgd") if a in c.attacks for e in c.eps]
        if "cw" in c.attacks:
            wanted.append(("oblivious", "cw", None))
        if "transfer" in c.attacks:
            wanted += [("transfer", c.transfer_method, e) for e in c.eps]
        if "bpda" in c.attacks and c.n_adaptive:
            wanted += [("adaptive", "bpda", e) for e in c.eps]
        if "blackbox" in c.attacks:
            wanted += [("blackbox", "fgsm", e) for e in c.eps]
        n = {"adaptive": min(c.n_adaptive, self.n),
             "blackbox": len(self.blackbox["eval"][1]) if self.blackbox else 0}
        out = [Cell(t, a, e, self._cell_name(t, a, e), n.get(t, self.n)) for t, a, e in wanted]
        if c.n_adaptive and "bpda-detect" in c.attacks:
            for e in c.eps:
                lams = c.lambdas if (not c.lambda_eps or e in c.lambda_eps) else (c.lambda_other,)
                out += [Cell("adaptive", "bpda-detect", e, self._cell_name("adaptive", "bpda-detect", e, lam),
                             n["adaptive"], {"lambda": lam}) for lam in lams]
        if c.n_adaptive and "manifold" in c.attacks:
            out.append(Cell("adaptive", "manifold", None, self._cell_name("adaptive", "manifold", None),
                            n["adaptive"]))
        return out

    def _cell_data(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean images (n, C, H, W) and labels (n,) a cell attacks."""
        if cell.threat == "blackbox":
            return self.blackbox["eval"]
        return self.x[: cell.n], self.y[: cell.n]

    # -- the black-box protocol

    def _blackbox_tag(self) -> str:
        """Everything the substitute depends on beyond the run's fingerprint; the defended model
        that labels its data includes the projection."""
        c = self.cfg
        who = (f"oracle{hashlib.sha256(f'{c.blackbox_oracle}/{c.blackbox_oracle_model}'.encode()).hexdigest()[:8]}"
               if c.blackbox_oracle else _proj_tag(self.pcfg))
        return (f"h{c.blackbox_holdout}-r{c.blackbox_rounds}-lam{c.blackbox_lambda:g}-e{c.blackbox_epochs}-"
                f"{c.blackbox_arch}-{c.blackbox_labels}-{who}")

    def _defended_labels(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The black box's answers (N,): classify(purify(x)), the purified column's pipeline,
        cached by the points' hash (so a resumed run reuses answers only for the same points)."""
        digest = hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()[:12]
        if self.cfg.blackbox_oracle:  # the served black box's answers, kept so a resumed run asks again for none
            path = self.out / "cache" / "blackbox" / self._blackbox_tag() / f"oracle-{name}-{digest}.pt"
            if path.is_file():
                return torch.load(path, weights_only=True)
            labels = self.oracle(x.cpu()).to(torch.int64).cpu()
            if labels.shape != (len(x),):
                raise ConfigError(f"oracle {self.cfg.blackbox_oracle}: {tuple(labels.shape)} labels for {len(x)} images")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(labels, path)
            return labels
        return self._purified(f"blackbox-{self._blackbox_tag()}/{name}-{digest}", x.cpu(), self.pcfg)["pred"]

    def _blackbox_substitute(self) -> tuple[torch.nn.Module, dict]:
        """The Papernot substitute and its training record, trained once and kept in the cache."""
        if self._blackbox_model is not None:
            return self._blackbox_model
        from ..models import Classifier

        c = self.cfg
        folder = self.out / "cache" / "blackbox" / self._blackbox_tag()
        path, record_path = folder / "substitute.safetensors", folder / "substitute.json"
        if path.is_file() and record_path.is_file():
            model = checkpoint.load_module(path, "classifier", self.device)
            record = json.loads(record_path.read_text())
        else:
            x0, y_true = self.blackbox["holdout"]
            self.log(f"blackbox: training a substitute ({c.blackbox_arch}) on {len(y_true)} held-out "
                     f"images, {c.blackbox_rounds} rounds")
            t0 = time.time()
            y0 = y_true if c.blackbox_labels == "true" else self._defended_labels(x0, "holdout")
            seed = _derive_seed(c.seed, "blackbox")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)   # the substitute's initial weights
                model = Classifier(c.blackbox_arch, *self.bundle.image_shape,
                                   num_classes=self.bundle.classifier.config["num_classes"])
            queries = [0 if c.blackbox_labels == "true" else len(y0)]

            def oracle(x, rnd):
                queries.append(len(x))
                return self._defended_labels(x, f"round{rnd + 1}")
            model, xs, ys = attacks.papernot_substitute(
                model.to(self.device), oracle, x0.to(self.device), y0.to(self.device),
                rounds=c.blackbox_rounds, lam=c.blackbox_lambda, epochs=c.blackbox_epochs,
                batch_size=BLACKBOX_BATCH, lr=BLACKBOX_LR, seed=seed, log=self.log)
            record = {"training_points": len(ys), "oracle_queries": sum(queries),
                      "label_counts": torch.bincount(ys.cpu(), minlength=model.config["num_classes"]).tolist(),
                      "holdout_label_agreement_with_truth": float((y0.cpu() == y_true).float().mean()),
                      "seconds": round(time.time() - t0, 1)}
            folder.mkdir(parents=True, exist_ok=True)
            checkpoint.save_module(model, path, "classifier")
            record_path.write_text(json.dumps(record, indent=1) + "\n")
        for p in model.parameters():
            p.requires_grad_(False)
        self._blackbox_model = (model.eval(), record)
        return self._blackbox_model

    def _blackbox_protocol(self, record: dict) -> dict:
        c = self.cfg
        h = c.blackbox_holdout
        return {"holdout": h, "rounds": c.blackbox_rounds, "lambda": c.blackbox_lambda,
                "epochs_per_round": c.blackbox_epochs, "batch_size": BLACKBOX_BATCH, "lr": BLACKBOX_LR,
                "substitute_arch": c.blackbox_arch, "holdout_labels": c.blackbox_labels,
                "jacobian": "sign of d softmax(substitute)[oracle label] / dx, new points not clipped",
                "fgsm_labels": "the substitute's predictions", "fgsm_clip": [0.0, 1.0],
                "oracle": (f"{c.blackbox_oracle} model {c.blackbox_oracle_model} (V2 gRPC)" if c.blackbox_oracle
                           else "this run's defended model (its purified column)"),
                "attacker_images": f"test[0:{h}] (file order)",
                "measured_images": f"test[{h}:{h + len(self.blackbox['eval'][1])}] (file order)",
                **record}

    def _make_adversarial(self, cell: Cell) -> dict:
        c = self.cfg
        if cell.threat == "oblivious":
            return self._adversarial(cell.name, cell.n, c.batch_size,
                                     self._attack_fn(cell.attack, cell.eps, self.bundle.classifier))
        if cell.threat == "transfer":
            make = self._attack_fn(cell.attack, cell.eps, self.substitute)
            adv = self._adversarial(cell.name, cell.n, c.batch_size, make)
            adv["pred_substitute"] = self._predict(self.substitute, adv["x"])
            return adv
        if cell.threat == "blackbox":
            def make(x, y, s):   # the attacker has no labels here: FGSM on the substitute's own
                sub = self._blackbox_substitute()[0]
                return attacks.fgsm(sub, x, sub(x).argmax(1), cell.eps)
            adv = self._adversarial(cell.name, cell.n, c.batch_size, make, images=self.blackbox["eval"])
            sub = self._blackbox_substitute()[0]
            adv["pred_substitute"] = self._predict(sub, adv["x"])
            adv["pred_substitute_clean"] = self._predict(sub, self.blackbox["eval"][0])
            adv["pred_clean"] = self._predict(self.bundle.classifier, self.blackbox["eval"][0])
            return adv

        if cell.attack == "bpda-detect":
            def detect(x, y, s):
                return attacks.bpda_eot_detect_pgd(
                    self.bundle.classifier, self.bundle.generator, x, y, cell.eps, self.pcfg,
                    self.bundle.threshold, cell.extra["lambda"], self.bundle.encoder, steps=c.adaptive_steps,
                    eot_samples=c.eot_samples, kappa=c.detect_kappa,
                    seed=_derive_seed(c.seed, "bpda-detect", cell.eps, cell.extra["lambda"], s))
            return self._adversarial(cell.name, cell.n, c.adaptive_batch, detect)
        if cell.attack == "manifold":
            def manifold(x, y, s):
                return attacks.on_manifold(self.bundle.classifier, self.bundle.generator, x, y, self.pcfg,
                                           self.bundle.encoder, steps=c.manifold_steps,
                                           search_steps=c.manifold_search_steps, kappa=c.detect_kappa,
                                           seed=_derive_seed(c.seed, "manifold", s))[0]
            return self._adversarial(cell.name, cell.n, c.adaptive_batch, manifold)

        def bpda(x, y, s):
            return attacks.bpda_eot_pgd(self.bundle.classifier, self.bundle.generator, x, y, cell.eps,
                                        self.pcfg, self.bundle.encoder, steps=c.adaptive_steps,
                                        eot_samples=c.eot_samples,
                                        seed=_derive_seed(c.seed, "bpda", cell.eps, s))
        return self._adversarial(cell.name, cell.n, c.adaptive_batch, bpda)

    def run(self) -> tuple[dict, dict]:
        """Compute every cell (reusing cached chunks); return (results, artifacts), where
        artifacts hold the images and score arrays the figures need."""
        c = self.cfg
        t_start = time.time()
        y = self.y
        clf = self.bundle.classifier
        k = min(c.n_show, self.n)

        self.log(f"clean: {self.n} {self.dataset} test images, projection {_proj_tag(self.pcfg)}")
        clean_pred = torch.cat([self._predict(clf, self.x[s:s + c.batch_size])
                                for s in range(0, self.n, c.batch_size)])
        clean_pur = self._purified("clean", self.x, self.pcfg)
        clean_errors = clean_pur["error"].numpy()
        results = {
            "clean": {"threat": "clean", "attack": "none", "eps": None, "n": self.n,
                      "undefended": accuracy(clean_pred == y),
                      "purified": accuracy(clean_pur["pred"] == y),
                      "reconstruction_error": _summary(clean_errors),
                      "seconds": {"purify": clean_pur["seconds"]}},
            "cells": [],
        }
        threshold = self.bundle.threshold
        if threshold is not None:
            results["clean"]["detection_at_card_threshold"] = {
                "threshold": threshold, **detection.rates_at(threshold, clean_errors)}
            # what a caller of a server with --on-flagged reject gets (docs/service.md)
            results["clean"]["abstention"] = detection.abstention(clean_pur["pred"] == y, clean_errors,
                                                                  threshold, attacked=False)
        artifacts = {"grids": {"clean": (self.x[:k], _from_uint8(clean_pur["image"][:k]))}, "roc": {}}

        pgd_purified_correct = {}
        for cell in self.cells():
            self.log(f"{cell.threat} {cell.attack} eps={cell.eps} on {cell.n} images")
            adv = self._make_adversarial(cell)
            pur = self._purified(cell.name, adv["x"], self.pcfg)
            x0, yc = self._cell_data(cell)
            delta = (adv["x"] - x0).flatten(1)
            row = {"threat": cell.threat, "attack": cell.attack, "eps": cell.eps, "n": cell.n,
                   "undefended": accuracy(adv["pred"] == yc),
                   "purified": accuracy(pur["pred"] == yc),
                   "perturbation": {"linf_mean": float(delta.abs().amax(1).mean()),
                                    "l2_mean": float(delta.norm(dim=1).mean())},
                   "reconstruction_error": _summary(pur["error"].numpy()),
                   "seconds": {"attack": adv["seconds"], "purify": pur["seconds"]}}
            fpr, tpr, _ = detection.roc_curve(clean_errors, pur["error"].numpy())
            row["detection"] = {"auc": detection.auc(fpr, tpr),
                                "negatives": "clean test images (purified, same settings)",
                                "n_negatives": len(clean_errors), "n_positives": cell.n}
            if threshold is not None:
                rates = detection.rates_at(threshold, clean_errors, pur["error"].numpy())
                row["detection"]["at_card_threshold"] = {"threshold": threshold, **rates}
                row["abstention"] = detection.abstention(pur["pred"] == yc, pur["error"].numpy(), threshold,
                                                         attacked=True)
            if cell.threat == "blackbox":
                row["substitute_accuracy"] = accuracy(adv["pred_substitute"] == yc)
                row["substitute_clean_accuracy"] = accuracy(adv["pred_substitute_clean"] == yc)
                row["undefended_clean"] = accuracy(adv["pred_clean"] == yc)
                row["protocol"] = self._blackbox_protocol(self._blackbox_substitute()[1])
            if cell.threat == "transfer":
                row["substitute_accuracy"] = accuracy(adv["pred_substitute"] == yc)
                row["transfer_method"] = c.transfer_method
            if cell.threat == "oblivious" and cell.attack == "pgd":
                pgd_purified_correct[cell.eps] = pur["pred"] == yc
            if cell.attack in ("bpda-detect", "manifold"):
                row.update(self._evasion(cell, adv, pur, x0, yc, threshold))
            if cell.threat == "adaptive" and cell.attack != "manifold":
                row["settings"] = {"pgd_steps": c.adaptive_steps, "eot_samples": c.eot_samples,
                                   "projection_in_attack": asdict(self.pcfg) | {"seed": "fresh per step"}}
                if cell.attack == "bpda-detect":
                    row["settings"] |= {"lambda": cell.extra["lambda"], "kappa": c.detect_kappa,
                                        "lambda_units": "reconstruction error / card threshold",
                                        "error_gradient": "exact, z* held constant: 2 (x' - G(z*)) / (D * thr)",
                                        "select": "per image, the iterate whose EOT draws were most often "
                                                  "misclassified and under the threshold (ties: later)"}
                if cell.eps in pgd_purified_correct and cell.attack == "bpda":  # same images under the oblivious attack
                    row["oblivious_pgd_same_images"] = accuracy(pgd_purified_correct[cell.eps][: cell.n])
            row["roc"] = {"fpr": _round(fpr), "tpr": _round(tpr)}
            results["cells"].append(row)
            label = _label(row)
            artifacts["roc"][label] = (fpr, tpr, row["detection"]["auc"])
            artifacts["grids"][label] = (x0[:k], adv["x"][:k], _from_uint8(pur["image"][:k]))

        results["sweeps"] = self._sweeps()
        results["settings"] = self.settings()
        results["fingerprint"] = self.fingerprint
        results["wall_seconds_this_run"] = time.time() - t_start
        return results, artifacts

    def _evasion(self, cell: Cell, adv: dict, pur: dict, x0: torch.Tensor, yc: torch.Tensor,
                 threshold: float | None) -> dict:
        """The detection-aware rows' extra numbers: the error in threshold units, and the share of
        attacks that succeed (purified prediction wrong) *and* are not flagged, over all n and
        over the successful ones; for the on-manifold attack, its distance to x too."""
        if threshold is None:
            raise ConfigError(f"{cell.attack} needs the detector's threshold: the model card has none "
                              f"(run `purifier calibrate`)")
        wrong = pur["pred"] != yc
        evaded = wrong & (pur["error"] <= threshold)
        out = {"lambda": cell.extra.get("lambda"),
               "error_over_threshold": _summary((pur["error"] / threshold).numpy()),
               "evasion": {"succeeded_and_not_flagged": accuracy(evaded),
                           "not_flagged_among_succeeded": accuracy(evaded[wrong]) if wrong.any() else None}}
        if cell.attack == "manifold":
            c = self.cfg
            dist = (adv["x"] - x0).flatten(1)
            linf = dist.abs().amax(1)
            out["distance"] = {"linf": _summary(linf.numpy()), "l2": _summary(dist.norm(dim=1).numpy())}
            out["within_eps"] = {f"{e:g}": {"within": accuracy(linf <= e + 1e-6),
                                            "within_and_evaded": accuracy((linf <= e + 1e-6) & evaded)}
                                 for e in c.eps}
            out["settings"] = {"steps": c.manifold_steps, "search_steps": c.manifold_search_steps,
                               "kappa": c.detect_kappa, "lr": 0.05, "initial_const": 1.0,
                               "start": "z* of the defense's projection of x (same preset)",
                               "submitted": "G(z) itself, clipped to [0, 1]"}
        return out

    def _sweeps(self) -> dict:
        c = self.cfg
        if not c.sweep_l and not c.sweep_r:
            return {}
        m = min(c.sweep_n, self.n)
        attack = c.sweep_attack
        name = self._cell_name("oblivious", attack, c.sweep_eps)
        # The adversarial set of the main run when it has it (a prefix of its images).
        adv = self._adversarial(name, self.n if (attack in c.attacks and c.sweep_eps in c.eps) else m,
                                c.batch_size, self._attack_fn(attack, c.sweep_eps, self.bundle.classifier))
        sets = {"clean": self.x[:m], f"{attack}-eps{c.sweep_eps:g}": adv["x"][:m]}
        y = self.y[:m]
        out = {"n": m, "attack": attack, "eps": c.sweep_eps, "L": [], "R": []}
        for axis, values in (("L", c.sweep_l), ("R", c.sweep_r)):
            for v in values:
                pc = preset(self.pcfg, steps=v) if axis == "L" else preset(self.pcfg, restarts=v)
                self.log(f"sweep {axis}={v} on {m} images")
                point = {"value": v, "projection": asdict(pc)}
                for set_name, x in sets.items():
                    pur = self._purified(f"sweep{m}-{set_name}", x, pc)
                    point[set_name] = accuracy(pur["pred"] == y)
                    point[set_name]["seconds"] = pur["seconds"]
                out[axis].append(point)
        return out

    def settings(self) -> dict:
        return {"eval": asdict(self.cfg), "projection": asdict(self.pcfg), "dataset": self.dataset,
                "data_source": self.data_source, "split": "test",
                "model_card_dataset": self.bundle.card.get("dataset"),
                "substitute": str(self.substitute_path) if self.substitute_path else None,
                "substitute_arch": (self.substitute.config if self.substitute is not None else None),
                "classifier_arch": self.bundle.classifier.config,
                "generator_arch": self.bundle.generator.config,
                "encoder": self.bundle.encoder is not None}


def _summary(a: np.ndarray) -> dict:
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p95": float(np.quantile(a, 0.95))}


def _round(a: np.ndarray) -> list[float]:
    return [round(float(v), 5) for v in a]


def _from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def _label(row: dict) -> str:
    name = {"oblivious": "", "transfer": "transfer ", "adaptive": "adaptive ", "blackbox": "black-box "}[row["threat"]]
    name += {"bpda": "BPDA+EOT PGD", "bpda-detect": "detection-aware BPDA+EOT PGD",
             "manifold": "on-manifold"}.get(row["attack"], row["attack"].upper())
    name += f" lambda={row['lambda']:g}" if row.get("lambda") is not None else ""
    return name + (f" eps={row['eps']:g}" if row["eps"] is not None else "")


def run_evaluation(cfg: EvalConfig, resume: bool = False, progress: bool = True, log=print,
                   oracle=None) -> dict:
    """Run the evaluation and write results.json, results.md and figures/ into cfg.out_dir
    (``oracle``: see :class:`Evaluation`)."""
    from . import report

    ev = Evaluation(cfg, resume=resume, progress=progress, log=log, oracle=oracle)
    results, artifacts = ev.run()
    results["command"] = cfg.command()
    results["environment"] = report.environment(cfg.device)
    results["seed"] = cfg.seed
    report.write_report(results, artifacts, Path(cfg.out_dir))
    return results
