"""What happens to an input the detector flags: the server's policy and a request's choice.

An image is *flagged* when its reconstruction error is above the threshold (the rule of
``detection``: ``error > threshold``). The threshold is the model card's
(``detection.threshold``, written by ``purifier calibrate``) unless the server overrides it
(``--threshold``). What follows a flag is the policy:

- ``forward``: purify, forward the purified images downstream, and flag them in the answer
  (the caller decides what a flag means);
- ``reject``: the request fails as a whole with :class:`~purifier.errors.FlaggedInputError`
  (gRPC FAILED_PRECONDITION), whose message names every flagged image, its error and the
  threshold; nothing of it is forwarded. The batch rule is "one flagged image rejects the
  whole request": a caller that wants the rest resends them without the named indices.

A request may ask for a policy, but only a stricter one than the server's: an attacker writes
its own requests, so a server that rejects must not be talked into forwarding. ``forward`` on
a ``reject`` server is refused (INVALID_ARGUMENT); ``reject`` on a ``forward`` server is
honoured (on a server with a threshold); an empty choice takes the server's.

No gRPC here: the data plane asks a :class:`Policy`, a notebook can too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, FlaggedInputError, InvalidInputError

POLICIES = ("forward", "reject")   # from the most lenient to the strictest
REASON_FLAGGED = "flagged"         # the metrics' reason for a rejection by this policy


@dataclass(frozen=True)
class Policy:
    on_flagged: str = "forward"
    threshold: float | None = None   # None: no threshold, nothing is ever flagged

    def __post_init__(self):
        if self.on_flagged not in POLICIES:
            raise ConfigError(f"--on-flagged {self.on_flagged!r}: choose one of {', '.join(POLICIES)}")
        if self.on_flagged == "reject" and self.threshold is None:
            raise ConfigError("--on-flagged reject needs a detection threshold: calibrate the model "
                              "(purifier calibrate MODEL_DIR) or pass --threshold")

    @classmethod
    def build(cls, on_flagged: str = "forward", threshold: float | None = None,
              card_threshold: float | None = None) -> "Policy":
        """The server's policy: ``threshold`` (an operator's override) wins over the card's."""
        return cls(on_flagged, card_threshold if threshold is None else float(threshold))

    def for_request(self, requested: str | None) -> "Policy":
        """The policy for one request that asked for ``requested`` ("" or None: the server's)."""
        if not requested or requested == self.on_flagged:
            return self
        if requested not in POLICIES:
            raise InvalidInputError(f"unknown flagged-input policy {requested!r}: choose one of "
                                    f"{', '.join(POLICIES)}, or leave it empty for the server's")
        if POLICIES.index(requested) < POLICIES.index(self.on_flagged):
            raise InvalidInputError(f"this server rejects flagged inputs; a request may not ask to "
                                    f"{requested} them (a request may only ask for a stricter policy)")
        if self.threshold is None:
            raise InvalidInputError("this server has no detection threshold (its model card has none and no "
                                    "--threshold is set), so it cannot reject flagged inputs")
        return Policy(requested, self.threshold)

    def flags(self, errors) -> np.ndarray:
        """(B,) bool: reconstruction error above the threshold (all False without one)."""
        errors = np.asarray(errors)
        if self.threshold is None:
            return np.zeros(len(errors), dtype=bool)
        return errors > self.threshold

    def check(self, errors, flags) -> None:
        """Raise :class:`FlaggedInputError` when this policy rejects and any image is flagged."""
        flags = np.asarray(flags, dtype=bool)
        if self.on_flagged != "reject" or not flags.any():
            return
        errors = np.asarray(errors, dtype=np.float64)
        idx = np.flatnonzero(flags)
        named = ", ".join(f"image {i} error {errors[i]:.6g}" for i in idx)
        raise FlaggedInputError(
            f"rejected: {len(idx)} of {len(flags)} images flagged adversarial (reconstruction error above "
            f"the threshold {self.threshold:.6g}): {named}; nothing was forwarded (policy reject: one "
            "flagged image rejects the whole request)", idx, errors[idx], self.threshold)
