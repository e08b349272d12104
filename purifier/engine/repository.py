"""Several models in one server: each requested (downstream) model name is purified by its own
generator, with its own projection defaults, threshold and flagged-input policy.

- :class:`ServedModel`: one model of the repository. Loaded, it holds its :class:`Engine`, its
  own :class:`Batcher` (so a batch never mixes generators) and its :class:`Policy`; failed, it
  holds why (``error``), and every request for it is refused with that reason while the
  other models serve.
- :class:`Repository`: the models by name and the default one, which purifies for every name
  that is not listed (one model and no list is the single-model server of before).

No gRPC: the server's data plane asks ``Repository.for_name`` / ``Repository.named``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelUnavailableError, NotFoundError
from ..policy import Policy
from .batching import Batcher
from .engine import Engine, Limits


@dataclass
class ServedModel:
    name: str                       # its name in the repository (what requests name)
    model_dir: str
    downstream_name: str = ""       # the name the downstream serves it under ("" -> the requested name)
    engine: Engine | None = None
    batcher: Batcher | None = None
    policy: Policy | None = None
    error: str | None = None        # why it cannot serve (failed to load or to warm up)
    exception: BaseException | None = None
    warm: bool = False              # a warm-up batch ran
    metrics: object = None          # its model-labelled metrics (``Metrics.for_model``), or None

    @classmethod
    def load(cls, name: str, model_dir: str, device, projection: str, limits: Limits, cuda_graphs: str,
             on_flagged: str, threshold: float | None, downstream_name: str = "") -> "ServedModel":
        """Load the weights and build the policy; a failure is kept (``error``), not raised, so
        one bad directory does not take the other models down. Runs in the projection thread."""
        served = cls(name, str(model_dir), downstream_name)
        try:
            served.engine = Engine.load(model_dir, device, projection, limits, cuda_graphs)
            served.policy = Policy.build(on_flagged, threshold, served.engine.threshold)
        except Exception as exc:  # noqa: BLE001 - reported per model; the server decides what it means
            served.fail(exc)
        return served

    def fail(self, exc: BaseException) -> None:
        self.engine = self.batcher = self.policy = None
        self.exception = exc
        self.error = f"{type(exc).__name__}: {exc}"

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    @property
    def ready(self) -> bool:
        return self.loaded and self.warm

    def forward_name(self, requested: str) -> str:
        """The downstream model a request for ``requested`` goes to."""
        return self.downstream_name or requested

    def check(self) -> "ServedModel":
        """Itself when it can take requests; else ModelUnavailableError naming it and why."""
        if self.error is not None:
            raise ModelUnavailableError(f"model {self.name!r} ({self.model_dir}) failed to load: {self.error}")
        if not self.loaded:
            raise ModelUnavailableError(f"model {self.name!r} is still loading")
        return self


class Repository:
    def __init__(self, models: dict[str, ServedModel] | list[ServedModel], default: str):
        self.models = dict(models) if isinstance(models, dict) else {m.name: m for m in models}
        if default not in self.models:
            raise KeyError(f"default model {default!r} is not among {sorted(self.models)}")
        self.default_name = default

    @classmethod
    def single(cls, engine: Engine, batcher: Batcher, policy: Policy | None = None,
               name: str = "default", metrics=None) -> "Repository":
        """One loaded model that purifies for every name (a notebook's, a test's); ``metrics``:
        its model-labelled view, as its batcher records."""
        served = ServedModel(name, str(engine.bundle.path), engine=engine, batcher=batcher,
                             policy=policy or Policy.build(card_threshold=engine.threshold), warm=True,
                             metrics=metrics)
        return cls([served], name)

    @property
    def default(self) -> ServedModel:
        return self.models[self.default_name]

    def __iter__(self):
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def listed(self, name: str) -> bool:
        return name in self.models

    def for_name(self, requested: str) -> ServedModel:
        """The model that purifies for a requested (downstream) model name: the one listed under
        that name, else the default."""
        return self.models.get(requested) or self.default

    def named(self, name: str | None) -> ServedModel:
        """The model a purify-only request asks for by its repository name ("" or None: the
        default); an unknown name is NOT_FOUND, listing the names there are."""
        if not name:
            return self.default
        if name not in self.models:
            raise NotFoundError(f"no model {name!r} in this server's repository; it has {sorted(self.models)}")
        return self.models[name]
