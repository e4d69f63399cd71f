"""Hub-to-node grants (DESIGN.md §3): short-lived JWS naming caller, study and action.

The hub signs one after the policy allowed a retrieval; the node checks every
claim and never accepts anything else (a user's own token is not a grant).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from exchange.errors import Forbidden, NotAuthenticated
from exchange.security.keys import SigningKey
from exchange.security.tokens import KeyResolver, now

MAX_TTL_SECONDS = 60
LEEWAY_SECONDS = 5
GRANT_TYPE = "exchange-grant+jwt"
Action = Literal["view", "export"]
ACTIONS: tuple[Action, ...] = ("view", "export")


@dataclass(frozen=True)
class Grant:
    caller: str
    study: str
    action: Action
    decision: str
    token_id: str
    organization: str | None
    expires: int

    def permits(self, needed: Action) -> bool:
        """``export`` includes ``view``; ``view`` never includes ``export``."""
        return self.action == "export" or needed == "view"


def issue(
    key: SigningKey,
    *,
    issuer: str,
    node: str,
    caller: str,
    study: str,
    action: Action,
    decision: str,
    organization: str | None = None,
    ttl: int = 30,
) -> str:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if not 0 < ttl <= MAX_TTL_SECONDS:
        raise ValueError(f"grant lifetime must be 1-{MAX_TTL_SECONDS} s")
    issued = now()
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": node,
        "sub": caller,
        "study": study,
        "act": action,
        "dec": decision,
        "jti": secrets.token_urlsafe(16),
        "iat": issued,
        "exp": issued + ttl,
    }
    if organization:
        claims["org"] = organization
    return jwt.encode(
        claims, key.private, algorithm="RS256", headers={"kid": key.kid, "typ": GRANT_TYPE}
    )


class GrantVerifier:
    """Checks grants for one node against the hub's published keys."""

    def __init__(self, hub_issuer: str, node_id: str, resolve_key: KeyResolver) -> None:
        self._issuer = hub_issuer
        self._node = node_id
        self._resolve = resolve_key

    def verify(self, token: str, study: str, needed: Action) -> Grant:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise NotAuthenticated("a hub grant is required; this is not a JWT") from None
        if header.get("typ") != GRANT_TYPE or header.get("alg") != "RS256":
            raise NotAuthenticated("a hub grant is required; user tokens are not accepted here")
        try:
            claims = jwt.decode(
                token,
                self._resolve(token),
                algorithms=["RS256"],
                audience=self._node,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={
                    "require": ["iss", "aud", "sub", "exp", "iat", "jti", "study", "act", "dec"]
                },
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("the grant has expired") from None
        except jwt.InvalidAudienceError:
            raise NotAuthenticated("the grant is for another node") from None
        except jwt.InvalidIssuerError:
            raise NotAuthenticated("the grant was not issued by this node's hub") from None
        except jwt.PyJWKClientError:
            raise NotAuthenticated("the grant's signing key is not the hub's") from None
        except jwt.PyJWTError as exc:
            raise NotAuthenticated(f"the grant is invalid ({type(exc).__name__})") from None
        if int(claims["exp"]) - int(claims["iat"]) > MAX_TTL_SECONDS:
            raise NotAuthenticated("the grant's lifetime exceeds 60 s")
        if claims["act"] not in ACTIONS:
            raise NotAuthenticated("the grant names an unknown action")
        grant = Grant(
            caller=str(claims["sub"]),
            study=str(claims["study"]),
            action=claims["act"],
            decision=str(claims["dec"]),
            token_id=str(claims["jti"]),
            organization=claims.get("org"),
            expires=int(claims["exp"]),
        )
        if grant.study != study:
            raise Forbidden("the grant is for another study")
        if not grant.permits(needed):
            raise Forbidden("the grant allows viewing only; raw DICOM needs an export grant")
        return grant
