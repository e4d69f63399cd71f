"""One error hierarchy for the whole product.

Every refusal or failure a caller can see is one of these. They carry no
rendering: the web layer turns them into an ``OperationOutcome`` (FHIR routes)
or a JSON error (DICOMweb and the rest) in one place, and the CLI turns them
into one line on stderr and an exit code.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One problem, located by a FHIRPath ``expression`` where it concerns a resource."""

    diagnostics: str
    expression: str | None = None
    code: str = "invalid"
    severity: str = "error"


class ExchangeError(Exception):
    """Base of everything Exchange raises on purpose."""

    status: int = 500
    #: FHIR ``OperationOutcome.issue.code`` (IssueType value set).
    code: str = "exception"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        issues: list[Issue] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        #: Several located problems (validation); rendered one OperationOutcome.issue each.
        self.issues = issues or []


class ConfigurationError(ExchangeError):
    """A setting is missing or invalid; the process cannot start."""

    code = "invalid"


class BadRequest(ExchangeError):
    status = 400
    code = "invalid"


class NotAuthenticated(ExchangeError):
    """No usable credential. Always answered with ``WWW-Authenticate``."""

    status = 401
    code = "login"

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        challenge = f'Bearer realm="exchange", error="{error}", error_description="{message}"'
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ExchangeError):
    status = 403
    code = "forbidden"


class NotFound(ExchangeError):
    status = 404
    code = "not-found"


class MethodNotAllowed(ExchangeError):
    status = 405
    code = "not-supported"


class NotAcceptable(ExchangeError):
    """No representation the client accepts can be produced."""

    status = 406
    code = "not-supported"


class Conflict(ExchangeError):
    status = 409
    code = "conflict"


class Gone(ExchangeError):
    status = 410
    code = "deleted"


class PreconditionFailed(ExchangeError):
    status = 412
    code = "conflict"


class PayloadTooLarge(ExchangeError):
    status = 413
    code = "too-costly"


class UnsupportedMediaType(ExchangeError):
    status = 415
    code = "not-supported"


class Unprocessable(ExchangeError):
    """Well-formed but invalid content (FHIR validation failure)."""

    status = 422
    code = "processing"


class TooManyRequests(ExchangeError):
    status = 429
    code = "throttled"


class UpstreamError(ExchangeError):
    """A node or other upstream answered badly or not at all."""

    status = 502
    code = "transient"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "timeout"


class Unavailable(ExchangeError):
    """A dependency the answer needs (policy engine, database, audit) is down: fail closed."""

    status = 503
    code = "transient"


class AuditUnavailable(Unavailable):
    """The audit trail cannot be written: no audit, no access."""


class InsufficientStorage(Unavailable):
    """The data directory's file system (or database) is full: nothing was stored."""

    status = 507
    code = "transient"


class ReadOnlyStorage(Unavailable):
    """The data directory (or database) cannot be written: nothing was stored."""


#: errno values of a full file system (no space, quota) and of a read-only one.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS})
#: What SQLite and PostgreSQL say when they cannot write (matched on the driver's error).
_FULL_TEXTS = ("database or disk is full", "no space left on device", "disk full")
_READ_ONLY_TEXTS = ("readonly database", "read-only file system")
_FULL_SQLSTATES = frozenset({"53100"})  # PostgreSQL disk_full


def storage_failure(exc: BaseException) -> Unavailable | None:
    """The declared error for a write that failed because storage is full or read-only.

    An ``OSError`` (ENOSPC, EDQUOT, EROFS) or a database driver's error wrapped by
    SQLAlchemy (``exc.orig``); None for anything else. Lets the web layer answer 507 or
    503 with a plain message instead of a 500, and the CLI say the same in one line.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (InsufficientStorage, ReadOnlyStorage)):
            return current
        number = getattr(current, "errno", None)
        if isinstance(current, OSError) and number in _FULL_ERRNOS:
            return InsufficientStorage(STORAGE_FULL)
        if isinstance(current, OSError) and number in _READ_ONLY_ERRNOS:
            return ReadOnlyStorage(STORAGE_READ_ONLY)
        if getattr(current, "sqlstate", None) in _FULL_SQLSTATES:
            return InsufficientStorage(STORAGE_FULL)
        text = str(current).lower()
        if not isinstance(current, OSError):
            if any(t in text for t in _FULL_TEXTS):
                return InsufficientStorage(STORAGE_FULL)
            if any(t in text for t in _READ_ONLY_TEXTS):
                return ReadOnlyStorage(STORAGE_READ_ONLY)
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return None


STORAGE_FULL = "the server's storage is full; nothing was stored. Try again later"
STORAGE_READ_ONLY = "the server's data directory is read-only; nothing can be stored"
