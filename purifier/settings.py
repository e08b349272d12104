"""Settings of ``purifier serve`` and ``purifier serve-classifier``: frozen dataclasses built
once from CLI flags and ``PURIFIER_*`` environment variables, validated when built.

Precedence: a flag on the command line, else ``PURIFIER_<NAME>`` (the flag's name in upper
case, ``-`` as ``_``: ``--max-batch-size`` -> ``PURIFIER_MAX_BATCH_SIZE``), else the default.
KServe's transformer flags (``--model_name``, ``--predictor_host``, ``--grpc_port``,
``--http_port``) are accepted as spellings of ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError
from .policy import POLICIES

PROJECTIONS = ("paper", "fast", "fast-precise")   # projection.PRESETS a server takes (settings stay torch-free)
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MODEL = Path("models") / "fashion-mnist"


def default_model_dir() -> str:
    """The shipped Fashion-MNIST model: beside the package in a checkout (or the image),
    else under the working directory."""
    repo = Path(__file__).resolve().parent.parent
    for candidate in (repo / DEFAULT_MODEL, Path.cwd() / DEFAULT_MODEL):
        if candidate.is_dir():
            return str(candidate)
    return str(repo / DEFAULT_MODEL)


DEFAULT_ENTRY = "default"     # the repository name of the --model-dir model
RESERVED_NAMES = ("purifier",)  # V2 model ``purifier`` is purifier's own, never a pass-through name
SPEC_KEYS = ("dir", "projection", "threshold", "on_flagged", "downstream_name")


@dataclass(frozen=True)
class ModelSpec:
    """One model of ``purifier serve``'s repository: the generator (and encoder, card) in
    ``model_dir`` purifies every request that names ``name``. Unset ``projection`` and
    ``on_flagged`` take the server's flags; an unset ``threshold`` is the model card's (the
    --threshold flag belongs to the --model-dir model alone: a threshold fits one generator)."""
    name: str
    model_dir: str
    projection: str | None = None
    threshold: float | None = None
    on_flagged: str | None = None
    downstream_name: str = ""   # the name the downstream serves it under; "" -> name

    def problems(self) -> list[str]:
        where = f"model {self.name!r}"
        out = []
        if not self.name or self.name.strip() != self.name or "," in self.name or "=" in self.name:
            out.append(f"model name {self.name!r}: use a non-empty name without spaces, ',' or '='")
        if self.name in RESERVED_NAMES:
            out.append(f"model name {self.name!r} is purifier's own V2 model; name the entry after the "
                       "downstream model it purifies for")
        if not self.model_dir:
            out.append(f"{where}: give its directory (\"dir\")")
        if self.projection is not None and self.projection not in PROJECTIONS:
            out.append(f"{where}: projection {self.projection!r}: choose one of {', '.join(PROJECTIONS)}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and not isinstance(self.threshold, bool)
                                               and math.isfinite(self.threshold) and self.threshold >= 0):
            out.append(f"{where}: threshold {self.threshold!r}: give a reconstruction error >= 0")
        if self.on_flagged is not None and self.on_flagged not in POLICIES:
            out.append(f"{where}: on_flagged {self.on_flagged!r}: choose one of {', '.join(POLICIES)}")
        if not isinstance(self.downstream_name, str):
            out.append(f"{where}: downstream_name must be a string")
        return out


def read_model_config(path: str) -> tuple[str | None, dict[str, ModelSpec]]:
    """A repository file (JSON) -> (its default model's name or None, specs by name). Relative
    directories are read from the file's folder. The format::

        {"default": "fashion-mnist",
         "models": {"fashion-mnist": {"dir": "models/fashion-mnist"},
                    "shapes": {"dir": "runs/shapes", "projection": "fast", "threshold": 0.02,
                               "on_flagged": "reject", "downstream_name": "shapes-resnet"}}}
    """
    file = Path(path)
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--model-config {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model-config {path}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models", {}), dict):
        raise ConfigError(f'--model-config {path}: expected {{"default": NAME, "models": {{NAME: {{"dir": DIR, '
                          '...}}}}}}')
    unknown = sorted(set(doc) - {"default", "models"})
    if unknown:
        raise ConfigError(f"--model-config {path}: unknown keys {unknown}; use default and models")
    default = doc.get("default")
    if default is not None and not isinstance(default, str):
        raise ConfigError(f"--model-config {path}: default must be a model name, got {default!r}")
    specs = {}
    for name, entry in doc.get("models", {}).items():
        if isinstance(entry, str):
            entry = {"dir": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"--model-config {path}: model {name!r} must be an object with \"dir\"")
        unknown = sorted(set(entry) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"--model-config {path}: model {name!r} has unknown keys {unknown}; use "
                              f"{', '.join(SPEC_KEYS)}")
        d = entry.get("dir") or ""
        if d and not Path(d).is_absolute():
            d = str(file.parent / d)
        specs[name] = ModelSpec(name, d, entry.get("projection"), entry.get("threshold"), entry.get("on_flagged"),
                                entry.get("downstream_name") or "")
    return default, specs


@dataclass(frozen=True)
class ServeSettings:
    model_dir: str = ""  # "" -> default_model_dir(); the default model (repository name "default")
    model_config: str | None = None   # a repository file (JSON): several models, chosen by name
    model: tuple[str, ...] = ()       # NAME=DIR: a model for requests naming NAME (beside the config's)
    host: str = "0.0.0.0"
    grpc_port: int = 8081
    http_port: int | None = None
    metrics_port: int = 8082  # 0: any free port; -1: no metrics server
    downstream: str = "localhost:8001"  # "" or "none": no downstream (Classify/pass-through: NOT_FOUND)
    model_name: str = "classifier"
    device: str | None = None
    threads: int | None = None
    max_batch_size: int = 64
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256
    max_steps: int = 1000
    max_restarts: int = 20
    max_compute: int = 128_000  # latent-steps per request, pruning counted (a full batch at L=200, R=10)
    max_decode_bytes: int = 8 * 1024 * 1024  # encoded PNG/JPEG bytes per request
    decode_threads: int = 2   # threads decoding PNG/JPEG files, off the event loop
    projection: str = "fast"   # the shipped thresholds are calibrated for it; see docs/results.md
    cuda_graphs: str = "auto"  # auto: on for CUDA devices (whole-search CUDA graphs per batch bucket)
    max_message_bytes: int = 16 * 1024 * 1024
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    grace_seconds: float = 30.0
    log_level: str = "info"
    downstream_timeout_s: float = 30.0  # when the caller sent no deadline
    downstream_retries: int = 3
    downstream_unready_seconds: float = 10.0  # unreachable this long: NOT_SERVING (0: readiness ignores it)
    downstream_probe_seconds: float = 2.0     # how often readiness probes the downstream (ServerReady)
    on_flagged: str = "forward"  # what a flagged image does: forward (and flag) or reject the request
    threshold: float | None = None  # detection threshold; None: the model card's
    # Built from model_dir, model_config and model (see repository()): every served model, and
    # the name of the one that purifies for names not listed.
    models: tuple[ModelSpec, ...] = field(init=False, default=())
    default_model: str = field(init=False, default=DEFAULT_ENTRY)

    def __post_init__(self):
        problems = self._repository()
        if self.default_model == DEFAULT_ENTRY and DEFAULT_ENTRY not in {m.name for m in self.models}:
            # the --model-dir model (the shipped one unless given) purifies for every name not listed;
            # model_dir stays "" when the config names another default (dataclasses.replace works)
            if not self.model_dir:
                object.__setattr__(self, "model_dir", default_model_dir())
            object.__setattr__(self, "models", (ModelSpec(DEFAULT_ENTRY, self.model_dir, threshold=self.threshold),
                                                *self.models))
        elif self.threshold is not None:
            problems.append(f"--threshold {self.threshold}: it sets the --model-dir model's threshold, and the default "
                            f"model here is {self.default_model!r} of the repository; give each model its "
                            "\"threshold\" in --model-config")
        if self.downstream.lower() == "none":
            object.__setattr__(self, "downstream", "")
        for name in ("grpc_port", "http_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                problems.append(f"--{name.replace('_', '-')} {v}: use a port in 0..65535 (0 picks a free one)")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"--metrics-port {self.metrics_port}: use 0..65535, or -1 to turn metrics off")
        positive = dict(max_batch_size="--max-batch-size", max_queue_size="--max-queue-size",
                        max_steps="--max-steps", max_restarts="--max-restarts",
                        max_message_bytes="--max-message-bytes", max_compute="--max-compute",
                        max_decode_bytes="--max-decode-bytes", decode_threads="--decode-threads")
        for name, flag in positive.items():
            if getattr(self, name) < 1:
                problems.append(f"{flag} {getattr(self, name)}: must be at least 1")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads {self.threads}: must be at least 1 (or unset for torch's default)")
        if self.max_queue_delay_ms < 0:
            problems.append(f"--max-queue-delay-ms {self.max_queue_delay_ms}: must be >= 0 (0: no waiting)")
        if self.grace_seconds < 0:
            problems.append(f"--grace-seconds {self.grace_seconds}: must be >= 0")
        if self.downstream_retries < 0 or self.downstream_timeout_s <= 0:
            problems.append("downstream retries must be >= 0 and its timeout > 0")
        if not (math.isfinite(self.downstream_unready_seconds) and self.downstream_unready_seconds >= 0):
            problems.append(f"--downstream-unready-seconds {self.downstream_unready_seconds}: must be >= 0 "
                            "(0: readiness does not depend on the downstream)")
        if not (math.isfinite(self.downstream_probe_seconds) and self.downstream_probe_seconds > 0):
            problems.append(f"--downstream-probe-seconds {self.downstream_probe_seconds}: must be > 0")
        if self.projection not in PROJECTIONS:
            problems.append(f"--projection {self.projection!r}: choose one of {', '.join(PROJECTIONS)}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            problems.append(f"--cuda-graphs {self.cuda_graphs!r}: choose one of auto, on, off")
        if self.on_flagged not in POLICIES:
            problems.append(f"--on-flagged {self.on_flagged!r}: choose one of {', '.join(POLICIES)}")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            problems.append(f"--threshold {self.threshold}: give a reconstruction error >= 0 "
                            "(or leave it unset for the model card's)")
        if self.log_level.lower() not in LOG_LEVELS:
            problems.append(f"--log-level {self.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
        if self.downstream and ":" not in self.downstream:
            # KServe passes --predictor_host as '<isvc>-predictor.<namespace>' with no port;
            # its predictor Service listens on 80.
            object.__setattr__(self, "downstream", f"{self.downstream}:80")
        if self.downstream and not self.downstream.rsplit(":", 1)[1].isdigit():
            problems.append(f"--downstream {self.downstream!r}: give host:port (for example localhost:8001), "
                            "or 'none' for no downstream")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("TLS needs both --tls-cert and --tls-key (or neither for plaintext)")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("--tls-client-ca (mTLS) needs --tls-cert and --tls-key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                problems.append(f"--{name.replace('_', '-')} {path}: no such file")
        if problems:
            raise ConfigError("bad settings: " + "; ".join(problems))

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def several_models(self) -> bool:
        return len(self.models) > 1

    def _repository(self) -> list[str]:
        """Fill ``models`` and ``default_model`` from --model-config and --model NAME=DIR; the
        --model-dir model joins as ``default`` unless the config names another default.
        Returns the problems found (the caller reports them with the others)."""
        problems: list[str] = []
        default, specs = (None, {})
        if self.model_config:
            default, specs = read_model_config(self.model_config)
        for item in self.model:
            name, sep, d = item.partition("=")
            if not sep or not name or not d:
                problems.append(f"--model {item!r}: give NAME=DIR (for example shapes=runs/shapes/model)")
                continue
            old = specs.get(name)
            specs[name] = ModelSpec(name, d) if old is None else ModelSpec(
                name, d, old.projection, old.threshold, old.on_flagged, old.downstream_name)
        for spec in specs.values():
            problems += spec.problems()
        if default is not None:
            if default not in specs:
                problems.append(f"--model-config: default {default!r} is not among its models "
                                f"{sorted(specs)}; name one of them, or leave default out for --model-dir's")
            elif self.model_dir:
                problems.append(f"--model-dir {self.model_dir} and the config's default {default!r} both name "
                                "the default model: give one")
        object.__setattr__(self, "models", tuple(specs.values()))
        object.__setattr__(self, "default_model", default or DEFAULT_ENTRY)
        return problems


@dataclass(frozen=True)
class ClassifierSettings:
    model_dir: str = ""
    host: str = "0.0.0.0"
    port: int = 8001
    model_name: str = "classifier"
    device: str | None = None

    def __post_init__(self):
        if not self.model_dir:
            object.__setattr__(self, "model_dir", default_model_dir())
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"bad settings: --port {self.port}: use a port in 0..65535 (0 picks a free one)")
        if not self.model_name:
            raise ConfigError("bad settings: --model-name must not be empty")


# flag -> (dest, type, help, extra spellings). Defaults come from the dataclass.
_SERVE_FLAGS = [
    ("--model-dir", str, "model directory (the shipped model by default): the default model, which purifies "
                         "for every requested name not listed by --model/--model-config", []),
    ("--model-config", str, "a model repository file (JSON): {\"default\": NAME, \"models\": {NAME: {\"dir\": DIR, "
                            "\"projection\", \"threshold\", \"on_flagged\", \"downstream_name\"}}}; each requested "
                            "(downstream) model name is purified by its own model (docs/service.md)", []),
    ("--model", list, "NAME=DIR, repeatable: requests naming NAME are purified with the model in DIR "
                      "(environment: comma-separated)", []),
    ("--host", str, "address to bind", []),
    ("--grpc-port", int, "gRPC port (purifier.v1, KServe V2, health, reflection)", ["--grpc_port"]),
    ("--http-port", int, "serve the V2 REST API (KServe V2 / Triton HTTP) on this port too; unset: no REST "
                         "(KServe passes 8080 to transformers)", ["--http_port"]),
    ("--metrics-port", int, "Prometheus metrics HTTP port (0: any free port; -1: off)", []),
    ("--downstream", str, "downstream V2 gRPC server host:port ('none': no downstream)", ["--predictor_host", "--predictor-host"]),
    ("--model-name", str, "downstream model that Classify calls; also answered as ready/metadata by "
                          "forwarding (KServe: the InferenceService name)", ["--model_name"]),
    ("--device", str, "torch device (default: cuda when available, else cpu)", []),
    ("--threads", int, "CPU threads for torch", []),
    ("--max-batch-size", int, "most images in one projection batch (and in one request)", []),
    ("--max-queue-delay-ms", float, "longest a request waits for others to share its batch", []),
    ("--max-queue-size", int, "requests waiting beyond this are refused at once with UNAVAILABLE", []),
    ("--max-steps", int, "cap on a request's steps L (above: INVALID_ARGUMENT)", []),
    ("--max-restarts", int, "cap on a request's restarts R (above: INVALID_ARGUMENT)", []),
    ("--max-compute", int, "cap on a request's latent-steps: images x steps x restarts, restarts a "
                           "pruning drops counted until it drops them (above: INVALID_ARGUMENT, "
                           "before it queues)", []),
    ("--max-decode-bytes", int, "cap on the PNG/JPEG bytes of one request (above: INVALID_ARGUMENT, "
                                "before decoding)", []),
    ("--decode-threads", int, "threads that decode requests (PNG/JPEG files) off the event loop", []),
    ("--projection", str, "server default projection preset: paper (L=200, R=10) or fast", []),
    ("--cuda-graphs", str, "auto (on for CUDA), on or off: replay the default projection as one "
                           "CUDA graph per batch-size bucket (1, 2, 4, ... up to --max-batch-size)", []),
    ("--max-message-bytes", int, "largest gRPC message received or sent (above: RESOURCE_EXHAUSTED)", []),
    ("--tls-cert", str, "PEM server certificate (enables TLS)", []),
    ("--tls-key", str, "PEM server private key", []),
    ("--tls-client-ca", str, "PEM CA bundle; when set, clients must present a certificate (mTLS)", []),
    ("--grace-seconds", float, "on SIGTERM: NOT_SERVING, then drain for at most this long", []),
    ("--log-level", str, "debug, info, warning or error", []),
    ("--downstream-unready-seconds", float, "readiness (health, ServerReady) turns NOT_SERVING once the "
                                            "downstream has been unreachable this long, and back when it "
                                            "answers (0: readiness ignores the downstream)", []),
    ("--downstream-probe-seconds", float, "how often readiness probes the downstream (ServerReady)", []),
    ("--on-flagged", str, "what an image flagged adversarial does: forward (purify, forward, flag it in "
                          "the answer) or reject (the whole request fails with FAILED_PRECONDITION; "
                          "nothing is forwarded). Requests may ask only for a stricter policy", []),
    ("--threshold", float, "detection threshold on the reconstruction error of the --model-dir model, overriding its "
                         "card's (see `purifier calibrate --target-fpr`)", []),
]

_CLASSIFIER_FLAGS = [
    ("--model-dir", str, "model directory holding classifier.safetensors", []),
    ("--host", str, "address to bind", []),
    ("--port", int, "gRPC port (KServe V2)", []),
    ("--model-name", str, "name the classifier is served under", []),
    ("--device", str, "torch device (default: cuda when available, else cpu)", []),
]


def _env_name(flag: str) -> str:
    return "PURIFIER_" + flag.lstrip("-").replace("-", "_").upper()


def _add(p: argparse.ArgumentParser, flags, cls) -> None:
    defaults = {f.name: f.default for f in fields(cls)}
    for flag, typ, help_, aliases in flags:
        dest = flag.lstrip("-").replace("-", "_")
        shown = str(DEFAULT_MODEL) if dest == "model_dir" else defaults.get(dest)
        kind = dict(action="append") if typ is list else dict(type=typ)   # list: a repeatable string
        p.add_argument(flag, *aliases, dest=dest, default=None, **kind,
                       help=f"{help_} [env {_env_name(flag)}; default {shown!r}]")


def _build(cls, flags, args, environ) -> object:
    environ = os.environ if environ is None else environ
    types = {flag.lstrip("-").replace("-", "_"): (flag, typ) for flag, typ, _, _ in flags}
    values = {}
    for dest, (flag, typ) in types.items():
        value = getattr(args, dest, None)
        if value is None and environ.get(_env_name(flag)) not in (None, ""):
            raw = environ[_env_name(flag)]
            try:
                value = [v.strip() for v in raw.split(",") if v.strip()] if typ is list else typ(raw)
            except ValueError:
                kind = {int: "an integer", float: "a number"}.get(typ, "a string")
                raise ConfigError(f"bad settings: {_env_name(flag)}={raw!r}: expected {kind}") from None
        if value is not None:
            values[dest] = tuple(value) if typ is list else value
    return cls(**values)


# The other flags of KServe's Python model server (kserve.model_server), which KServe appends to a
# transformer's args (`--workers` with containerConcurrency, `--protocol` for ModelMesh) or its docs
# write into them (`--protocol grpc-v2`). purifier has no use for them; it accepts them, value or
# not, and `purifier serve` logs them, so a pod KServe starts does not die on a usage error.
# Any other unknown flag stays an error: a typo in one of purifier's flags must not pass silently.
KSERVE_IGNORED_FLAGS = (
    "--protocol", "--predictor_protocol", "--workers", "--max_threads", "--max_asyncio_workers",
    "--enable_grpc", "--enable_docs_url", "--enable_latency_logging", "--configure_logging",
    "--log_config_file", "--access_log_format", "--predictor_use_ssl",
    "--predictor_request_timeout_seconds", "--predictor_request_retries",
    "--grpc_max_send_message_length", "--grpc_max_receive_message_length",
    "--enable_predictor_health_check",
)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    _add(p, _SERVE_FLAGS, ServeSettings)
    for flag in KSERVE_IGNORED_FLAGS:
        p.add_argument(flag, dest="kserve" + flag.replace("-", "_"), nargs="?", const="", default=None,
                       help=argparse.SUPPRESS)


def kserve_ignored(args: argparse.Namespace) -> dict[str, str]:
    """The KSERVE_IGNORED_FLAGS given on the command line, flag -> value ("" for a bare flag)."""
    given = {flag: getattr(args, "kserve" + flag.replace("-", "_"), None) for flag in KSERVE_IGNORED_FLAGS}
    return {flag: value for flag, value in given.items() if value is not None}


def serve_settings(args: argparse.Namespace | None = None, environ=None) -> ServeSettings:
    return _build(ServeSettings, _SERVE_FLAGS, args or argparse.Namespace(), environ)


def add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    _add(p, _CLASSIFIER_FLAGS, ClassifierSettings)


def classifier_settings(args: argparse.Namespace | None = None, environ=None) -> ClassifierSettings:
    return _build(ClassifierSettings, _CLASSIFIER_FLAGS, args or argparse.Namespace(), environ)
