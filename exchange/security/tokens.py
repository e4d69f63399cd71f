"""Bearer-token validation for tokens from the HIE's identity provider.

Tokens are JWTs checked with PyJWT: issuer from the trusted list, audience,
expiry/not-before with a small leeway, and an algorithm allow-list (no
``none``, no HMAC: a public key must never double as a shared secret).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
import jwt
from jwt import PyJWKClient

from exchange.errors import NotAuthenticated

ALLOWED_ALGORITHMS = ["RS256", "PS256", "ES256"]
LEEWAY_SECONDS = 30

Role = Literal["clinician", "operator", "patient", "system"]
ROLES: tuple[Role, ...] = ("clinician", "operator", "patient", "system")

#: Default SMART v2 scopes a development token gets for each role.
DEFAULT_SCOPES: dict[str, str] = {
    "clinician": "openid fhirUser user/ImagingStudy.rs user/Patient.rs user/Endpoint.rs "
    "user/Organization.rs user/Consent.crus",
    "operator": "openid fhirUser user/*.cruds",
    "patient": "openid fhirUser patient/ImagingStudy.rs patient/Patient.r patient/AuditEvent.rs",
    "system": "system/ImagingStudy.cruds system/Patient.cruds system/Endpoint.cruds "
    "system/Organization.rs",
}


@dataclass(frozen=True)
class Principal:
    """Who is asking, on whose behalf and for what: the claims the policy needs."""

    sub: str
    issuer: str
    role: str
    organization: str | None
    scopes: frozenset[str]
    purpose_of_use: tuple[str, ...] = ()
    patient: str | None = None
    fhir_user: str | None = None
    token_id: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)


class TokenValidator(Protocol):
    def validate(self, token: str) -> Principal: ...


KeyResolver = Callable[[str], Any]
"""Given a token, return the key that verifies it (raises ``jwt.PyJWTError``)."""


def jwks_resolver(jwks_uri: str, ssl_context: ssl.SSLContext | None = None) -> KeyResolver:
    """Keys from a JWKS URL, cached, re-fetched when an unknown ``kid`` appears.

    ``ssl_context`` is the service's outgoing trust (``exchange.security.tls``).
    """
    client = PyJWKClient(
        jwks_uri, cache_keys=True, lifespan=300, timeout=5, ssl_context=ssl_context
    )

    def resolve(token: str) -> Any:
        return client.get_signing_key_from_jwt(token).key

    return resolve


def issuer_resolver(
    issuer: str, jwks_uri: str | None = None, ssl_context: ssl.SSLContext | None = None
) -> KeyResolver:
    """Keys of a trusted OIDC issuer: from ``jwks_uri`` if configured, else found through
    OIDC discovery on first use. An unreachable issuer is a key error (401), never a 500."""
    if jwks_uri:
        return jwks_resolver(jwks_uri, ssl_context)
    resolved: list[KeyResolver] = []

    def resolve(token: str) -> Any:
        if not resolved:
            try:
                answer = httpx.get(
                    f"{issuer}/.well-known/openid-configuration",
                    timeout=5,
                    verify=ssl_context if ssl_context is not None else True,
                )
                answer.raise_for_status()
                resolved.append(jwks_resolver(str(answer.json()["jwks_uri"]), ssl_context))
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise jwt.PyJWKClientConnectionError(
                    f"OIDC discovery at {issuer} failed: {type(exc).__name__}"
                ) from None
        return resolved[0](token)

    return resolve


def static_resolver(public_key: Any) -> KeyResolver:
    return lambda _token: public_key


class JwtValidator:
    """Validates JWTs from a set of trusted issuers."""

    def __init__(self, issuers: Mapping[str, KeyResolver], audience: str) -> None:
        self._issuers = dict(issuers)
        self._audience = audience

    def validate(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise NotAuthenticated("the token is not a well-formed JWT") from None
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise NotAuthenticated(f"token algorithm {header.get('alg')!r} is not accepted")
        issuer = unverified.get("iss")
        resolver = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if resolver is None:
            raise NotAuthenticated("the token's issuer is not trusted")
        try:
            claims = jwt.decode(
                token,
                resolver(token),
                algorithms=ALLOWED_ALGORITHMS,
                audience=self._audience,
                issuer=issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise NotAuthenticated("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise NotAuthenticated("the token is not meant for this service") from None
        except jwt.PyJWKClientError:
            raise NotAuthenticated("the token's signing key is unknown to its issuer") from None
        except jwt.PyJWTError:
            raise NotAuthenticated("the token's signature or claims are invalid") from None
        except TypeError:  # PyJWT: an allowed algorithm of another key type than the issuer's
            raise NotAuthenticated("the token's algorithm does not fit its issuer's key") from None
        return principal_from_claims(claims)


#: Claims read into a ``Principal`` that are text when present.
_OPTIONAL_TEXT_CLAIMS = ("org", "patient", "fhirUser", "jti")


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    role = claims.get("role")
    if role not in ROLES:
        raise NotAuthenticated("the token carries no known role")
    purpose = claims.get("purpose_of_use") or ()
    if isinstance(purpose, str):
        purpose = (purpose,)
    # Claims of other types than these would reach policy inputs and audit records as is.
    if not (
        isinstance(purpose, list | tuple)
        and all(isinstance(p, str) for p in purpose)
        and isinstance(claims.get("scope", ""), str)
        and all(isinstance(claims.get(c), str | None) for c in _OPTIONAL_TEXT_CLAIMS)
    ):
        raise NotAuthenticated("the token's claims are not of the expected types")
    return Principal(
        sub=str(claims["sub"]),
        issuer=str(claims["iss"]),
        role=role,
        organization=claims.get("org"),
        scopes=frozenset(str(claims.get("scope", "")).split()),
        purpose_of_use=tuple(str(p) for p in purpose),
        patient=claims.get("patient"),
        fhir_user=claims.get("fhirUser"),
        token_id=claims.get("jti"),
        claims=dict(claims),
    )


def bearer_token(authorization: str | None) -> str:
    """Extract the token from an ``Authorization`` header or refuse with 401."""
    if not authorization:
        raise NotAuthenticated("a bearer token is required", error="invalid_request")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthenticated(
            "the Authorization header must be 'Bearer <token>'", error="invalid_request"
        )
    return token.strip()


def now() -> int:
    return int(time.time())


class PrincipalCache:
    """Validated tokens, kept until they expire (bounded): a caller's next request with
    the same token skips signature and claim checks. Nothing is cached past ``exp``, and
    a token that failed validation is never cached."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._known: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, authorization: str) -> Principal | None:
        with self._lock:
            found = self._known.get(authorization)
            if found is None:
                return None
            if found[0] <= time.time():
                del self._known[authorization]
                return None
            self._known.move_to_end(authorization)
            return found[1]

    def put(self, authorization: str, principal: Principal) -> None:
        expires = principal.claims.get("exp")
        if not isinstance(expires, int | float):
            return
        with self._lock:
            self._known[authorization] = (float(expires), principal)
            self._known.move_to_end(authorization)
            while len(self._known) > self._size:
                self._known.popitem(last=False)
