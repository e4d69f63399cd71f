"""Where patients' FHIR ``Consent`` resources come from: the hub's index or the HIE's registry.

Consent is not ours (DESIGN.md §1): the HIE's consent registry may be the hub's own
index (the default) or any other FHIR server. Either way the decision point is given
the Consents whose ``patient`` is one of a study's Patient ids *as the hub knows them*,
with ``patient.reference`` = ``Patient/<hub id>``, because that is what the Rego
policies match on (docs/policy.md, "How consents are read").

- ``IndexConsentSource`` searches the hub's own index (no HTTP).
- ``RegistryConsentSource`` searches another FHIR server. Patient ids differ between
  servers, so by default it looks the patient up by the *identifiers* of the hub's
  Patient record (site MRNs, the HIE-wide id): ``Consent?patient.identifier=s|v,...``
  (a chained search: the registry resolves the Consent's patient and matches its
  identifiers). A registry that shares the hub's Patient ids can be searched with
  ``Consent?patient=<id>`` instead (``match="id"``). Each Consent found is handed out
  with its ``patient`` rewritten to the hub's id and ``meta.source`` naming where it
  came from, one copy per hub Patient id it was found for. Other references in it
  (``Organization/...`` actors, ``ImagingStudy/...`` data) are passed on as the
  registry wrote them: the registry must use the HIE's ids for those (or study UIDs).

The registry's answers are cached per query. A cached answer younger than
``cache_seconds`` is used without asking; an older one is asked again, and if the
registry cannot answer, the cached answer is used only while it is younger than
``max_staleness_seconds``. Beyond that ``consents_for`` raises ``Unavailable`` and the
caller denies (fail closed). An answer is always complete: every page, for every
patient asked about, or an error — never part of it.
"""

from __future__ import annotations

import copy
import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx

from exchange.errors import Gone, NotFound, Unavailable
from exchange.fhir.repository import Repository

log = logging.getLogger(__name__)

#: FHIR ids (anything else cannot be a Patient id, so it has no Consents).
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")
#: Consents asked for per registry page, and the most pages one query may take.
PAGE_SIZE = 100
MAX_PAGES = 20
#: Most registry answers kept in the cache (least recently used go first).
MAX_CACHED = 10_000
#: Longest the readiness check waits for the registry (readiness itself gives up at 5 s).
CHECK_TIMEOUT_SECONDS = 3.0

Identifier = tuple[str, str]
#: The identifiers (system, value) of the hub's Patient with this id; none if unknown.
PatientIdentifiers = Callable[[str], Sequence[Identifier]]


class ConsentSource(Protocol):
    """Consents for the decision point, wherever the HIE keeps them."""

    def consents_for(self, patient_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Every Consent (any status) whose patient is one of ``patient_ids`` (hub ids),
        as FHIR JSON with ``patient.reference`` = ``Patient/<hub id>``. Raises
        ``Unavailable`` when the answer cannot be had: the caller must then deny."""
        ...

    def check(self) -> None:
        """Raise unless consents can be had (readiness)."""
        ...

    def close(self) -> None: ...


def _is_id(value: str) -> bool:
    return 0 < len(value) <= 64 and set(value) <= _ID_CHARS


# -- the hub's own index -----------------------------------------------------------


class IndexConsentSource:
    """Consents stored in the hub's own FHIR index."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    def consents_for(self, patient_ids: Sequence[str]) -> list[dict[str, Any]]:
        ids = list(dict.fromkeys(p for p in patient_ids if _is_id(p)))
        return self._repository.referencing("Consent", "patient", "Patient", ids)

    def check(self) -> None:
        """Always ready: the index is the database, which has its own check."""

    def close(self) -> None:
        """Nothing to release."""


def index_identifiers(repository: Repository) -> PatientIdentifiers:
    """Look a hub Patient's identifiers up in the hub's index (for the registry source)."""

    def identifiers(patient_id: str) -> list[Identifier]:
        if not _is_id(patient_id):
            return []
        try:
            body = repository.read("Patient", patient_id).body
        except (NotFound, Gone):
            return []
        return [
            (str(i["system"]), str(i["value"]))
            for i in body.get("identifier") or []
            if isinstance(i, dict) and i.get("system") and i.get("value")
        ]

    return identifiers


# -- an external consent registry --------------------------------------------------


class _RegistryError(Exception):
    """The registry did not give a whole, well-formed answer."""


#: What a registry that is down, slow or talking nonsense raises here.
_FAILURES = (_RegistryError, httpx.HTTPError, ValueError, TypeError, AttributeError, KeyError)


@dataclass(frozen=True)
class _Cached:
    fetched_at: float
    consents: tuple[dict[str, Any], ...]


def _escape(value: str) -> str:
    """A FHIR search value with ``\\``, ``,``, ``|`` and ``$`` escaped."""
    for char in ("\\", ",", "|", "$"):
        value = value.replace(char, "\\" + char)
    return value


class RegistryConsentSource:
    """Consents from the HIE's consent registry: any FHIR server's search API.

    Thread-safe: one shared HTTP client (keep-alive) and a locked cache.
    """

    def __init__(
        self,
        url: str,
        *,
        identifiers: PatientIdentifiers,
        token: str | None = None,
        basic: tuple[str, str] | None = None,
        cache_seconds: float = 60.0,
        max_staleness_seconds: float = 300.0,
        timeout: float = 5.0,
        match: Literal["identifier", "id"] = "identifier",
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if max_staleness_seconds < cache_seconds:
            raise ValueError("max_staleness_seconds must be at least cache_seconds")
        if token and basic:
            raise ValueError("give the registry a token or basic credentials, not both")
        self.url = url.rstrip("/")
        self.cache_seconds = cache_seconds
        self.max_staleness_seconds = max_staleness_seconds
        self._identifiers = identifiers
        self._match = match
        self._clock = clock
        self._origin = urlsplit(self.url)[:2]
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            headers=headers,
            auth=httpx.BasicAuth(*basic) if basic else None,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
            verify=verify,
        )
        self._timeout = timeout
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[tuple[str, str], ...], _Cached] = OrderedDict()
        self._last_contact: float | None = None

    # -- the answer ------------------------------------------------------------------
    def consents_for(self, patient_ids: Sequence[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for patient_id in dict.fromkeys(patient_ids):
            params = self._query(patient_id)
            if params is None:
                continue
            for consent in self._answer(params):
                found.append(self._as_hub_consent(consent, patient_id))
        return found

    def _query(self, patient_id: str) -> tuple[tuple[str, str], ...] | None:
        """The registry search for one hub Patient; None when it cannot have Consents."""
        if not _is_id(patient_id):
            return None
        if self._match == "id":
            return (("patient", patient_id),)
        tokens = sorted({f"{_escape(s)}|{_escape(v)}" for s, v in self._identifiers(patient_id)})
        if not tokens:
            log.warning("a patient has no identifier to look its consents up in the registry")
            return None
        return (("patient.identifier", ",".join(tokens)),)

    def _answer(self, params: tuple[tuple[str, str], ...]) -> tuple[dict[str, Any], ...]:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(params)
            if cached is not None:
                self._cache.move_to_end(params)
        if cached is not None and now - cached.fetched_at < self.cache_seconds:
            return cached.consents
        started = self._clock()  # an answer is as old as the question that got it
        try:
            consents = self._fetch(params)
        except _FAILURES as exc:
            now = self._clock()
            log.warning("the consent registry did not answer", extra={"error": type(exc).__name__})
            if cached is not None and now - cached.fetched_at <= self.max_staleness_seconds:
                return cached.consents
            raise Unavailable(
                "the consent registry is unreachable and the cached consents are older than "
                f"{self.max_staleness_seconds:g} s"
            ) from None
        with self._lock:
            self._last_contact = max(self._last_contact or started, started)
            newer = self._cache.get(params)
            if newer is None or newer.fetched_at <= started:  # a slower, older fetch loses
                self._cache[params] = _Cached(started, consents)
                self._cache.move_to_end(params)
            self._evict(started)
        return consents

    def _evict(self, now: float) -> None:
        """Drop answers too old to be used even when the registry is down, then the LRU."""
        for key in [
            k for k, v in self._cache.items() if now - v.fetched_at > self.max_staleness_seconds
        ]:
            del self._cache[key]
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)

    def _fetch(self, params: tuple[tuple[str, str], ...]) -> tuple[dict[str, Any], ...]:
        """Every page of one search, or ``_RegistryError``."""
        found: dict[str, dict[str, Any]] = {}
        url: str | None = f"{self.url}/Consent"
        query: httpx.QueryParams | None = httpx.QueryParams([*params, ("_count", PAGE_SIZE)])
        for _ in range(MAX_PAGES):
            assert url is not None
            response = self._client.get(url, params=query)
            if response.status_code != 200:
                raise _RegistryError(f"the registry answered {response.status_code}")
            bundle = response.json()
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise _RegistryError("the registry's answer is not a Bundle")
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                mode = (entry.get("search") or {}).get("mode", "match")
                if not isinstance(resource, dict) or mode != "match":
                    continue
                if resource.get("resourceType") != "Consent":
                    continue
                key = str(entry.get("fullUrl") or resource.get("id") or len(found))
                found[key] = resource
            url = self._next(bundle)
            if url is None:
                return tuple(found.values())
            query = None  # the next link carries the query
        raise _RegistryError(f"more than {MAX_PAGES} pages of consents for one patient")

    def _next(self, bundle: dict[str, Any]) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                target = str(link["url"])
                if urlsplit(target)[:2] != self._origin:
                    # Never send the registry's credentials anywhere else.
                    raise _RegistryError("the registry's next link points at another server")
                return target
        return None

    def _as_hub_consent(self, consent: dict[str, Any], patient_id: str) -> dict[str, Any]:
        """A copy that names the hub's Patient and says where it came from."""
        result = copy.deepcopy(consent)
        source = f"{self.url}/Consent/{consent['id']}" if consent.get("id") else self.url
        result["meta"] = {**(result.get("meta") or {}), "source": source}
        result["patient"] = {"reference": f"Patient/{patient_id}"}
        return result

    # -- readiness -------------------------------------------------------------------
    def check(self) -> None:
        """Ready while the registry answers ``/metadata``, or while answers got from it
        are still young enough to be used (``max_staleness_seconds``)."""
        try:
            response = self._client.get(
                f"{self.url}/metadata", timeout=min(self._timeout, CHECK_TIMEOUT_SECONDS)
            )
            if response.status_code != 200:
                raise _RegistryError(f"the registry answered {response.status_code}")
            if response.json().get("resourceType") != "CapabilityStatement":
                raise _RegistryError("the registry's metadata is not a CapabilityStatement")
        except _FAILURES as exc:
            now = self._clock()
            with self._lock:
                last = self._last_contact
            if last is not None and now - last <= self.max_staleness_seconds:
                return
            raise Unavailable(
                "the consent registry is unreachable and the cached consents are older than "
                f"{self.max_staleness_seconds:g} s"
            ) from exc
        with self._lock:
            self._last_contact = self._clock()

    def close(self) -> None:
        self._client.close()
