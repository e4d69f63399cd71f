"""The development identity provider: demo and tests only.

It is an OIDC issuer with discovery and a JWKS, and it mints tokens for any
persona it is asked for. That is exactly why it is off unless switched on, and
why switching it on is announced loudly.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import jwt

from exchange.security.keys import SigningKey, load_or_create
from exchange.security.tokens import DEFAULT_SCOPES, ROLES, now

log = logging.getLogger(__name__)

WARNING = (
    "DEVELOPMENT IDENTITY PROVIDER IS ON: anyone who can reach it can mint tokens. "
    "Never run it in production."
)
DEFAULT_TTL_SECONDS = 3600


def key_path(data_dir: Path) -> Path:
    return data_dir / "idp" / "signing-key.pem"


class DevIdentityProvider:
    def __init__(self, issuer: str, key: SigningKey, audience: str) -> None:
        self.issuer = issuer
        self.key = key
        self.audience = audience

    @classmethod
    def open(cls, data_dir: Path, issuer: str, audience: str) -> DevIdentityProvider:
        return cls(issuer, load_or_create(key_path(data_dir)), audience)

    def issue(
        self,
        *,
        sub: str,
        role: str,
        org: str | None,
        purpose: list[str] | None = None,
        patient: str | None = None,
        scope: str | None = None,
        ttl: int = DEFAULT_TTL_SECONDS,
        extra: dict[str, Any] | None = None,
    ) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        issued = now()
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "jti": secrets.token_urlsafe(16),
            "role": role,
            "scope": scope or DEFAULT_SCOPES[role],
        }
        if org:
            claims["org"] = org
        if purpose:
            claims["purpose_of_use"] = purpose
        if patient:
            claims["patient"] = patient
        claims["fhirUser"] = f"{'Patient' if role == 'patient' else 'Practitioner'}/{sub}"
        claims.update(extra or {})
        return jwt.encode(
            claims, self.key.private, algorithm="RS256", headers={"kid": self.key.kid}
        )

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "fhirUser", "launch", "launch/patient"],
        }
