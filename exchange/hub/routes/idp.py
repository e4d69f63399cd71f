"""The development IdP over HTTP (``{hub}/idp``) and SMART discovery at the FHIR base.

Everything here answers 404 unless ``dev_idp`` is on. OAuth errors are OAuth's wire
format (RFC 6749 §5.2), not the product's JSON error, because SMART clients parse them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import html
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from exchange.errors import NotFound
from exchange.hub.deps import Services
from exchange.hub.services import HubServices
from exchange.security.devidp import (
    WARNING,
    AuthorizationRequest,
    DevIdentityProvider,
    OAuthError,
    Persona,
)
from exchange.web import openapi

router = APIRouter(tags=["development identity provider"])

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
#: The sign-in page loads nothing from anywhere and may not be framed (clickjacking).
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
_FORM_TYPE = "application/x-www-form-urlencoded"
_DEV_FIELDS = ("dev_sub", "dev_role", "dev_org", "dev_purpose", "dev_patient")


def _idp(services: HubServices) -> DevIdentityProvider:
    if services.idp is None:
        raise NotFound("the development identity provider is not enabled")
    return services.idp


def _fhir_base(services: HubServices) -> str:
    return f"{services.settings.base_url()}/fhir"


@router.get("/idp/.well-known/openid-configuration")
async def idp_discovery(services: Services) -> dict[str, Any]:
    return _idp(services).discovery()


@router.get("/idp/.well-known/jwks.json")
async def idp_jwks(services: Services) -> dict[str, Any]:
    return _idp(services).key.jwks()


@router.get("/fhir/.well-known/smart-configuration")
async def smart_configuration(services: Services) -> dict[str, Any]:
    """SMART App Launch v2 discovery; only the development IdP is described here."""
    return _idp(services).smart_configuration()


def _single_values(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """RFC 6749 §3.1: a parameter sent twice is an invalid request."""
    values: dict[str, str] = {}
    for name, value in pairs:
        if name in values:
            raise OAuthError("invalid_request", f"parameter {name} is repeated", redirect=False)
        values[name] = value
    return values


def _with_query(uri: str, params: dict[str, str]) -> str:
    parts = urlsplit(uri)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:38rem;margin:2rem auto;padding:0 1rem}"
        ".warn{background:#fee;border:2px solid #b00;padding:.5rem 1rem;font-weight:bold}"
        ".error{color:#b00}label{display:block;margin:.6rem 0}input,select{width:100%}"
        f'</style></head><body><p class="warn">{html.escape(WARNING)}</p>{body}</body></html>'
    )
    return HTMLResponse(document, status_code=status, headers=_PAGE_HEADERS)


def _sign_in_form(params: dict[str, str], error: str | None = None) -> HTMLResponse:
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in params.items()
        if k not in _DEV_FIELDS
    )

    def field(label: str, name: str, default: str = "") -> str:
        value = html.escape(params.get(name, default))
        return f'<label>{label} <input name="{name}" value="{value}"></label>'

    role = params.get("dev_role", "clinician")
    options = "".join(
        f"<option{' selected' if r == role else ''}>{r}</option>"
        for r in ("clinician", "operator", "patient")
    )
    body = (
        "<h1>Sign in as a development persona</h1>"
        + (f'<p class="error">{html.escape(error)}</p>' if error else "")
        + f"<p>Application <code>{html.escape(params.get('client_id', ''))}</code> asks for "
        f"<code>{html.escape(params.get('scope', ''))}</code>.</p>"
        f'<form method="get" action="authorize">{hidden}'
        + field("Subject (user id)", "dev_sub")
        + f'<label>Role <select name="dev_role">{options}</select></label>'
        + field("Organisation", "dev_org")
        + field("Purpose of use (e.g. TREAT, ETREAT)", "dev_purpose", "TREAT")
        + field("Patient in context (FHIR id, optional)", "dev_patient")
        + '<p><button type="submit">Sign in</button></p></form>'
    )
    return _page("Development sign-in", body, 400 if error else 200)


@router.get(
    "/idp/authorize",
    response_model=None,
    response_class=HTMLResponse,
    responses=openapi.html_ok(200, 400) | {302: {"description": "Back to the client"}},
)
def authorize(request: Request, services: Services) -> Response:
    """SMART authorize: the sign-in form, or with ``dev_sub`` etc. an immediate redirect."""
    idp = _idp(services)
    params: dict[str, str] = {}
    try:
        params = _single_values(list(request.query_params.multi_items()))
        auth = AuthorizationRequest.parse(params, _fhir_base(services))
        context = idp.launch_context(auth.launch)
        if context is not None:
            # An EHR launch: the user is signed in at the EHR already (single sign-on),
            # and the patient (and study) in context come from the launch.
            persona = dataclasses.replace(context.persona, patient=context.patient)
        elif "dev_sub" not in params:
            return _sign_in_form(params)
        else:
            try:
                persona = Persona.parse(
                    params["dev_sub"],
                    params.get("dev_role", "clinician"),
                    params.get("dev_org", ""),
                    params.get("dev_purpose", ""),
                    params.get("dev_patient", ""),
                )
            except ValueError as exc:
                return _sign_in_form(params, str(exc))
        code = idp.authorize(auth, persona, context)
    except OAuthError as exc:
        redirect_uri = params.get("redirect_uri", "") if exc.redirect else ""
        if not redirect_uri:
            body = f"<h1>Sign-in refused</h1><p>{html.escape(exc.error)}: "
            body += f"{html.escape(exc.description)}</p>"
            return _page("Sign-in refused", body, 400)
        answer = {"error": exc.error, "error_description": exc.description}
        if params.get("state"):
            answer["state"] = params["state"]
        return RedirectResponse(_with_query(redirect_uri, answer), 302, headers=_NO_STORE)
    location = _with_query(auth.redirect_uri, {"code": code, "state": auth.state})
    return RedirectResponse(location, 302, headers=_NO_STORE)


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """RFC 6749 §2.3.1: Basic with form-urlencoded id and secret."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError(
            "invalid_client", "only HTTP Basic client authentication is supported", status=401
        )
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed Basic credentials", status=401) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic credentials", status=401)
    return unquote_plus(client_id), unquote_plus(secret)


def _oauth_error(exc: OAuthError, basic: bool) -> JSONResponse:
    headers = dict(_NO_STORE)
    if exc.status == 401 and basic:
        headers["WWW-Authenticate"] = 'Basic realm="exchange-dev-idp"'
    body = {"error": exc.error, "error_description": exc.description}
    return JSONResponse(body, status_code=exc.status, headers=headers)


@router.post(
    "/idp/token",
    response_model=None,
    responses=openapi.oauth_token_answers(),
    openapi_extra=openapi.form_body(
        "grant_type", "code", "redirect_uri", "client_id", "code_verifier", "scope"
    ),
)
async def token(request: Request, services: Services) -> Response:
    """SMART token endpoint: authorization_code (public clients, PKCE) and client_credentials."""
    idp = _idp(services)
    authorization = request.headers.get("authorization")
    try:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != _FORM_TYPE:
            raise OAuthError("invalid_request", f"the token request must be {_FORM_TYPE}")
        try:
            text = (await request.body()).decode()
            params = _single_values(parse_qsl(text, keep_blank_values=True, max_num_fields=32))
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_request", "the form body is malformed") from None
        basic = _basic_credentials(authorization)
        answer = await anyio.to_thread.run_sync(partial(idp.token, params, basic))
    except OAuthError as exc:
        return _oauth_error(exc, authorization is not None)
    return JSONResponse(answer, headers=_NO_STORE)
