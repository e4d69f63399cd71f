"""The hub's DICOMweb broker at ``/dicomweb`` (PS3.18 QIDO-RS and WADO-RS), mirroring a node's.

Thin routes: they check the token (401), the path's UIDs and numbers (400), and
hand over to ``exchange.hub.broker``, which decides, audits, grants and relays.
Errors here are FHIR ``OperationOutcome``s (the hub app lists ``/dicomweb``
among its outcome prefixes); a node's own 4xx answers are passed on as they are.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated

from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from exchange.errors import BadRequest
from exchange.hub.access import BREAK_GLASS_HEADER
from exchange.hub.broker import StudyRequest, broker_of
from exchange.hub.deps import CurrentPrincipal
from exchange.security.grants import Action
from exchange.uids import is_uid
from exchange.web import openapi

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], default_response_class=Response)

STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{sop}"

Accept = Annotated[str | None, Header()]
BreakGlassReason = Annotated[str | None, Header(alias=BREAK_GLASS_HEADER)]

#: path below /dicomweb, the action the policy is asked about, summary.
ROUTES: tuple[tuple[str, Action, str], ...] = (
    # QIDO-RS within a study
    (STUDY + "/series", "view", "Search for a study's series"),
    (STUDY + "/instances", "view", "Search for a study's instances"),
    (SERIES + "/instances", "view", "Search for a series' instances"),
    # WADO-RS: raw instances are an export
    (STUDY, "export", "Retrieve a study's instances"),
    (SERIES, "export", "Retrieve a series' instances"),
    (INSTANCE, "export", "Retrieve an instance"),
    # WADO-RS: everything else is a view
    (STUDY + "/metadata", "view", "A study's metadata"),
    (SERIES + "/metadata", "view", "A series' metadata"),
    (INSTANCE + "/metadata", "view", "An instance's metadata"),
    (INSTANCE + "/frames/{frames}", "view", "Uncompressed frames of an instance"),
    (INSTANCE + "/bulkdata/{tag}", "view", "A bulk data value of an instance"),
    (STUDY + "/rendered", "view", "The study's first image, rendered"),
    (SERIES + "/rendered", "view", "The series' first image, rendered"),
    (INSTANCE + "/rendered", "view", "An instance's first frame, rendered"),
    (INSTANCE + "/frames/{frames}/rendered", "view", "One frame, rendered"),
    (STUDY + "/thumbnail", "view", "A small image of the study"),
    (SERIES + "/thumbnail", "view", "A small image of the series"),
    (INSTANCE + "/thumbnail", "view", "A small image of the instance"),
)

_FRAMES = re.compile(r"^[0-9]{1,9}(,[0-9]{1,9})*$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def checked(params: Mapping[str, str]) -> dict[str, str]:
    """Path parameters, each checked for what it must be (400 otherwise), so the node's
    URL is built from UIDs and numbers only."""
    for name, value in params.items():
        if name in ("study", "series", "sop") and not is_uid(value):
            raise BadRequest(f"{value!r} is not a DICOM UID")
        if name == "frames" and not _FRAMES.match(value):
            raise BadRequest("frames must be a comma-separated list of frame numbers from 1")
        if name == "tag" and not _TAG.match(value):
            raise BadRequest("the bulk data tag must be 8 hexadecimal digits")
    return dict(params)


def _stated(reason: str | None) -> str | None:
    return reason.strip() if reason and reason.strip() else None


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


def _study_route(template: str, action: Action) -> Callable[..., Awaitable[Response]]:
    async def endpoint(
        request: Request,
        principal: CurrentPrincipal,
        accept: Accept = None,
        reason: BreakGlassReason = None,
    ) -> Response:
        params = checked(request.path_params)
        asked = StudyRequest(
            study=params["study"],
            action=action,
            path=template.format(**params),
            query=request.url.query,
            accept=accept,
            reason=_stated(reason),
            address=_address(request),
        )
        return await broker_of(request.app.state).study(principal, asked)

    return endpoint


@router.get(
    "/studies",
    summary="Search for studies across sites",
    responses=openapi.dicomweb_ok("/studies"),
)
async def search_studies(
    request: Request,
    principal: CurrentPrincipal,
    accept: Accept = None,
    reason: BreakGlassReason = None,
) -> Response:
    return await broker_of(request.app.state).search_studies(
        principal,
        list(request.query_params.multi_items()),
        query=request.url.query,
        accept=accept,
        reason=_stated(reason),
        address=_address(request),
    )


for _template, _action, _summary in ROUTES:
    router.add_api_route(
        _template,
        _study_route(_template, _action),
        methods=["GET"],
        summary=_summary,
        responses=openapi.dicomweb_ok(_template),
        # the endpoint reads request.path_params, so the document is told of them here
        openapi_extra={"parameters": openapi.path_parameters(_template)},
    )
