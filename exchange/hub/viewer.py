"""The clinician viewer's server side: a SMART App Launch v2 client (issue 9).

The viewer is a public SMART client (no secret) whose authorization-code exchange
happens **on the hub, server side**, as a "backend for frontend":

1. ``/viewer/launch?iss=…&launch=…`` checks that ``iss`` is this hub's FHIR base,
   reads ``{iss}/.well-known/smart-configuration``, makes a PKCE S256 verifier and a
   ``state``, keeps both (and the ``launch``) in a short-lived ``HttpOnly`` cookie
   scoped to ``/viewer/callback`` and redirects the browser to ``authorize``;
2. ``/viewer/callback?code&state`` checks ``state`` against that cookie, redeems the
   code with the verifier at the token endpoint and hands the token answer to the
   viewer page (in the page body, never in a URL), which keeps it in the tab's
   ``sessionStorage``.

Why server side: the verifier never reaches page JavaScript (an injected script
cannot redeem an intercepted code), the page needs no CORS at the HIE's token
endpoint, and the same flow works for any SMART authorization server. The cookie
makes the hub stateless (any hub replica can answer the callback).

The token itself must reach the browser: images are fetched by the page with
``Authorization: Bearer`` (rendered PNG frames only), and the broker decides and
audits every one of them.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from exchange.security.devidp import pkce_challenge

#: What the viewer asks for in an EHR launch: identity, the launch context, and read and
#: search on what it shows (Endpoint and Organization for sites). Not Patient: the HIE's
#: policy keeps Patient records with operators and sites, so the banner is taken from the
#: images' own header (a view the broker decides and audits) unless a token may read it.
EHR_SCOPE = "launch openid fhirUser user/ImagingStudy.rs user/Endpoint.rs user/Organization.rs"
#: A standalone launch asks the IdP to pick the patient.
STANDALONE_SCOPE = EHR_SCOPE.replace("launch ", "launch/patient ", 1)
COOKIE = "exchange_viewer_launch"
COOKIE_PATH = "/viewer/callback"
#: How long the user has to sign in between launch and callback.
COOKIE_SECONDS = 600
#: How long a smart-configuration document is used before it is read again.
CONFIG_SECONDS = 300.0
HTTP_TIMEOUT_SECONDS = 10.0
#: Purposes the viewer may ask the IdP for (the IdP decides whether to grant them).
PURPOSES = frozenset({"TREAT", "ETREAT"})

#: Every viewer page: scripts, styles and images from the hub only; never framed.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
}


class LaunchError(Exception):
    """A launch or callback that cannot go on; the message is shown to the user."""


@dataclass(frozen=True)
class SmartConfiguration:
    authorization_endpoint: str
    token_endpoint: str


@dataclass(frozen=True)
class PendingLaunch:
    """What the callback needs from its launch, kept in the browser's HttpOnly cookie."""

    state: str
    verifier: str
    launch: str | None
    purpose: str | None

    def cookie(self) -> str:
        body = json.dumps(
            {"s": self.state, "v": self.verifier, "l": self.launch, "p": self.purpose},
            separators=(",", ":"),
        )
        return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @classmethod
    def from_cookie(cls, value: str | None) -> PendingLaunch:
        if not value:
            raise LaunchError(
                "this sign-in was not started here or took too long; launch the viewer again"
            )
        try:
            padded = value + "=" * (-len(value) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode()))
            pending = cls(
                state=str(data["s"]),
                verifier=str(data["v"]),
                launch=str(data["l"]) if data.get("l") else None,
                purpose=str(data["p"]) if data.get("p") else None,
            )
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise LaunchError("the sign-in cookie is damaged; launch the viewer again") from None
        return pending


def fhir_base(base_url: str) -> str:
    return f"{base_url}/fhir"


def redirect_uri(base_url: str) -> str:
    return f"{base_url}/viewer/callback"


class Launcher:
    """Builds authorize redirects and redeems codes for one hub (its base URL)."""

    def __init__(self, base_url: str, client_id: str, verify: ssl.SSLContext | bool = True) -> None:
        self.base_url = base_url
        self.client_id = client_id
        #: Trust for the hub's own HTTPS URLs (``tls_ca_file``): it calls its own endpoints.
        self._verify = verify
        self._config: tuple[float, SmartConfiguration] | None = None

    async def configuration(self) -> SmartConfiguration:
        cached = self._config
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        url = f"{fhir_base(self.base_url)}/.well-known/smart-configuration"
        try:
            async with httpx.AsyncClient(
                timeout=HTTP_TIMEOUT_SECONDS, trust_env=False, verify=self._verify
            ) as http:
                answer = await http.get(url)
            config = answer.json() if answer.status_code == 200 else {}
            found = SmartConfiguration(
                authorization_endpoint=str(config["authorization_endpoint"]),
                token_endpoint=str(config["token_endpoint"]),
            )
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            raise LaunchError(
                "the exchange's authorization server cannot be found (no SMART configuration)"
            ) from None
        self._config = (time.monotonic() + CONFIG_SECONDS, found)
        return found

    async def start(
        self, iss: str, launch: str | None, purpose: str | None
    ) -> tuple[str, PendingLaunch]:
        """The authorize URL to send the browser to, and what to remember for the callback."""
        if iss.rstrip("/") != fhir_base(self.base_url):
            raise LaunchError(
                f"this viewer serves the FHIR server {fhir_base(self.base_url)} only "
                "(the launch named another iss)"
            )
        if purpose is not None and purpose not in PURPOSES:
            raise LaunchError(f"purpose must be one of {', '.join(sorted(PURPOSES))}")
        config = await self.configuration()
        pending = PendingLaunch(
            state=secrets.token_urlsafe(24),
            verifier=secrets.token_urlsafe(48),
            launch=launch or None,
            purpose=purpose,
        )
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": redirect_uri(self.base_url),
            "scope": EHR_SCOPE if launch else STANDALONE_SCOPE,
            "state": pending.state,
            "aud": fhir_base(self.base_url),
            "code_challenge": pkce_challenge(pending.verifier),
            "code_challenge_method": "S256",
        }
        if launch:
            params["launch"] = launch
        if purpose:
            params["purpose_of_use"] = purpose
        separator = "&" if "?" in config.authorization_endpoint else "?"
        return f"{config.authorization_endpoint}{separator}{urlencode(params)}", pending

    async def finish(self, params: dict[str, str], cookie: str | None) -> dict[str, Any]:
        """Redeem the callback's code; the token answer the page gets (plus its context)."""
        pending = PendingLaunch.from_cookie(cookie)
        if not secrets.compare_digest(params.get("state", ""), pending.state):
            raise LaunchError("the sign-in answer does not belong to this launch (state differs)")
        if params.get("error"):
            said = params.get("error_description") or params["error"]
            raise LaunchError(f"the authorization server refused the sign-in: {said}")
        code = params.get("code", "")
        if not code:
            raise LaunchError("the authorization server sent no code")
        config = await self.configuration()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": self.client_id,
            "redirect_uri": redirect_uri(self.base_url),
            "code_verifier": pending.verifier,
        }
        try:
            async with httpx.AsyncClient(
                timeout=HTTP_TIMEOUT_SECONDS, trust_env=False, verify=self._verify
            ) as http:
                answer = await http.post(config.token_endpoint, data=form)
            token = answer.json()
        except (httpx.HTTPError, ValueError):
            raise LaunchError("the authorization server's token endpoint did not answer") from None
        if answer.status_code != 200 or not isinstance(token, dict) or "access_token" not in token:
            told = token.get("error_description") if isinstance(token, dict) else None
            raise LaunchError(f"the code could not be redeemed: {told or answer.status_code}")
        context: Any = token.get("fhirContext") or []
        return {
            "access_token": token["access_token"],
            "expires_in": token.get("expires_in"),
            "scope": token.get("scope", ""),
            "patient": token.get("patient"),
            "fhirContext": context,
            "need_patient_banner": token.get("need_patient_banner", True),
            "iss": fhir_base(self.base_url),
            "launch": pending.launch,
            "purpose": pending.purpose,
            "source": "smart",
        }


def page(title: str, body: str, *, scripts: tuple[str, ...] = (), data: Any = None) -> str:
    """A viewer page: the hub's stylesheet and scripts only; ``data`` as inert JSON."""
    embedded = ""
    if data is not None:
        # JSON in a script element: "<" escaped so that no "</script>" can end it early.
        text = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e")
        embedded = f'<script id="handover" type="application/json">{text}</script>'
    tags = "".join(f'<script src="/viewer/static/{name}" defer></script>' for name in scripts)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="stylesheet" href="/viewer/static/viewer.css">'
        f'{embedded}{tags}</head><body class="plain">{body}</body></html>'
    )


def error_page(message: str) -> str:
    body = (
        '<main class="notice"><h1>The viewer could not start</h1>'
        f'<p role="alert">{html.escape(message)}</p>'
        '<p><a href="/viewer/access">Open with a patient access code</a></p></main>'
    )
    return page("Viewer: launch failed", body)
