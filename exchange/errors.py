"""One error hierarchy for the whole product.

Every refusal or failure a caller can see is one of these. They carry no
rendering: the web layer turns them into an ``OperationOutcome`` (FHIR routes)
or a JSON error (DICOMweb and the rest) in one place, and the CLI turns them
into one line on stderr and an exit code.
"""

from __future__ import annotations

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
