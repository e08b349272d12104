"""The exceptions purifier raises. Each maps to one gRPC status, in one place
(``purifier.server.status``); the core library raises them without knowing gRPC."""


class PurifierError(Exception):
    """Base class for every error purifier raises on purpose."""


class InvalidInputError(PurifierError, ValueError):
    """The caller sent something we cannot purify (shape, dtype, range, NaN, size...)."""


class NotFoundError(PurifierError):
    """The named model does not exist."""


class ModelUnavailableError(PurifierError):
    """The named model is configured but cannot serve: it failed to load (the message says
    which directory and why) or has not finished warming up."""


class OverloadedError(PurifierError):
    """The request queue is full; retry later."""


class DeadlineError(PurifierError):
    """The caller's deadline passed, or is too short for the work asked."""


class MessageTooLargeError(PurifierError):
    """A message over the server's size limit (``--max-message-bytes``): a REST body, or an
    answer the server would send (gRPC refuses a request that large before any handler runs)."""


class DownstreamError(PurifierError):
    """The downstream classifier server failed or cannot be reached."""


class UnsupportedError(PurifierError):
    """The operation is not offered here (e.g. a downstream that does not implement Triton's
    ModelConfig); not retryable."""


class ModelLoadError(PurifierError):
    """A model directory or file is missing, malformed or inconsistent."""


class DataError(PurifierError):
    """A dataset is missing or its files are corrupt."""


class ConfigError(PurifierError, ValueError):
    """A setting has a bad value; the message says how to fix it."""


class FlaggedInputError(PurifierError):
    """The flagged-input policy is ``reject`` and the detector flagged images of the request:
    it fails as a whole and nothing is forwarded. ``indices`` are the flagged images (0-based,
    in request order), ``errors`` their reconstruction errors, ``threshold`` the one exceeded."""

    def __init__(self, message: str, indices=(), errors=(), threshold: float | None = None):
        super().__init__(message)
        self.indices = tuple(int(i) for i in indices)
        self.errors = tuple(float(e) for e in errors)
        self.threshold = threshold
