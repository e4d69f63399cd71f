"""The hub's DICOMweb broker (``{hub}/dicomweb``): consent-checked retrieval from the holding site.

Within a study (every WADO-RS route, and QIDO-RS for a study's series and
instances) one request is one study, one decision, one AuditEvent, one grant
and one call to the node that holds it:

1. find the study by its UID in the index (none: 404);
2. ask the policy (``view`` for metadata, frames, bulk data, rendered images
   and searches within the study; ``export`` for raw instances) with the
   stated break-the-glass reason, if any;
3. write the AuditEvent, allowed or refused, *before* anything is sent (it
   cannot be written: 503, nothing released); refused: 403 with the policy's
   reason;
4. sign a grant (caller, study, action, decision id, audience = the node) and
   call the node with it, never with the caller's token;
5. stream the node's answer back as it comes, ~1 MiB at a time, without
   keeping a copy; node URLs in DICOM JSON answers (RetrieveURL, BulkDataURI)
   are rewritten to the broker's as they pass.

Steps 1-4 run in one worker thread, so the event loop only relays bytes. The
node unreachable is 502, silent for longer than the read timeout 504, both
naming the site's organisation (never its address); its 4xx answers are passed
on as they are. A grant the node refuses (401) or a node failure (5xx) is the
hub's or the site's problem, not the caller's: 502.

The study search ``/dicomweb/studies`` spans sites: its keys are translated to
an ImagingStudy search of the index, the candidates are decided (``search``)
a batch at a time, the page is cut from what is allowed (a hidden study never
shifts a page), and each holding node is asked for its study's attributes,
concurrently and bounded, over one shared keep-alive client. A node that fails
is left out and named in a ``Warning: 299`` header.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import anyio
import httpx
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from sqlalchemy import bindparam, false, select
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from exchange import logs
from exchange.audit.events import AuditAction, What
from exchange.errors import (
    BadRequest,
    ExchangeError,
    Forbidden,
    NotAcceptable,
    NotFound,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from exchange.fhir import search
from exchange.fhir.repository import RES, TOK, Candidate
from exchange.hub import access, auditing
from exchange.hub.nodetransport import AiohttpTransport
from exchange.hub.services import HubServices
from exchange.hub.streams import StreamLimits
from exchange.metrics import BROKER_BYTES
from exchange.policy.decisions import Decision
from exchange.security import grants, tls
from exchange.security.grants import Action
from exchange.security.tokens import Principal
from exchange.uids import is_uid

log = logging.getLogger(__name__)

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
#: Bytes relayed per write: 64 KiB writes cost 3-4x the CPU (DESIGN.md §3a).
CHUNK = 1024 * 1024
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Most index candidates one study search looks at (a wider search is asked to narrow).
MAX_CANDIDATES = 10_000
#: Candidates decided per policy call.
DECISION_BATCH = 500
RETRIEVE_URL = "00081190"
#: Headers of a node's answer that are passed on (hop-by-hop and server headers are not).
PASSED_HEADERS = (
    "content-type",
    "content-length",
    "content-disposition",
    "content-language",
    "warning",
    "etag",
    "last-modified",
)
_JSON_TYPES = ("application/dicom+json", "application/json")

#: QIDO-RS study keys the broker matches in the index, by keyword and by tag.
_KEYS = {
    "PatientID": "00100020",
    "StudyInstanceUID": "0020000D",
    "StudyDate": "00080020",
    "ModalitiesInStudy": "00080061",
    "AccessionNumber": "00080050",
}
_BY_TAG = {tag: keyword for keyword, tag in _KEYS.items()}
_CONTROLS = ("limit", "offset", "includefield", "fuzzymatching")
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
DCM = "http://dicom.nema.org/resources/ontology/DCM"


# -- QIDO-RS study search → index search ---------------------------------------------------


@dataclass(frozen=True)
class StudyQuery:
    """A QIDO-RS study search as the broker runs it."""

    #: ImagingStudy search parameters for the index (sorted newest first).
    criteria: tuple[tuple[str, str], ...]
    limit: int
    offset: int
    #: ``includefield`` values, checked, passed on to the nodes.
    includefields: tuple[str, ...] = ()
    #: The PatientID values asked for (to name the patients in the AuditEvent).
    patient_ids: tuple[str, ...] = ()


def _escape(value: str) -> str:
    """A value as one FHIR search alternative (``\\``, ``,``, ``|`` and ``$`` escaped)."""
    return re.sub(r"([\\,|$])", r"\\\1", value)


def _split(values: Sequence[str], uids: bool = False) -> list[str]:
    """Repeated keys and ``,``-lists (``\\`` too for UIDs) are alternatives; empty is none."""
    separators = r"[,\\]" if uids else r","
    return [v.strip() for value in values for v in re.split(separators, value) if v.strip()]


def _integer(name: str, values: Sequence[str], default: int, low: int) -> int:
    if not values or not values[-1].strip():
        return default
    try:
        number = int(values[-1])
    except ValueError:
        raise BadRequest(f"{name} must be an integer (got {values[-1]!r})") from None
    if number < low:
        raise BadRequest(f"{name} must be at least {low} (got {number})")
    return number


def _includefields(values: Sequence[str]) -> tuple[str, ...]:
    fields: list[str] = []
    for item in _split(values):
        known = item.lower() == "all" or tag_for_keyword(item) is not None
        if not known and re.fullmatch(r"[0-9A-Fa-f]{8}", item):
            known = bool(keyword_for_tag(int(item, 16)))
        if not known:
            raise BadRequest(f"includefield: {item!r} is not a DICOM keyword or tag")
        fields.append(item)
    return tuple(dict.fromkeys(fields))


def _no_wildcards(keyword: str, values: Sequence[str]) -> None:
    if any("*" in v or "?" in v for v in values):
        raise BadRequest(f"{keyword}: the broker matches exact values only (no * or ?)")


def _date_criteria(values: Sequence[str]) -> list[tuple[str, str]]:
    given = [v.strip() for v in values if v.strip()]
    if not given:
        return []
    if len(given) > 1:
        raise BadRequest("StudyDate: give one date or one range (YYYYMMDD, A-B, -B or A-)")
    match = _DATE.match(given[0])
    if not match or not (match.group(1) or match.group(3)) or (match.group(3) and not match[2]):
        raise BadRequest(
            f"StudyDate: {given[0]!r} is not a date or range (YYYYMMDD, A-B, -B or A-)"
        )

    def iso(day: str) -> str:
        return f"{day[:4]}-{day[4:6]}-{day[6:]}"

    start, ranged, end = match.groups()
    if not ranged:
        return [("started", iso(start))]
    criteria = []
    if start:
        criteria.append(("started", f"ge{iso(start)}"))
    if end:
        criteria.append(("started", f"le{iso(end)}"))
    return criteria


def parse_study_query(params: Sequence[tuple[str, str]]) -> StudyQuery:
    """Translate QIDO-RS study keys to an index search; an unsupported key is a 400."""
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        key = name if name in _CONTROLS else _BY_TAG.get(name.upper(), name)
        if key not in _CONTROLS and key not in _KEYS:
            supported = ", ".join([*_KEYS, *_CONTROLS])
            raise BadRequest(
                f"the broker cannot search studies by {name!r}; it supports {supported}"
            )
        grouped.setdefault(key, []).append(value)
    fuzzy = (grouped.pop("fuzzymatching", None) or ["false"])[-1].lower()
    if fuzzy not in ("true", "false"):
        raise BadRequest(f"fuzzymatching must be true or false (got {fuzzy!r})")
    limit = min(_integer("limit", grouped.pop("limit", []), DEFAULT_LIMIT, 1), MAX_LIMIT)
    offset = _integer("offset", grouped.pop("offset", []), 0, 0)
    includefields = _includefields(grouped.pop("includefield", []))
    criteria: list[tuple[str, str]] = []
    patient_ids: list[str] = []
    for keyword, values in grouped.items():
        if keyword == "StudyDate":
            criteria += _date_criteria(values)
            continue
        split = _split(values, uids=keyword == "StudyInstanceUID")
        if not split:
            continue  # universal matching: no constraint
        if keyword == "StudyInstanceUID":
            bad = next((v for v in split if not is_uid(v)), None)
            if bad is not None:
                raise BadRequest(f"StudyInstanceUID: {bad!r} is not a DICOM UID")
            uids = [f"{access.DICOM_UID_SYSTEM}|urn:oid:{v}" for v in split]
            criteria.append(("identifier", ",".join(uids)))
        elif keyword == "ModalitiesInStudy":
            bad = next((v for v in split if not _MODALITY.match(v)), None)
            if bad is not None:
                raise BadRequest(f"ModalitiesInStudy: {bad!r} is not a modality code")
            criteria.append(("modality", ",".join(f"{DCM}|{v}" for v in split)))
        elif keyword == "AccessionNumber":
            _no_wildcards(keyword, split)
            criteria.append(("identifier", ",".join(_escape(v) for v in split)))
        else:  # PatientID: the patient's identifier, under any system, at any linked record
            _no_wildcards(keyword, split)
            patient_ids += split
            criteria.append(("patient.identifier", ",".join(_escape(v) for v in split)))
    criteria.append(("_sort", "-started"))
    return StudyQuery(tuple(criteria), limit, offset, includefields, tuple(patient_ids))


# -- index lookups --------------------------------------------------------------------------


def _study_search(services: HubServices, criteria: Sequence[tuple[str, str]]) -> search.SearchQuery:
    query = search.parse(
        "ImagingStudy", criteria, local_base=f"{services.settings.base_url()}/fhir"
    )
    return services.patients.expand(query)


#: One indexed study by its DICOM UID: a single probe of the token index, no body loaded
#: (the decision, the audit and the holder need only the facts kept beside it).
_BY_UID = (
    select(RES.c.pk, RES.c.id, RES.c.facts)
    .select_from(TOK.join(RES, RES.c.pk == TOK.c.res_pk))
    .where(
        TOK.c.rtype == "ImagingStudy",
        TOK.c.param == "identifier",
        TOK.c.system == access.DICOM_UID_SYSTEM,
        TOK.c.code == bindparam("code"),
        RES.c.deleted == false(),
    )
    .order_by(RES.c.pk)
    .limit(1)
)


def find_study(services: HubServices, uid: str) -> Candidate | None:
    """The indexed ImagingStudy whose DICOM Study Instance UID is ``uid``, or None."""
    with services.engine.connect() as conn:
        row = conn.execute(_BY_UID, {"code": f"urn:oid:{uid}"}).first()
    if row is None:
        return None
    return Candidate(row.pk, "ImagingStudy", row.id, json.loads(row.facts))


def _site(holder: access.Holder) -> str:
    """How a site is named to callers: its organisation, never its address."""
    return f"site {holder.organization or holder.node}"


# -- streaming ------------------------------------------------------------------------------


class Rewriter:
    """Replaces one byte string with another in a stream cut at arbitrary places."""

    def __init__(self, old: bytes, new: bytes) -> None:
        if not old:
            raise ValueError("nothing to replace")
        self._old = old
        self._new = new
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._tail + chunk
        out: list[bytes] = []
        start = 0
        while (found := data.find(self._old, start)) >= 0:
            out += (data[start:found], self._new)
            start = found + len(self._old)
        # Hold back what could be the start of a match cut by the chunk boundary.
        rest = data[start:]
        keep = min(len(rest), len(self._old) - 1)
        out.append(rest[: len(rest) - keep])
        self._tail = rest[len(rest) - keep :]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._tail = self._tail, b""
        return rest


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def passed_headers(upstream: httpx.Headers, rewritten: bool) -> dict[str, str]:
    """The node's response headers a caller gets (no hop-by-hop, server or cookies);
    without a length when the body changes on the way (rewritten, or decoded: the node
    is asked for ``identity`` and any content coding it used anyway is undone)."""
    headers = {}
    changed = rewritten or upstream.get("content-encoding", "identity").lower() != "identity"
    for name in PASSED_HEADERS:
        if name == "content-length" and changed:
            continue
        values = upstream.get_list(name)
        if values:
            headers[name] = ", ".join(values)
    return headers


class NodeStreamBroken(Exception):
    """A node's answer broke off after the caller's answer started: the connection is cut,
    so that the caller never takes a truncated answer for a whole one."""


async def gathered(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The node's body in ~1 MiB chunks (the last one shorter).

    Bytes arrive a socket read at a time; they are joined with one copy (small writes
    to the caller cost 3-4x the CPU; httpx's own re-chunking copies each byte several
    times).
    """
    pieces: list[bytes] = []
    size = 0
    async for piece in upstream.aiter_bytes():
        pieces.append(piece)
        size += len(piece)
        if size >= CHUNK:
            yield b"".join(pieces)
            pieces.clear()
            size = 0
    if pieces:
        yield b"".join(pieces)


async def _relay(
    first: bytes,
    rest: AsyncIterator[bytes],
    upstream: httpx.Response,
    rewriter: Rewriter | None,
    site: str,
) -> AsyncIterator[bytes]:
    """A node's answer from its first chunk (already read) on, as it comes."""
    try:
        yield rewriter.feed(first) if rewriter is not None else first
        async for chunk in rest:
            out = rewriter.feed(chunk) if rewriter is not None else chunk
            if out:
                yield out
        if rewriter is not None and (tail := rewriter.flush()):
            yield tail
    except httpx.HTTPError as exc:
        log.warning("node answer broke off", extra={"site": site, "error": type(exc).__name__})
        raise NodeStreamBroken(site) from None
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()


def accepts_json(accept: str | None) -> None:
    """406 unless ``Accept`` admits DICOM JSON."""
    if not accept or not accept.strip():
        return
    wanted = {
        part.split(";")[0].strip().lower()
        for part in accept.split(",")
        if "q=0" not in part.replace(" ", "").split(";")[1:]
    }
    if not wanted & {*_JSON_TYPES, "application/*", "*/*"}:
        raise NotAcceptable(f"a search result is served as {DICOM_JSON}")


# -- the broker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """A decided, audited and granted call to the node holding one study."""

    site: str
    url: str
    grant: str
    #: ``{node}/dicomweb`` as it appears in the node's DICOM JSON, and its broker twin.
    rewrite: tuple[bytes, bytes] | None
    #: The holding node's id (concurrency limits and metrics count by it).
    node: str = ""


@dataclass(frozen=True)
class _Found:
    """One allowed study of a cross-site search, with its grant (None: its site is unknown)."""

    uid: str
    site: str
    address: str | None
    grant: str | None
    #: The holding node's id (concurrency limits count by it).
    node: str = ""


@dataclass(frozen=True)
class _Context:
    """What a search's AuditEvent and decisions need besides the query."""

    query: str
    reason: str | None
    address: str | None


@dataclass
class _Page:
    studies: list[_Found] = field(default_factory=list)
    more: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class StudyRequest:
    """One request within a study, as the route gives it."""

    study: str
    action: Action
    #: The node path below ``/dicomweb`` (built from checked path parameters).
    path: str
    query: str
    accept: str | None
    reason: str | None
    address: str | None


def _close_all(closers: Sequence[Callable[[], None]]) -> None:
    for close in closers:
        close()


class _ClosingStream(StreamingResponse):
    """A relayed answer that ends its broker streams when it is done, however it ends."""

    closers: Sequence[Callable[[], None]] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _close_all(self.closers)


async def _counting(chunks: AsyncIterator[bytes], counter: Any) -> AsyncIterator[bytes]:
    """``chunks``, adding their sizes to a bytes counter as they pass."""
    async for chunk in chunks:
        counter.inc(len(chunk))
        yield chunk


class Broker:
    """Locate, decide, audit, grant and proxy; one per hub process (built in the lifespan)."""

    def __init__(self, services: HubServices, transport: httpx.AsyncBaseTransport) -> None:
        settings = services.settings
        self._services = services
        self._base = settings.base_url()
        self._dicomweb = f"{self._base}{PREFIX}"
        timeout = httpx.Timeout(
            settings.broker_read_timeout_seconds,
            connect=settings.broker_connect_timeout_seconds,
            pool=settings.broker_connect_timeout_seconds,
        )
        self._timeout = timeout.as_dict()
        # One pool of keep-alive connections to the nodes. Calls within a study go to the
        # transport itself (the client's redirect, cookie and auth layers cost ~0.1 ms a
        # request and do nothing here); the cross-site search uses the client over it.
        self._transport = transport
        self._client = httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
        )
        self.streams = StreamLimits(
            settings.broker_streams_per_caller, settings.broker_streams_per_node
        )

    @classmethod
    def open(cls, services: HubServices) -> Broker:
        """A broker with its own connection pool, sized and timed by the settings."""
        settings = services.settings
        # TLS to the nodes (trust, the hub's client certificate, HTTPS only in production).
        transport: httpx.AsyncBaseTransport = AiohttpTransport(
            ssl_context=tls.client_context(settings, identify=True),
            max_connections=settings.broker_max_connections,
            keepalive_seconds=settings.broker_keepalive_seconds,
        )
        if not settings.dev_mode:
            transport = tls.HttpsOnlyTransport(transport)
        return cls(services, transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- within a study ---------------------------------------------------------------------
    async def study(self, principal: Principal, request: StudyRequest) -> Response:
        """Answer one WADO-RS or in-study QIDO-RS request from the node holding the study."""
        started = time.perf_counter()
        # Counted from before the decision until the answer is relayed (exchange.hub.streams).
        closers = [self.streams.caller(principal.sub)]
        try:
            call = await anyio.to_thread.run_sync(self._authorize, principal, request)
            closers.append(self.streams.node(call.node, call.site))
            response = await self._relayed(call, request, started)
        except BaseException:
            _close_all(closers)
            raise
        if isinstance(response, _ClosingStream):
            response.closers = closers
        else:
            _close_all(closers)
        return response

    async def _relayed(self, call: _Call, request: StudyRequest, started: float) -> Response:
        """The node's answer to ``call``: whole when small, else a stream being relayed."""
        decided = time.perf_counter()
        url = call.url + request.path + (f"?{request.query}" if request.query else "")
        headers = {"Authorization": f"Bearer {call.grant}", "Accept-Encoding": "identity"}
        if request.accept:
            headers["Accept"] = request.accept
        request_id = logs.request_id.get()
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        upstream = await self._send(url, headers, call.site)
        answered = time.perf_counter()
        timing = (
            f"authorize;dur={(decided - started) * 1000:.2f}, "
            f"site;dur={(answered - decided) * 1000:.2f}"
        )
        counted = BROKER_BYTES.labels(call.node)
        try:
            rewriter = None
            if call.rewrite and _media_type(upstream.headers.get("content-type")) in _JSON_TYPES:
                rewriter = Rewriter(*call.rewrite)
            passed = passed_headers(upstream.headers, rewritten=rewriter is not None)
            passed["Server-Timing"] = timing
            chunks = gathered(upstream)
            # The first chunk is in hand before the status line goes out: a node that
            # breaks off before it is a clean 502, and a small answer (most: metadata,
            # rendered frames) is sent whole, with its length, in one write.
            try:
                first = await anext(chunks, b"")
            except httpx.HTTPError:
                raise UpstreamError(f"the {call.site} broke off its answer") from None
            if len(first) < CHUNK:
                await upstream.aclose()
                counted.inc(len(first))
                body = rewriter.feed(first) + rewriter.flush() if rewriter else first
                return Response(body, status_code=upstream.status_code, headers=passed)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
            raise
        counted.inc(len(first))
        return _ClosingStream(
            _relay(first, _counting(chunks, counted), upstream, rewriter, call.site),
            status_code=upstream.status_code,
            headers=passed,
        )

    def _authorize(self, principal: Principal, request: StudyRequest) -> _Call:
        """Steps 1-4 (worker thread): find, decide, audit, grant."""
        services = self._services
        audited: AuditAction = request.action
        stored = find_study(services, request.study)
        if stored is None:
            auditing.record(
                services,
                action=audited,
                principal=principal,
                address=request.address,
                what=What(study_uid=request.study, query=request.query or None),
                decision=None,
                allowed=False,
                reason="no such study in the index",
                break_glass_reason=request.reason,
            )
            raise NotFound("no study with this Study Instance UID is known to the exchange")
        decision = access.decide_study(
            services, principal, request.action, stored, reason=request.reason
        )
        auditing.record(
            services,
            action=audited,
            principal=principal,
            address=request.address,
            what=auditing.study_what(stored, request.query or None, services),
            decision=decision,
            allowed=decision.allow,
            break_glass_reason=request.reason,
        )
        if not decision.allow:
            raise Forbidden(decision.reason())
        holder = access.holder(services, stored)
        if holder is None or not holder.address:
            raise UpstreamError("the site holding this study is not known to the exchange")
        return _Call(
            site=_site(holder),
            url=holder.address.rstrip("/"),
            grant=self._grant(principal, request.study, request.action, decision, holder),
            rewrite=(holder.address.rstrip("/").encode(), self._dicomweb.encode()),
            node=holder.node,
        )

    def _grant(
        self,
        principal: Principal,
        study: str,
        action: Action,
        decision: Decision,
        holder: access.Holder,
    ) -> str:
        services = self._services
        return grants.issue(
            services.grant_key,
            issuer=self._base,
            node=holder.node,
            caller=principal.sub,
            study=study,
            action=action,
            decision=decision.decision_id,
            organization=holder.organization,
            ttl=services.settings.grant_ttl_seconds,
        )

    async def _send(self, url: str, headers: Mapping[str, str], site: str) -> httpx.Response:
        """The node's answer with its body still to come; failures as 502/504."""
        request = httpx.Request("GET", url, headers=headers, extensions={"timeout": self._timeout})
        try:
            upstream = await self._transport.handle_async_request(request)
            upstream.request = request
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"the {site} did not answer in time") from None
        except httpx.HTTPError:
            raise UpstreamError(f"the {site} cannot be reached") from None
        if upstream.status_code == 401 or upstream.status_code >= 500:
            status = upstream.status_code
            await upstream.aclose()
            log.warning("node refused or failed", extra={"site": site, "status": status})
            if status == 504:
                raise UpstreamTimeout(f"the {site} did not answer in time")
            what = "did not accept the hub's grant" if status == 401 else "failed"
            raise UpstreamError(f"the {site} {what} (HTTP {status})")
        return upstream

    # -- across sites -----------------------------------------------------------------------
    async def search_studies(
        self,
        principal: Principal,
        params: Sequence[tuple[str, str]],
        *,
        query: str,
        accept: str | None,
        reason: str | None,
        address: str | None,
    ) -> Response:
        """QIDO-RS ``/studies`` over every site: what the caller may find, merged."""
        accepts_json(accept)
        asked = parse_study_query(params)
        close = self.streams.caller(principal.sub)
        try:
            return await self._search(principal, asked, _Context(query, reason, address))
        finally:
            close()

    async def _search(self, principal: Principal, asked: StudyQuery, context: _Context) -> Response:
        page = await anyio.to_thread.run_sync(self._search_page, principal, asked, context)
        answers: dict[int, list[dict[str, Any]]] = {}
        failed: dict[str, str] = {}
        limiter = anyio.CapacityLimiter(self._services.settings.broker_max_streams)

        async def ask(index: int, found: _Found) -> None:
            async with limiter:
                try:
                    close = self.streams.node(found.node, found.site)
                    try:
                        answers[index] = await self._study_attributes(found, asked.includefields)
                    finally:
                        close()
                except ExchangeError as exc:
                    failed.setdefault(found.site, exc.message)
                    log.warning("a site left out of a study search", extra={"site": found.site})

        async with anyio.create_task_group() as group:
            for index, found in enumerate(page.studies):
                group.start_soon(ask, index, found)
        results = [item for index in sorted(answers) for item in answers[index]]
        response = JSONResponse(results, media_type=DICOM_JSON)
        for site in sorted(failed):
            response.headers.append(
                "Warning", f'299 {self._base} "{site} did not answer; its studies are left out"'
            )
        if page.truncated:
            response.headers.append(
                "Warning",
                f'299 {self._base} "The search matched too many studies to check them all; '
                'narrow it"',
            )
        elif page.more:
            response.headers.append(
                "Warning", f'299 {self._base} "There are additional results that can be requested"'
            )
        return response

    def _search_page(self, principal: Principal, asked: StudyQuery, context: _Context) -> _Page:
        """(Worker thread) the allowed studies of one page, audited, each with its grant."""
        services = self._services
        index_query = _study_search(services, asked.criteria)
        page = _Page()
        allowed: list[tuple[Candidate, Decision]] = []
        skip, wanted = asked.offset, asked.limit
        seen = 0
        batches = services.resources.candidate_batches(index_query, DECISION_BATCH)
        try:
            for batch in batches:
                seen += len(batch)
                verdicts = access.decide(
                    services, principal, "search", batch, reason=context.reason
                )
                for candidate, decision in zip(batch, verdicts, strict=True):
                    if not decision.allow:
                        continue
                    if skip:
                        skip -= 1
                    elif len(allowed) < wanted:
                        allowed.append((candidate, decision))
                    else:
                        page.more = True
                        break
                if page.more:
                    break
                if seen >= MAX_CANDIDATES:
                    page.truncated = True
                    break
        finally:
            batches.close()
        auditing.record(
            services,
            action="search",
            principal=principal,
            address=context.address,
            what=What(patients=self._patients(asked, allowed), query=context.query or None),
            decision=None,
            allowed=True,
            break_glass_reason=context.reason,
        )
        holders: dict[tuple[str, ...], access.Holder | None] = {}
        for candidate, decision in allowed:
            key = tuple(candidate.facts.get("endpoint", ()))
            if key not in holders:
                holders[key] = access.holder(services, candidate)
            holder = holders[key]
            uid = (
                access.code_of(candidate.facts.get("identifier", ()), access.DICOM_UID_SYSTEM) or ""
            ).removeprefix("urn:oid:")
            if holder is None or not holder.address or not uid:
                page.studies.append(_Found(uid, "an unknown site", None, None))
                continue
            grant = self._grant(principal, uid, "view", decision, holder)
            page.studies.append(
                _Found(uid, _site(holder), holder.address.rstrip("/"), grant, holder.node)
            )
        return page

    def _patients(
        self, asked: StudyQuery, allowed: Sequence[tuple[Candidate, Decision]]
    ) -> tuple[str, ...]:
        """The patients a search names (by PatientID), as the index knows them."""
        if not asked.patient_ids:
            return ()
        return auditing.patients_of([candidate for candidate, _ in allowed])

    async def _study_attributes(
        self, found: _Found, includefields: Sequence[str]
    ) -> list[dict[str, Any]]:
        """The node's QIDO-RS answer for one study, its RetrieveURL pointing at the broker."""
        if found.address is None or found.grant is None:
            raise UpstreamError(f"{found.site} is not known to the exchange")
        params = [("StudyInstanceUID", found.uid), *(("includefield", f) for f in includefields)]
        url = f"{found.address}/studies?{urlencode(params)}"
        headers = {"Authorization": f"Bearer {found.grant}", "Accept": DICOM_JSON}
        request_id = logs.request_id.get()
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        try:
            response = await self._client.get(url, headers=headers)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"the {found.site} did not answer in time") from None
        except httpx.HTTPError:
            raise UpstreamError(f"the {found.site} cannot be reached") from None
        if response.status_code != 200:
            log.warning(
                "node search failed", extra={"site": found.site, "status": response.status_code}
            )
            raise UpstreamError(f"the {found.site} failed (HTTP {response.status_code})")
        try:
            results = json.loads(response.content)
        except ValueError:
            raise UpstreamError(f"the {found.site} answered with invalid JSON") from None
        if not isinstance(results, list):
            raise UpstreamError(f"the {found.site} answered with something other than a list")
        retrieve = f"{self._dicomweb}/studies/{found.uid}"
        return [
            {**item, RETRIEVE_URL: {"vr": "UR", "Value": [retrieve]}}
            for item in results
            if isinstance(item, dict)
        ]


def broker_of(state: Any) -> Broker:
    """The running broker (503 before start-up finished or after shutdown began)."""
    broker = getattr(state, "broker", None)
    if not isinstance(broker, Broker):
        raise Unavailable("the DICOMweb broker is not running")
    return broker
