"""The clinician viewer at ``{hub}/viewer`` (issue 9): pages, SMART launch and callback.

- ``GET /viewer/``: the viewer page (plain HTML, CSS and JavaScript served by the hub);
- ``GET /viewer/launch?iss=…&launch=…[&purpose=ETREAT]``: SMART App Launch (EHR launch
  with ``launch``, standalone without), see ``exchange.hub.viewer``;
- ``GET /viewer/callback?code&state``: the redirect URI;
- ``GET /viewer/access``: standalone start for patients holding an access code;
- ``GET /viewer/ehr-sim``: a simulated EHR with a "View images" button (only where the
  development IdP is on: it asks that IdP for the launch context).

Static assets are under ``/viewer/static/`` (mounted by the hub app).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from exchange.errors import NotFound
from exchange.hub import viewer
from exchange.hub.deps import Services
from exchange.hub.services import HubServices
from exchange.security.devidp import WARNING, Persona
from exchange.security.tls import httpx_verify

router = APIRouter(prefix="/viewer", tags=["viewer"], include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static" / "viewer"
_Short = Annotated[str | None, Query(max_length=512)]


def _launcher(request: Request, services: HubServices) -> viewer.Launcher:
    launcher = getattr(request.app.state, "viewer_launcher", None)
    if not isinstance(launcher, viewer.Launcher):
        settings = services.settings
        launcher = viewer.Launcher(
            settings.base_url(), settings.viewer_client_id, httpx_verify(settings)
        )
        request.app.state.viewer_launcher = launcher
    return launcher


def _html(document: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(document, status_code=status, headers=viewer.PAGE_HEADERS)


def _static_page(name: str) -> HTMLResponse:
    return _html((STATIC / name).read_text(encoding="utf-8"))


@router.get("")
async def viewer_root() -> RedirectResponse:
    return RedirectResponse("/viewer/", 307)


@router.get("/")
async def viewer_page() -> HTMLResponse:
    return _static_page("index.html")


@router.get("/access")
async def access_page() -> HTMLResponse:
    return _static_page("access.html")


@router.get("/launch", response_model=None)
async def launch(
    request: Request,
    services: Services,
    iss: _Short = None,
    launch: _Short = None,
    purpose: _Short = None,
) -> Response:
    """Start SMART App Launch: to the authorization server with PKCE S256 and a state."""
    if not iss:
        return _html(viewer.error_page("the launch names no iss (FHIR server)"), 400)
    try:
        location, pending = await _launcher(request, services).start(iss, launch, purpose)
    except viewer.LaunchError as exc:
        return _html(viewer.error_page(str(exc)), 400)
    answer = RedirectResponse(location, 302, headers={"Cache-Control": "no-store"})
    answer.set_cookie(
        viewer.COOKIE,
        pending.cookie(),
        max_age=viewer.COOKIE_SECONDS,
        path=viewer.COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=services.settings.base_url().startswith("https://"),
    )
    return answer


@router.get("/callback")
async def callback(request: Request, services: Services) -> HTMLResponse:
    """Redeem the code server side and hand the token to the page (never in a URL)."""
    params = {k: v[:2048] for k, v in request.query_params.items()}
    try:
        launcher = _launcher(request, services)
        token = await launcher.finish(params, request.cookies.get(viewer.COOKIE))
    except viewer.LaunchError as exc:
        answer = _html(viewer.error_page(str(exc)), 400)
    else:
        body = '<main class="notice"><p>Opening the viewer…</p></main>'
        answer = _html(viewer.page("Viewer", body, scripts=("handover.js",), data=token))
    answer.delete_cookie(viewer.COOKIE, path=viewer.COOKIE_PATH)
    return answer


# -- the simulated EHR (development IdP only) -------------------------------------------------


def _dev(services: HubServices) -> None:
    if services.idp is None:
        raise NotFound("the simulated EHR needs the development identity provider")


@router.get("/ehr-sim")
async def ehr_sim(
    services: Services,
    patient: _Short = None,
    study: _Short = None,
    user: _Short = None,
    org: _Short = None,
) -> HTMLResponse:
    """A stand-in for the EHR's patient chart: its "View images" button launches the viewer."""
    _dev(services)

    def field(label: str, name: str, value: str | None, hint: str = "") -> str:
        shown = html.escape(value or "")
        return (
            f'<label>{label} <input name="{name}" value="{shown}" autocomplete="off">'
            f"<small>{html.escape(hint)}</small></label>"
        )

    body = (
        f'<p class="warn">{html.escape(WARNING)} This is a simulated EHR for demos and tests.</p>'
        '<main class="notice"><h1>EHR: patient chart (simulated)</h1>'
        '<form method="get" action="/viewer/ehr-sim/launch" class="stack">'
        + field("Signed-in clinician", "user", user or "dr-ehr")
        + field("Clinician's organisation", "org", org or "org-c")
        + field("Patient (FHIR id at the exchange)", "patient", patient)
        + field("Study open in the chart (ImagingStudy id, optional)", "study", study)
        + '<p><button type="submit" id="view-images">View images</button></p></form></main>'
    )
    return _html(viewer.page("EHR (simulated)", body))


@router.get("/ehr-sim/launch", response_model=None)
async def ehr_sim_launch(
    services: Services,
    patient: _Short = None,
    study: _Short = None,
    user: _Short = None,
    org: _Short = None,
) -> Response:
    """The EHR registers a launch context at the IdP, then opens the viewer with it."""
    _dev(services)
    assert services.idp is not None
    try:
        persona = Persona.parse(user or "", "clinician", org or "", "TREAT")
        value = services.idp.launch(persona, patient or "", study or None)
    except ValueError as exc:
        return _html(viewer.error_page(f"the simulated EHR cannot launch: {exc}"), 400)
    iss = viewer.fhir_base(services.settings.base_url())
    return RedirectResponse(f"/viewer/launch?{urlencode({'iss': iss, 'launch': value})}", 302)
