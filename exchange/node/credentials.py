"""Site credentials: who may store into which tenant.

A credential is bound to exactly one tenant: either a per-tenant API key
(stored only as a SHA-256 hash; keys are 256-bit random, so a plain hash is
enough) or a bearer token from a trusted issuer with role ``system`` and an
organisation that one tenant of this node belongs to.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from exchange.config import Settings
from exchange.errors import Forbidden, NotAuthenticated
from exchange.migrations import ensure_schema
from exchange.security.tokens import JwtValidator

API_KEY_PREFIX = "exk_"


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(index=True, max_length=64)
    key_hash: str = Field(unique=True, max_length=64)
    label: str = Field(default="", max_length=200)
    created_at: datetime
    revoked_at: datetime | None = None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Credentials:
    def __init__(self, engine: Engine, settings: Settings, tokens: JwtValidator | None) -> None:
        self._engine = engine
        self._tenants = settings.tenants
        self._tokens = tokens
        ensure_schema(engine, "node")

    def create_api_key(self, tenant: str, label: str = "") -> str:
        if tenant not in self._tenants:
            raise KeyError(tenant)
        key = f"{API_KEY_PREFIX}{secrets.token_urlsafe(32)}"
        with Session(self._engine) as session:
            session.add(
                ApiKey(
                    tenant=tenant, key_hash=_hash(key), label=label, created_at=datetime.now(UTC)
                )
            )
            session.commit()
        return key

    def revoke_api_keys(self, tenant: str) -> int:
        with Session(self._engine) as session:
            rows = session.exec(
                select(ApiKey).where(ApiKey.tenant == tenant, col(ApiKey.revoked_at).is_(None))
            ).all()
            for row in rows:
                row.revoked_at = datetime.now(UTC)
                session.add(row)
            session.commit()
            return len(rows)

    def tenant_for_api_key(self, key: str) -> str:
        with Session(self._engine) as session:
            row = session.exec(select(ApiKey).where(ApiKey.key_hash == _hash(key))).first()
        if row is None or row.revoked_at is not None or row.tenant not in self._tenants:
            raise NotAuthenticated("the API key is not valid on this node")
        return row.tenant

    def tenant_for_token(self, token: str) -> str:
        if self._tokens is None:
            raise NotAuthenticated("this node accepts API keys only (no issuers configured)")
        principal = self._tokens.validate(token)
        if principal.role != "system":
            raise Forbidden("only the site's systems may do this; user tokens are not accepted")
        matches = [
            t for t, cfg in self._tenants.items() if cfg.organization == principal.organization
        ]
        if len(matches) != 1:
            raise Forbidden("the token's organisation is not a tenant of this node")
        return matches[0]

    def tenant_for(self, authorization: str | None, api_key: str | None) -> str:
        """The one tenant the request's credential is bound to, or 401/403."""
        if api_key:
            return self.tenant_for_api_key(api_key)
        if not authorization:
            raise NotAuthenticated(
                "a site credential is required (API key or bearer token)", error="invalid_request"
            )
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "apikey" and value.strip():
            return self.tenant_for_api_key(value.strip())
        if scheme.lower() == "bearer" and value.strip():
            if value.strip().startswith(API_KEY_PREFIX):
                return self.tenant_for_api_key(value.strip())
            return self.tenant_for_token(value.strip())
        raise NotAuthenticated(
            "the Authorization header must be 'Bearer <token>' or 'ApiKey <key>'",
            error="invalid_request",
        )
