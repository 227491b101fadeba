"""The server's exception tree, drawn once::

    ServerError                          status INTERNAL unless a subclass says otherwise
    ├── InvalidArgument                  INVALID_ARGUMENT  bad input; names the field
    ├── NotFound                         NOT_FOUND
    ├── AlreadyExists                    ALREADY_EXISTS
    ├── FailedPrecondition               FAILED_PRECONDITION
    ├── ResourceExhausted                RESOURCE_EXHAUSTED
    ├── Unauthenticated                  UNAUTHENTICATED   no key, or not a key for this
    ├── PermissionDenied                 PERMISSION_DENIED the key may not do this
    ├── ConfigError                      a configuration value is wrong (names key and source)
    ├── StorageError                     LMDB failed or the data folder is unusable
    │   └── SchemaError                  the data was written by an incompatible version
    └── ActorError                       UNAVAILABLE  the runtime could not serve the request
        ├── ActorCrashed                 the actor handling the request crashed mid-way
        ├── MailboxClosed                the actor is stopped
        └── RestartIntensityExceeded     a child crashed too often; escalates to the parent

Every error carries a canonical `Status`; the RPC layer sends it with the message (and the
offending field, when known) back to the caller. Errors from trio, lmdb and msgspec are
translated at the edge with ``raise New(...) from exc``.
"""

from __future__ import annotations

from protocols.errors import Status

__all__ = [
    "ServerError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "ConfigError",
    "StorageError",
    "SchemaError",
    "ActorError",
    "ActorCrashed",
    "MailboxClosed",
    "RestartIntensityExceeded",
]


class ServerError(Exception):
    """Root of the server's errors.

    Args:
        message: what went wrong, naming the offending field or value.
        field: a path to the offending field (``$.attributes.age``), when there is one.
    """

    status = Status.INTERNAL
    #: Milliseconds after which the call may be retried (sent as ``error.retry_after_ms``).
    retry_after_ms: int | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(ServerError):
    """The request is malformed or a value is out of range; the caller must fix it."""

    status = Status.INVALID_ARGUMENT


class NotFound(ServerError):
    """The profile, token or identity named in the request does not exist."""

    status = Status.NOT_FOUND


class AlreadyExists(ServerError):
    """The request would create something that exists (an identity owned by another profile)."""

    status = Status.ALREADY_EXISTS


class FailedPrecondition(ServerError):
    """The request is valid but not in the current state (unlinking the last identity)."""

    status = Status.FAILED_PRECONDITION


class ResourceExhausted(ServerError):
    """A limit on resources was hit (a mailbox is full, too many calls or connections).

    A value that is too large is an `InvalidArgument`: the caller must change it. With
    ``retry_after_ms``, the call did nothing and may be sent again after that long (the
    server is shedding load, `server.profiles.budget`).
    """

    status = Status.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, field: str | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_ms = retry_after_ms


class Unauthenticated(ServerError):
    """The connection has no key, or its key is not valid for what it asks (another sandbox)."""

    status = Status.UNAUTHENTICATED


class PermissionDenied(ServerError):
    """The connection's key may not do this (a scope it lacks, another sandbox's keys)."""

    status = Status.PERMISSION_DENIED


class ConfigError(ServerError):
    """A configuration value is missing or wrong; raised at start-up, names key and source."""

    status = Status.FAILED_PRECONDITION


class StorageError(ServerError):
    """The LMDB environment failed (disk full, permissions, corruption)."""


class SchemaError(StorageError):
    """The data folder holds a schema this version cannot read or migrate."""


class ActorError(ServerError):
    """The actor runtime could not serve the request; retrying later may succeed."""

    status = Status.UNAVAILABLE


class ActorCrashed(ActorError):
    """The actor crashed while the request was in its hands.

    Whether a write was applied is unknown (the crash may follow its commit): retry only
    writes that are safe to repeat.
    """


class MailboxClosed(ActorError):
    """The actor has stopped and takes no more messages."""


class RestartIntensityExceeded(ActorError):
    """A child crashed more than ``intensity`` times within ``period`` seconds.

    Raised by the supervisor so that its parent sees the failure (OTP escalation); at the root
    the process logs it and exits non-zero.
    """

    def __init__(self, child: str, crashes: int, period: float, last: BaseException | None) -> None:
        super().__init__(
            f"{crashes} crashes within {period:g}s, the last in actor {child!r}: {last!r}"
        )
        self.child = child
