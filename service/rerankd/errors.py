"""One error hierarchy for the whole service.

Stages and the pipeline raise these; the gRPC transport maps them to status codes with one
table (``rerankd.server.STATUS_FOR``). Nothing below the transport knows about gRPC.
"""

from __future__ import annotations


class RerankdError(Exception):
    """Base class of every error the service reports to a caller."""


class InvalidArgument(RerankdError):
    """Bad input. ``field`` names the offending request field (e.g. ``items[3].id``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class Overloaded(RerankdError):
    """Admission refused: a queue or concurrency limit is full. Retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 0.05) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(RerankdError):
    """The service is loading, warming or draining."""


class DeadlineExceeded(RerankdError):
    """The caller's deadline passed (or cannot be met) before the work finished."""


class Cancelled(RerankdError):
    """The caller cancelled the call."""


class BackendError(RerankdError):
    """A model backend failed while running a batch."""


class CommittedNotIndexed(BackendError):
    """A write was committed (durable) but updating the in-memory indexes failed; they are being
    rebuilt from the store. Counts as committed wherever a caller is told what is durable."""


class ConfigError(RerankdError):
    """Invalid configuration, missing model bundle, unknown backend, missing dependency."""
