"""DICOMweb WADO-RS on the node (PS3.18 §10.4), only to holders of a hub grant.

``view`` grants metadata, frames, rendered images and thumbnails; raw instances
(``application/dicom``) need ``export``. Instances are streamed as stored
(never transcoded), decrypting ~1 MiB at a time in a worker thread, so memory
stays bounded whatever the study's size. Each response is primed with its
first chunk before the status line goes out: a failure to open or decode the
first instance is a clean JSON error, and one later aborts the connection so
that a client can never take a truncated answer for a complete one.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from pydicom.dataset import Dataset
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import Response, StreamingResponse

from exchange.dicom import rendering
from exchange.errors import BadRequest, NotAcceptable, NotFound
from exchange.node.deps import ExportAccess, Services, ViewAccess
from exchange.node.store import InstanceStore, InstanceView
from exchange.web import openapi

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], default_response_class=Response)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTETS = "application/octet-stream"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
PIXEL_DATA = "7FE00010"
#: Binary values longer than this are sent as a BulkDataURI instead of inline.
BULK_THRESHOLD = 1024
#: Transfer syntaxes whose pixel data is not encapsulated.
_NATIVE = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
}
_RENDER_PARAMETERS = ("window", "viewport", "quality")

STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{sop}"

Accept = Annotated[str | None, Header()]


# -- content negotiation --------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    media_type: str
    parameters: dict[str, str]
    quality: float


def media_ranges(accept: str | None) -> list[MediaRange]:
    """The ``Accept`` header's ranges, most preferred first; none means ``*/*``."""
    if not accept or not accept.strip():
        return [MediaRange("*/*", {}, 1.0)]
    ranges = []
    for item in re.findall(r'(?:[^,"]|"[^"]*")+', accept):
        pieces = [p.strip() for p in re.findall(r'(?:[^;"]|"[^"]*")+', item)]
        if not pieces:
            continue
        media_type, *params = pieces
        parameters = {}
        for param in params:
            name, _, value = param.partition("=")
            parameters[name.strip().lower()] = value.strip().strip('"')
        try:
            quality = float(parameters.pop("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append(MediaRange(media_type.lower(), parameters, quality))
    return sorted(ranges, key=lambda r: -r.quality)


def _multipart_of(media_range: MediaRange, inner: str) -> bool:
    """``*/*`` or ``multipart/related`` whose ``type`` admits ``inner`` (absent: the default)."""
    if media_range.media_type == "*/*":
        return True
    if media_range.media_type not in ("multipart/related", "multipart/*"):
        return False
    wanted = media_range.parameters.get("type", inner).lower()
    return wanted in (inner, "*/*", inner.split("/")[0] + "/*")


def dicom_syntaxes(accept: str | None) -> set[str] | None:
    """Transfer syntaxes acceptable for ``application/dicom`` parts; None means any."""
    syntaxes: set[str] = set()
    for media_range in media_ranges(accept):
        if not _multipart_of(media_range, DICOM):
            continue
        syntax = media_range.parameters.get("transfer-syntax")
        if syntax in (None, "*") or media_range.media_type == "*/*":
            return None  # instances are answered as stored
        syntaxes.add(syntax)
    if not syntaxes:
        raise NotAcceptable('instances are served as multipart/related; type="application/dicom"')
    return syntaxes


def _check_frames_acceptable(accept: str | None) -> None:
    for media_range in media_ranges(accept):
        syntax = media_range.parameters.get("transfer-syntax")
        if _multipart_of(media_range, OCTETS) and syntax in (None, "*", EXPLICIT_LITTLE):
            return
    raise NotAcceptable(
        'frames and bulk data are served as multipart/related; type="application/octet-stream" '
        f"(uncompressed, transfer syntax {EXPLICIT_LITTLE})"
    )


def check_json_acceptable(accept: str | None, what: str) -> None:
    json_types = (DICOM_JSON, "application/json", "application/*", "*/*")
    if not any(r.media_type in json_types for r in media_ranges(accept)):
        raise NotAcceptable(f"{what} is served as {DICOM_JSON}")


def rendered_media_type(accept: str | None) -> rendering.MediaType:
    for media_range in media_ranges(accept):
        if media_range.media_type in rendering.MEDIA_TYPES:
            media_type: rendering.MediaType = (
                "image/jpeg" if media_range.media_type == "image/jpeg" else "image/png"
            )
            return media_type
        if media_range.media_type in ("image/*", "*/*"):
            return "image/png"
    raise NotAcceptable("rendered images are served as image/png or image/jpeg")


# -- multipart streaming ----------------------------------------------------------


def _part_head(boundary: str, content_type: str, first: bool) -> bytes:
    lead = "" if first else "\r\n"
    return f"{lead}--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()


def _closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


async def _stream(
    chunks: Generator[bytes, None, None], media_type: str, length: int | None = None
) -> StreamingResponse:
    """Stream a synchronous generator from worker threads, primed with its first chunk.

    With a known ``length`` the answer carries ``Content-Length`` instead of chunked
    framing: cheaper for every hop (no framing copy per chunk) and a truncated answer is
    detectable by any client.
    """
    first = await anyio.to_thread.run_sync(next, chunks, None)

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first
            async for chunk in iterate_in_threadpool(chunks):
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(chunks.close)

    headers = {"Content-Length": str(length)} if length is not None else None
    return StreamingResponse(body(), media_type=media_type, headers=headers)


def _instance_heads(views: Sequence[InstanceView], boundary: str) -> list[bytes]:
    return [
        _part_head(boundary, f"{DICOM}; transfer-syntax={view.row.transfer_syntax_uid}", i == 0)
        for i, view in enumerate(views)
    ]


def _instance_parts(
    store: InstanceStore, views: Sequence[InstanceView], heads: Sequence[bytes], boundary: str
) -> Generator[bytes, None, None]:
    for view, head in zip(views, heads, strict=True):
        # ``views`` came from the tenant's own index rows: each blob is read from its row,
        # without another index query per instance.
        for chunk in store.chunks(view):
            if head:
                chunk, head = head + chunk, b""
            yield chunk
        if head:  # an empty instance
            yield head
    yield _closing(boundary)


def _frame_parts(
    store: InstanceStore, tenant: str, view: InstanceView, numbers: Sequence[int], boundary: str
) -> Generator[bytes, None, None]:
    content_type = f"{OCTETS}; transfer-syntax={EXPLICIT_LITTLE}"
    with store.spooled(tenant, view.sop_uid) as spool:
        for index, number in enumerate(numbers):
            frame, _ = rendering.read_frame(spool, number - 1)
            yield _part_head(boundary, content_type, index == 0) + rendering.frame_bytes(frame)
    yield _closing(boundary)


def _multipart_type(inner: str, syntax: str | None, boundary: str) -> str:
    parameters = f"; transfer-syntax={syntax}" if syntax else ""
    return f'multipart/related; type="{inner}"{parameters}; boundary={boundary}'


# -- lookups ------------------------------------------------------------------------


async def _instances(
    services: Services,
    tenant: str,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> list[InstanceView]:
    views = await anyio.to_thread.run_sync(
        lambda: services.store.instances(tenant, study_uid=study, series_uid=series, sop_uid=sop)
    )
    if not views:
        if sop is not None:
            raise NotFound("no such instance in this series of the study")
        raise NotFound("no such series in this study" if series else "no such study here")
    return views


def _instance_url(services: Services, view: InstanceView) -> str:
    return (
        f"{services.settings.base_url()}/dicomweb/studies/{view.study_uid}"
        f"/series/{view.series_uid}/instances/{view.sop_uid}"
    )


def _has_pixels(view: InstanceView) -> bool:
    return view.value("00280010") is not None and view.value("00280011") is not None


def _frames_of(view: InstanceView) -> int:
    try:
        return max(1, int(view.value("00280008") or 1))
    except (TypeError, ValueError):
        return 1


def _check_frames(view: InstanceView, numbers: Sequence[int]) -> None:
    if not _has_pixels(view):
        raise NotFound("this instance has no pixel data")
    count = _frames_of(view)
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise NotFound(f"frame {beyond[0]} does not exist; the instance has {count}")
    rendering.check_decodable(view.row.transfer_syntax_uid)


def _frame_numbers(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"[0-9]{1,9}", p) and int(p) >= 1 for p in parts):
        raise BadRequest("frames must be a comma-separated list of frame numbers from 1")
    return [int(p) for p in parts]


# -- metadata -------------------------------------------------------------------------


def metadata(ds: Dataset, transfer_syntax: str, instance_url: str) -> dict[str, Any]:
    """The data set as DICOM JSON, large binary values (and pixel data) as BulkDataURIs."""
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
        key = f"{int(tag):08X}"
        try:
            element = ds[tag]
            value = element.value
            if isinstance(value, bytes) and len(value) > BULK_THRESHOLD:
                out[key] = {"vr": element.VR, "BulkDataURI": f"{instance_url}/bulkdata/{key}"}
            else:
                out[key] = element.to_json_dict(None, 0)  # nested bulk data stays inline
        except Exception:  # noqa: S112 - a value pydicom cannot express in JSON is left out
            continue
    if "Rows" in ds and "Columns" in ds:
        encapsulated = transfer_syntax not in _NATIVE
        vr = "OB" if encapsulated or int(ds.get("BitsAllocated") or 8) <= 8 else "OW"
        out[PIXEL_DATA] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulkdata/{PIXEL_DATA}"}
    out["00083002"] = {"vr": "UI", "Value": [transfer_syntax]}  # Available Transfer Syntax
    return dict(sorted(out.items()))


def _metadata_items(
    services: Services, tenant: str, views: Sequence[InstanceView]
) -> Generator[bytes, None, None]:
    for index, view in enumerate(views):
        ds = services.store.header(tenant, view.sop_uid)
        item = metadata(ds, view.row.transfer_syntax_uid, _instance_url(services, view))
        yield (b"[" if index == 0 else b",") + json.dumps(item).encode()
    yield b"]"


async def _metadata(
    services: Services, tenant: str, views: list[InstanceView], accept: str | None
) -> Response:
    check_json_acceptable(accept, "metadata")
    return await _stream(_metadata_items(services, tenant, views), DICOM_JSON)


# -- rendering ------------------------------------------------------------------------


@dataclass(frozen=True)
class _RenderRequest:
    media_type: rendering.MediaType
    window: rendering.Window | None
    viewport: tuple[int, int] | None
    quality: int | None


def _render_request(
    request: Request, accept: str | None, default_viewport: tuple[int, int] | None = None
) -> _RenderRequest:
    params = request.query_params
    unknown = [name for name in params if name not in _RENDER_PARAMETERS]
    if unknown:
        raise BadRequest(
            f"unsupported rendering parameter {unknown[0]!r} "
            f"(supported: {', '.join(_RENDER_PARAMETERS)})"
        )
    return _RenderRequest(
        media_type=rendered_media_type(accept),
        window=rendering.parse_window(params["window"]) if "window" in params else None,
        viewport=(
            rendering.parse_viewport(params["viewport"])
            if "viewport" in params
            else default_viewport
        ),
        quality=rendering.parse_quality(params["quality"]) if "quality" in params else None,
    )


async def _rendered(
    services: Services, tenant: str, views: list[InstanceView], number: int, wanted: _RenderRequest
) -> Response:
    """Render frame ``number`` of the first instance that has pixel data."""
    view = next((v for v in views if _has_pixels(v)), None)
    if view is None:
        raise NotFound("nothing here has pixel data to render")
    _check_frames(view, [number])

    def work() -> bytes:
        with services.store.spooled(tenant, view.sop_uid) as spool:
            frame, attributes = rendering.read_frame(spool, number - 1)
        return rendering.render(
            frame,
            attributes,
            media_type=wanted.media_type,
            window=wanted.window,
            viewport=wanted.viewport,
            quality=wanted.quality,
        )

    return Response(await anyio.to_thread.run_sync(work), media_type=wanted.media_type)


# -- routes: retrieve (export) -------------------------------------------------------------


async def _retrieve(
    services: Services, tenant: str, views: list[InstanceView], accept: str | None
) -> Response:
    syntaxes = dicom_syntaxes(accept)
    if syntaxes is not None:
        other = next((v for v in views if v.row.transfer_syntax_uid not in syntaxes), None)
        if other is not None:
            raise NotAcceptable(
                f"an instance is stored as {other.row.transfer_syntax_uid}, which was not "
                "accepted; this node does not transcode (ask with transfer-syntax=*)"
            )
    boundary = secrets.token_hex(16)
    stored = {v.row.transfer_syntax_uid for v in views}
    syntax = next(iter(stored)) if len(stored) == 1 else None
    heads = _instance_heads(views, boundary)
    # Each stored instance decrypts to exactly its recorded size (the tag is checked at
    # its end, and a damaged blob cuts the stream), so the whole length is known ahead.
    length = sum(map(len, heads)) + sum(v.row.size for v in views) + len(_closing(boundary))
    return await _stream(
        _instance_parts(services.store, views, heads, boundary),
        _multipart_type(DICOM, syntax, boundary),
        length,
    )


@router.get(
    STUDY,
    summary="Retrieve a study's instances",
    responses=openapi.dicomweb_ok(STUDY, "get"),
)
async def retrieve_study(
    study: str, access: ExportAccess, services: Services, accept: Accept = None
) -> Response:
    views = await _instances(services, access.tenant, study)
    return await _retrieve(services, access.tenant, views, accept)


@router.get(
    SERIES,
    summary="Retrieve a series' instances",
    responses=openapi.dicomweb_ok(SERIES, "get"),
)
async def retrieve_series(
    study: str, series: str, access: ExportAccess, services: Services, accept: Accept = None
) -> Response:
    views = await _instances(services, access.tenant, study, series)
    return await _retrieve(services, access.tenant, views, accept)


@router.get(
    INSTANCE,
    summary="Retrieve an instance",
    responses=openapi.dicomweb_ok(INSTANCE, "get"),
)
async def retrieve_instance(
    study: str,
    series: str,
    sop: str,
    access: ExportAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    views = await _instances(services, access.tenant, study, series, sop)
    return await _retrieve(services, access.tenant, views, accept)


# -- routes: metadata, frames, bulk data (view) -------------------------------------------


@router.get(
    STUDY + "/metadata",
    summary="A study's metadata",
    responses=openapi.dicomweb_ok(STUDY + "/metadata", "get"),
)
async def study_metadata(
    study: str, access: ViewAccess, services: Services, accept: Accept = None
) -> Response:
    views = await _instances(services, access.tenant, study)
    return await _metadata(services, access.tenant, views, accept)


@router.get(
    SERIES + "/metadata",
    summary="A series' metadata",
    responses=openapi.dicomweb_ok(SERIES + "/metadata", "get"),
)
async def series_metadata(
    study: str, series: str, access: ViewAccess, services: Services, accept: Accept = None
) -> Response:
    views = await _instances(services, access.tenant, study, series)
    return await _metadata(services, access.tenant, views, accept)


@router.get(
    INSTANCE + "/metadata",
    summary="An instance's metadata",
    responses=openapi.dicomweb_ok(INSTANCE + "/metadata", "get"),
)
async def instance_metadata(
    study: str,
    series: str,
    sop: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    views = await _instances(services, access.tenant, study, series, sop)
    return await _metadata(services, access.tenant, views, accept)


async def _frames(
    services: Services, tenant: str, view: InstanceView, numbers: list[int], accept: str | None
) -> Response:
    _check_frames_acceptable(accept)
    _check_frames(view, numbers)
    boundary = secrets.token_hex(16)
    return await _stream(
        _frame_parts(services.store, tenant, view, numbers, boundary),
        _multipart_type(OCTETS, EXPLICIT_LITTLE, boundary),
    )


@router.get(
    INSTANCE + "/frames/{frames}",
    summary="Uncompressed frames of an instance",
    responses=openapi.dicomweb_ok(INSTANCE + "/frames/{frames}", "get"),
)
async def instance_frames(
    study: str,
    series: str,
    sop: str,
    frames: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    numbers = _frame_numbers(frames)
    views = await _instances(services, access.tenant, study, series, sop)
    return await _frames(services, access.tenant, views[0], numbers, accept)


def _bulk_parts(
    services: Services, tenant: str, view: InstanceView, tag: str, boundary: str
) -> Generator[bytes, None, None]:
    ds = services.store.header(tenant, view.sop_uid)
    element = ds.get(int(tag, 16))
    if element is None or not isinstance(element.value, bytes):
        raise NotFound(f"this instance has no bulk data element {tag}")
    yield _part_head(boundary, OCTETS, True) + element.value
    yield _closing(boundary)


@router.get(
    INSTANCE + "/bulkdata/{tag}",
    summary="A bulk data value of an instance",
    responses=openapi.dicomweb_ok(INSTANCE + "/bulkdata/{tag}", "get"),
)
async def instance_bulkdata(
    study: str,
    series: str,
    sop: str,
    tag: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
        raise BadRequest("the bulk data tag must be 8 hexadecimal digits")
    views = await _instances(services, access.tenant, study, series, sop)
    view = views[0]
    if tag.upper() == PIXEL_DATA:
        return await _frames(
            services, access.tenant, view, list(range(1, _frames_of(view) + 1)), accept
        )
    _check_frames_acceptable(accept)
    boundary = secrets.token_hex(16)
    return await _stream(
        _bulk_parts(services, access.tenant, view, tag, boundary),
        _multipart_type(OCTETS, None, boundary),
    )


# -- routes: rendered and thumbnails (view) -------------------------------------------------


@router.get(
    STUDY + "/rendered",
    summary="The study's first image, rendered",
    responses=openapi.dicomweb_ok(STUDY + "/rendered", "get"),
)
async def study_rendered(
    request: Request, study: str, access: ViewAccess, services: Services, accept: Accept = None
) -> Response:
    wanted = _render_request(request, accept)
    views = await _instances(services, access.tenant, study)
    return await _rendered(services, access.tenant, views, 1, wanted)


@router.get(
    SERIES + "/rendered",
    summary="The series' first image, rendered",
    responses=openapi.dicomweb_ok(SERIES + "/rendered", "get"),
)
async def series_rendered(
    request: Request,
    study: str,
    series: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    wanted = _render_request(request, accept)
    views = await _instances(services, access.tenant, study, series)
    return await _rendered(services, access.tenant, views, 1, wanted)


@router.get(
    INSTANCE + "/rendered",
    summary="An instance's first frame, rendered",
    responses=openapi.dicomweb_ok(INSTANCE + "/rendered", "get"),
)
async def instance_rendered(
    request: Request,
    study: str,
    series: str,
    sop: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    wanted = _render_request(request, accept)
    views = await _instances(services, access.tenant, study, series, sop)
    return await _rendered(services, access.tenant, views, 1, wanted)


@router.get(
    INSTANCE + "/frames/{frame}/rendered",
    summary="One frame, rendered",
    responses=openapi.dicomweb_ok(INSTANCE + "/frames/{frame}/rendered", "get"),
)
async def frame_rendered(
    request: Request,
    study: str,
    series: str,
    sop: str,
    frame: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    wanted = _render_request(request, accept)
    numbers = _frame_numbers(frame)
    if len(numbers) != 1:
        raise BadRequest("render one frame at a time")
    views = await _instances(services, access.tenant, study, series, sop)
    return await _rendered(services, access.tenant, views, numbers[0], wanted)


@router.get(
    STUDY + "/thumbnail",
    summary="A small image of the study",
    responses=openapi.dicomweb_ok(STUDY + "/thumbnail", "get"),
)
async def study_thumbnail(
    request: Request, study: str, access: ViewAccess, services: Services, accept: Accept = None
) -> Response:
    wanted = _render_request(request, accept, rendering.THUMBNAIL_SIZE)
    views = await _instances(services, access.tenant, study)
    return await _rendered(services, access.tenant, views, 1, wanted)


@router.get(
    SERIES + "/thumbnail",
    summary="A small image of the series",
    responses=openapi.dicomweb_ok(SERIES + "/thumbnail", "get"),
)
async def series_thumbnail(
    request: Request,
    study: str,
    series: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    wanted = _render_request(request, accept, rendering.THUMBNAIL_SIZE)
    views = await _instances(services, access.tenant, study, series)
    return await _rendered(services, access.tenant, views, 1, wanted)


@router.get(
    INSTANCE + "/thumbnail",
    summary="A small image of the instance",
    responses=openapi.dicomweb_ok(INSTANCE + "/thumbnail", "get"),
)
async def instance_thumbnail(
    request: Request,
    study: str,
    series: str,
    sop: str,
    access: ViewAccess,
    services: Services,
    accept: Accept = None,
) -> Response:
    wanted = _render_request(request, accept, rendering.THUMBNAIL_SIZE)
    views = await _instances(services, access.tenant, study, series, sop)
    return await _rendered(services, access.tenant, views, 1, wanted)
