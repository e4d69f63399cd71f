"""The development identity provider: demo and tests only.

It is an OIDC issuer with discovery and a JWKS, it mints tokens for any
persona it is asked for, and it speaks just enough SMART App Launch v2
(authorization code + PKCE S256, client credentials) for a viewer to sign in
the way it will at the HIE's real identity provider. That is exactly why it is
off unless switched on, and why switching it on is announced loudly.

Deliberate development shortcuts (each one a reason never to run it in
production):

- there are no user accounts: whoever reaches the sign-in form picks a persona;
- public clients are not registered: any ``client_id`` with any absolute http(s)
  ``redirect_uri`` may start the code flow (PKCE S256 is required, so an
  intercepted code is useless without the verifier);
- pending codes live in the hub process's memory (one process, lost on restart);
- site systems use ``client_credentials`` with a client secret (HTTP Basic or
  form fields) registered in ``<hub data dir>/idp/clients.json`` (0600, secrets
  stored as SHA-256 hashes) by ``register_client``, instead of SMART Backend
  Services' ``private_key_jwt``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from exchange.files import write_atomic
from exchange.security.keys import SigningKey, load_or_create
from exchange.security.tokens import DEFAULT_SCOPES, ROLES, now

log = logging.getLogger(__name__)

WARNING = (
    "DEVELOPMENT IDENTITY PROVIDER IS ON: anyone who can reach it can mint tokens. "
    "Never run it in production."
)
DEFAULT_TTL_SECONDS = 3600
#: An authorization code must be redeemed this quickly (RFC 6749 §4.1.2 says "short").
CODE_TTL_SECONDS = 60
#: Backend Services asks for system tokens of at most five minutes.
CLIENT_CREDENTIALS_TTL_SECONDS = 300
#: Unredeemed codes kept at most: a bound on memory, not a rate limit.
MAX_PENDING_CODES = 1000
#: An EHR launch context can be used (and re-used, e.g. to step up to break-the-glass)
#: this long after the EHR created it.
LAUNCH_TTL_SECONDS = 600
#: Launch contexts kept at most.
MAX_LAUNCHES = 1000
#: Purposes of use a signed-in person may ask for at authorize (``purpose_of_use``, an
#: extension), by role: the IdP, not the app, decides who may break the glass.
REQUESTABLE_PURPOSES = {"clinician": frozenset({"TREAT", "ETREAT"})}

GRANT_TYPES = ["authorization_code", "client_credentials"]
CAPABILITIES = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "context-ehr-patient",
    "context-standalone-patient",
    "context-banner",
    "sso-openid-connect",
    "permission-patient",
    "permission-user",
    "permission-v2",
]
#: Non-resource scopes the code flow grants as asked (no refresh tokens: no offline_access).
_IDENTITY_SCOPES = frozenset({"openid", "fhirUser", "profile", "launch", "launch/patient"})
_RESOURCE_SCOPE = re.compile(
    r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.(\*|read|write|c?r?u?d?s?)(\?\S*)?$"
)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:~-]{0,127}$")
_SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
_ORG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PATIENT = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PURPOSE = re.compile(r"^[A-Z][A-Z0-9]{1,15}$")
#: RFC 7636 §4.1/§4.2: 43-128 unreserved characters; an S256 challenge is 43 base64url.
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def key_path(data_dir: Path) -> Path:
    return data_dir / "idp" / "signing-key.pem"


def clients_path(data_dir: Path) -> Path:
    return data_dir / "idp" / "clients.json"


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(ASCII(code_verifier))), unpadded."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OAuthError(Exception):
    """An OAuth 2.0 error (RFC 6749 §4.1.2.1, §5.2), rendered by the route.

    ``redirect`` says whether it may be sent back to the client's ``redirect_uri``;
    it may not when that URI (or the client) is itself what is wrong.
    """

    def __init__(
        self, error: str, description: str, *, status: int = 400, redirect: bool = True
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.redirect = redirect


@dataclass(frozen=True)
class Persona:
    """Who the developer signs in as: the claims a real IdP would take from its directory."""

    sub: str
    role: str
    org: str | None = None
    purpose: tuple[str, ...] = ()
    patient: str | None = None

    @classmethod
    def parse(
        cls,
        sub: str,
        role: str,
        org: str = "",
        purpose: str = "",
        patient: str = "",
    ) -> Persona:
        """Validate form or query input; ``ValueError`` says which field is wrong."""
        if not _SUBJECT.match(sub):
            raise ValueError("subject: letters, digits and . _ @ : - only (1-128)")
        if role not in ROLES or role == "system":
            raise ValueError(
                "role: clinician, operator or patient (systems use client_credentials)"
            )
        if org and not _ORG.match(org):
            raise ValueError("organisation: letters, digits and . _ - only (1-64)")
        codes = tuple(code for code in re.split(r"[\s,]+", purpose) if code)
        if any(not _PURPOSE.match(code) for code in codes):
            raise ValueError("purpose of use: HL7 PurposeOfUse codes such as TREAT or ETREAT")
        if patient and not _PATIENT.match(patient):
            raise ValueError("patient: a FHIR id (letters, digits, - and .)")
        return cls(sub=sub, role=role, org=org or None, purpose=codes, patient=patient or None)


@dataclass(frozen=True)
class AuthorizationRequest:
    """A checked SMART authorize request (everything but who signs in)."""

    client_id: str
    redirect_uri: str
    scope: str
    state: str
    code_challenge: str
    fhir_base: str
    launch: str | None = None
    nonce: str | None = None
    #: ``purpose_of_use`` (an extension): the purpose the app asks the IdP to grant.
    purpose: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str], fhir_base: str) -> AuthorizationRequest:
        """Check the parameters in the order RFC 6749 §4.1.2.1 needs.

        Client and redirect URI first: while they are in doubt nothing may be sent to
        the redirect URI. Everything after that is reported back to it.
        """
        client_id = params.get("client_id", "")
        if not _CLIENT_ID.match(client_id):
            raise OAuthError("invalid_request", "client_id is missing or malformed", redirect=False)
        redirect_uri = params.get("redirect_uri", "")
        parts = urlsplit(redirect_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise OAuthError(
                "invalid_request",
                "redirect_uri must be an absolute http(s) URL without a fragment",
                redirect=False,
            )
        if params.get("response_type") != "code":
            raise OAuthError("unsupported_response_type", "only response_type=code is supported")
        state = params.get("state", "")
        if not state:
            raise OAuthError("invalid_request", "state is required")
        if params.get("code_challenge_method") != "S256" or not _CHALLENGE.match(
            params.get("code_challenge", "")
        ):
            raise OAuthError(
                "invalid_request",
                "PKCE is required: code_challenge with code_challenge_method=S256",
            )
        if params.get("aud", "").rstrip("/") != fhir_base:
            raise OAuthError("invalid_request", f"aud must be this FHIR server: {fhir_base}")
        scope = " ".join(params.get("scope", "").split())
        if not scope:
            raise OAuthError("invalid_scope", "scope is required")
        purpose = params.get("purpose_of_use") or None
        if purpose is not None and not _PURPOSE.match(purpose):
            raise OAuthError("invalid_request", "purpose_of_use must be one PurposeOfUse code")
        return cls(
            client_id=client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            state=state,
            code_challenge=params["code_challenge"],
            fhir_base=fhir_base,
            launch=params.get("launch") or None,
            nonce=params.get("nonce") or None,
            purpose=purpose,
        )


@dataclass(frozen=True)
class LaunchContext:
    """What an EHR hands the IdP when it launches an app: who is signed in at the EHR
    (so the IdP needs no second sign-in), the patient and optionally the study open."""

    persona: Persona
    patient: str
    imaging_study: str | None
    expires: float


@dataclass(frozen=True)
class _PendingCode:
    request: AuthorizationRequest
    persona: Persona
    scope: str
    expires: float
    imaging_study: str | None = None


def _granted_user_scopes(requested: str, role: str) -> str:
    """What a signed-in person gets of what the app asked for: never system scopes, and a
    patient no user scopes. Unknown scopes are dropped, as OAuth allows."""
    granted: list[str] = []
    for scope in requested.split():
        match = _RESOURCE_SCOPE.match(scope)
        if scope in _IDENTITY_SCOPES or (
            match
            and match.group(1) != "system"
            and not (role == "patient" and match.group(1) == "user")
        ):
            granted.append(scope)
    return " ".join(dict.fromkeys(granted))


class DevIdentityProvider:
    def __init__(
        self,
        issuer: str,
        key: SigningKey,
        audience: str,
        *,
        clients_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.key = key
        self.audience = audience
        self.clients_file = clients_file
        self._clock = clock
        self._codes: dict[str, _PendingCode] = {}
        self._launches: dict[str, LaunchContext] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, data_dir: Path, issuer: str, audience: str) -> DevIdentityProvider:
        return cls(
            issuer,
            load_or_create(key_path(data_dir)),
            audience,
            clients_file=clients_path(data_dir),
        )

    # -- tokens ----------------------------------------------------------------
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
            # ``is None``: an explicitly empty scope must not widen to the role's defaults.
            "scope": DEFAULT_SCOPES[role] if scope is None else scope,
        }
        if org:
            claims["org"] = org
        if purpose:
            claims["purpose_of_use"] = purpose
        if patient:
            claims["patient"] = patient
        if role != "system":
            claims["fhirUser"] = f"{'Patient' if role == 'patient' else 'Practitioner'}/{sub}"
        claims.update(extra or {})
        return self._sign(claims)

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims, self.key.private, algorithm="RS256", headers={"kid": self.key.kid}
        )

    # -- SMART EHR launch context ----------------------------------------------
    def launch(self, persona: Persona, patient: str, imaging_study: str | None = None) -> str:
        """An opaque ``launch`` value for an EHR launch (the simulated EHR asks for it)."""
        if not _PATIENT.match(patient):
            raise ValueError("patient: a FHIR id (letters, digits, - and .)")
        if imaging_study is not None and not _PATIENT.match(imaging_study):
            raise ValueError("imaging study: a FHIR id (letters, digits, - and .)")
        value = secrets.token_urlsafe(24)
        context = LaunchContext(
            persona=persona,
            patient=patient,
            imaging_study=imaging_study,
            expires=self._clock() + LAUNCH_TTL_SECONDS,
        )
        with self._lock:
            moment = self._clock()
            for stale in [k for k, c in self._launches.items() if c.expires <= moment]:
                del self._launches[stale]
            if len(self._launches) >= MAX_LAUNCHES:
                raise ValueError("too many launches in progress; try again shortly")
            self._launches[value] = context
        return value

    def launch_context(self, value: str | None) -> LaunchContext | None:
        """The live context of a ``launch`` value, or None (unknown or expired)."""
        if not value:
            return None
        with self._lock:
            context = self._launches.get(value)
        if context is None or context.expires <= self._clock():
            return None
        return context

    # -- SMART authorization code + PKCE ---------------------------------------
    def authorize(
        self,
        request: AuthorizationRequest,
        persona: Persona,
        context: LaunchContext | None = None,
    ) -> str:
        """Sign ``persona`` in for ``request``; the single-use code to redirect with.

        A ``purpose_of_use`` the app asked for is granted only where the persona's role
        may claim it (``REQUESTABLE_PURPOSES``): it then replaces the persona's purposes.
        """
        if request.purpose is not None:
            if request.purpose not in REQUESTABLE_PURPOSES.get(persona.role, frozenset()):
                raise OAuthError(
                    "access_denied",
                    f"a {persona.role} may not claim purpose of use {request.purpose}",
                )
            persona = dataclasses.replace(persona, purpose=(request.purpose,))
        code = secrets.token_urlsafe(32)
        pending = _PendingCode(
            request=request,
            persona=persona,
            scope=_granted_user_scopes(request.scope, persona.role),
            expires=self._clock() + CODE_TTL_SECONDS,
            imaging_study=context.imaging_study if context else None,
        )
        with self._lock:
            moment = self._clock()
            for stale in [c for c, p in self._codes.items() if p.expires <= moment]:
                del self._codes[stale]
            if len(self._codes) >= MAX_PENDING_CODES:
                raise OAuthError(
                    "temporarily_unavailable", "too many sign-ins in progress; try again shortly"
                )
            self._codes[code] = pending
        return code

    def token(
        self, params: Mapping[str, str], basic: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """The token endpoint (RFC 6749 §4.1.3, §4.4): a JSON answer or ``OAuthError``."""
        grant_type = params.get("grant_type", "")
        if grant_type == "authorization_code":
            return self._redeem_code(params)
        if grant_type == "client_credentials":
            return self._client_credentials(params, basic)
        raise OAuthError("unsupported_grant_type", f"grant_type must be one of {GRANT_TYPES}")

    def _redeem_code(self, params: Mapping[str, str]) -> dict[str, Any]:
        with self._lock:
            # Popped before any check: a code is spent by its first redemption, good or bad.
            pending = self._codes.pop(params.get("code", ""), None)
        if pending is None or pending.expires <= self._clock():
            raise OAuthError("invalid_grant", "the code is unknown, already used or expired")
        request = pending.request
        if params.get("client_id") != request.client_id:
            raise OAuthError("invalid_grant", "the code was issued to another client")
        if params.get("redirect_uri") != request.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
        verifier = params.get("code_verifier", "")
        if not _VERIFIER.match(verifier) or not hmac.compare_digest(
            pkce_challenge(verifier), request.code_challenge
        ):
            raise OAuthError("invalid_grant", "the PKCE code_verifier does not match")
        persona = pending.persona
        scopes = pending.scope.split()
        access = self.issue(
            sub=persona.sub,
            role=persona.role,
            org=persona.org,
            purpose=list(persona.purpose) or None,
            patient=persona.patient,
            scope=pending.scope,
            extra={"client_id": request.client_id},
        )
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": DEFAULT_TTL_SECONDS,
            "scope": pending.scope,
            # An EHR launch shows its own banner; a standalone app must show one.
            "need_patient_banner": request.launch is None,
        }
        if persona.patient:
            answer["patient"] = persona.patient
        if pending.imaging_study:
            # SMART App Launch v2 fhirContext: the study open in the EHR.
            answer["fhirContext"] = [{"reference": f"ImagingStudy/{pending.imaging_study}"}]
        if persona.purpose:
            answer["purpose_of_use"] = list(persona.purpose)
        fhir_user = f"{'Patient' if persona.role == 'patient' else 'Practitioner'}/{persona.sub}"
        if "fhirUser" in scopes:
            answer["fhirUser"] = fhir_user
        if "openid" in scopes:
            issued = now()
            id_claims: dict[str, Any] = {
                "iss": self.issuer,
                "sub": persona.sub,
                "aud": request.client_id,
                "iat": issued,
                "exp": issued + DEFAULT_TTL_SECONDS,
            }
            if "fhirUser" in scopes:
                id_claims["fhirUser"] = f"{request.fhir_base}/{fhir_user}"
            if request.nonce:
                id_claims["nonce"] = request.nonce
            answer["id_token"] = self._sign(id_claims)
        return answer

    # -- client credentials for site systems -----------------------------------
    def register_client(self, client_id: str, org: str) -> str:
        """Create (or re-key) a site system client; returns its secret, shown only now."""
        if self.clients_file is None:
            raise ValueError("this development IdP has no clients file")
        if not _CLIENT_ID.match(client_id):
            raise ValueError(f"client id {client_id!r} is malformed")
        if not _ORG.match(org):
            raise ValueError(f"organisation {org!r} is malformed")
        secret = secrets.token_urlsafe(32)
        with self._lock:
            clients = self._clients()
            clients[client_id] = {"org": org, "secret_sha256": _digest(secret)}
            body = json.dumps({"clients": clients}, indent=2, sort_keys=True).encode()
            write_atomic(self.clients_file, body, mode=0o600)
        return secret

    def _clients(self) -> dict[str, Any]:
        if self.clients_file is None or not self.clients_file.exists():
            return {}
        try:
            clients = json.loads(self.clients_file.read_text())["clients"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("the development IdP's clients file is unreadable; no client accepted")
            return {}
        return clients if isinstance(clients, dict) else {}

    def _client_credentials(
        self, params: Mapping[str, str], basic: tuple[str, str] | None
    ) -> dict[str, Any]:
        if basic is not None:
            client_id, secret = basic
        else:
            client_id, secret = params.get("client_id", ""), params.get("client_secret", "")
        client = self._clients().get(client_id) if client_id else None
        # Always hash and compare, so an unknown client answers like a wrong secret.
        expected = client.get("secret_sha256", "") if isinstance(client, dict) else ""
        if not (hmac.compare_digest(_digest(secret), str(expected)) and expected):
            raise OAuthError("invalid_client", "client authentication failed", status=401)
        assert isinstance(client, dict)
        requested = params.get("scope", "").split()
        if requested:
            scopes = [s for s in requested if (m := _RESOURCE_SCOPE.match(s)) and m[1] == "system"]
            if not scopes:
                raise OAuthError("invalid_scope", "a system client may ask for system/ scopes only")
            scope = " ".join(dict.fromkeys(scopes))
        else:
            scope = DEFAULT_SCOPES["system"]
        access = self.issue(
            sub=client_id,
            role="system",
            org=str(client["org"]),
            scope=scope,
            ttl=CLIENT_CREDENTIALS_TTL_SECONDS,
            extra={"client_id": client_id},
        )
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": CLIENT_CREDENTIALS_TTL_SECONDS,
            "scope": scope,
        }

    # -- discovery -------------------------------------------------------------
    def _endpoints(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "grant_types_supported": GRANT_TYPES,
            "token_endpoint_auth_methods_supported": [
                "none",
                "client_secret_basic",
                "client_secret_post",
            ],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": [
                "openid",
                "fhirUser",
                "launch",
                "launch/patient",
                "patient/*.rs",
                "user/*.cruds",
                "system/*.cruds",
            ],
            "capabilities": CAPABILITIES,
        }

    def discovery(self) -> dict[str, Any]:
        return {
            **self._endpoints(),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def smart_configuration(self) -> dict[str, Any]:
        """SMART App Launch v2 ``.well-known/smart-configuration`` for the hub's FHIR base."""
        return self._endpoints()


def _digest(secret: str) -> str:
    # A random 256-bit secret needs no slow hash: SHA-256 keeps the file useless to a reader.
    return hashlib.sha256(secret.encode()).hexdigest()
