"""Node -> hub publishing: the worker that empties the outbox.

For each due outbox row the worker makes the hub's index match the node:

- ``publish``: the organisation's Endpoint (conditional update on the
  ``urn:exchange:node`` identifier, whose value the hub's broker uses as the
  grant audience), the Patient (conditional update on the site MRN), then the
  ImagingStudy (conditional update on its DICOM UID and the site's Endpoint).
  Conditional updates make a resend harmless: the hub keeps one resource and
  creates no new version when nothing changed.
- ``retract``: find the study at the hub by UID and Endpoint and delete it.

A row leaves the outbox only when the hub has the revision that was sent.
Connection errors, 5xx, 429 and a 401 that a fresh token does not cure are
retried with exponential backoff (the whole worker pauses: the hub is the
problem, not the study); a refusal that retrying cannot fix (400, 403, 404,
409, 412, 422) parks the row as ``failed`` with the hub's explanation, for
``exchange node reconcile`` to retry. Logs name rows by outbox id and tenant,
never by UID or patient.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx
import jwt
from sqlalchemy.exc import OperationalError

from exchange import logs, metrics
from exchange.config import Settings, TenantSettings
from exchange.dicom import imagingstudy
from exchange.errors import ConfigurationError
from exchange.node import outbox
from exchange.node.outbox import Entry, Outbox
from exchange.node.store import InstanceStore
from exchange.security.tls import httpx_verify

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
NODE_SYSTEM = "urn:exchange:node"
CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
#: What a site system needs at the hub, and no more.
SCOPES = "system/Endpoint.rus system/Patient.rus system/ImagingStudy.ruds"
#: A token is renewed this long before it expires (at most; a fifth of a short lifetime).
TOKEN_MARGIN_SECONDS = 60.0
#: The Endpoint is published again after this long (its address may have changed).
ENDPOINT_REFRESH_SECONDS = 300.0
#: Rows taken per round of the worker.
BATCH = 50
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_LOCATION = re.compile(r"/([A-Za-z]+)/([A-Za-z0-9\-.]{1,64})/_history/")


class Transient(Exception):
    """The hub (or the IdP) is unreachable or failing: try again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Refused(Exception):
    """The hub refused the content: retrying the same thing cannot help."""


def search_escape(value: str) -> str:
    """A FHIR search value with its special characters escaped."""
    return re.sub(r"([\\,|$])", r"\\\1", value)


def outcome_text(response: httpx.Response) -> str:
    """The hub's explanation (OperationOutcome diagnostics), short."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        texts = [
            f"{i.get('diagnostics') or i.get('code')}"
            + (f" at {', '.join(i['expression'])}" if i.get("expression") else "")
            for i in body.get("issue") or []
            if isinstance(i, dict)
        ]
        if texts:
            return f"HTTP {response.status_code}: " + "; ".join(texts)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"HTTP {response.status_code}: {body['error'].get('message', '')}"
    return f"HTTP {response.status_code}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None


# -- credentials ----------------------------------------------------------------


class TokenSource:
    """Bearer tokens for one site-system credential, cached until shortly before expiry.

    Either a static token, or OAuth2 client credentials (HTTP Basic) at the token
    endpoint: ``token_url`` if given, else the one the issuer's OIDC discovery names.
    """

    def __init__(
        self,
        http: httpx.Client,
        *,
        static: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_url: str | None = None,
        issuer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if static is None and (client_id is None or client_secret is None):
            raise ConfigurationError("a hub credential needs a token or a client id and secret")
        if static is None and token_url is None and issuer is None:
            raise ConfigurationError(
                "EXCHANGE_HUB_CLIENT_ID needs EXCHANGE_HUB_TOKEN_URL or an issuer "
                "(EXCHANGE_ISSUERS) whose OIDC discovery names the token endpoint"
            )
        self._http = http
        self._static = static
        self._client = (client_id or "", client_secret or "")
        self._token_url = token_url
        self._issuer = issuer
        self._clock = clock
        self._cached: str | None = None
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def token(self) -> str:
        if self._static is not None:
            return self._static
        with self._lock:
            if self._cached is None or self._clock() >= self._renew_at:
                self._cached, self._renew_at = self._fetch()
            return self._cached

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def _endpoint(self) -> str:
        if self._token_url is None:
            url = f"{self._issuer}/.well-known/openid-configuration"
            try:
                answer = self._http.get(url)
            except httpx.HTTPError as exc:
                raise Transient(f"OIDC discovery failed ({type(exc).__name__})") from None
            if answer.status_code != 200:
                raise Transient(f"OIDC discovery answered HTTP {answer.status_code}")
            try:
                self._token_url = str(answer.json()["token_endpoint"])
            except (ValueError, KeyError, TypeError):
                raise Transient("OIDC discovery names no token_endpoint") from None
        return self._token_url

    def _fetch(self) -> tuple[str, float]:
        try:
            answer = self._http.post(
                self._endpoint(),
                data={"grant_type": "client_credentials", "scope": SCOPES},
                auth=self._client,
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise Transient(f"the token endpoint is unreachable ({type(exc).__name__})") from None
        if answer.status_code != 200:
            # A wrong secret is a configuration problem, not the study's: keep retrying.
            raise Transient(f"the token endpoint refused the node's client: {outcome_text(answer)}")
        try:
            body = answer.json()
            token = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            raise Transient("the token endpoint's answer has no access_token") from None
        now = self._clock()
        lifetime = _lifetime(body, token, now)
        return token, now + lifetime - min(TOKEN_MARGIN_SECONDS, lifetime / 5)


def _lifetime(body: dict[str, Any], token: str, now: float) -> float:
    """Seconds the token is good for: ``expires_in``, else the JWT's ``exp``, else 5 minutes."""
    expires_in = body.get("expires_in")
    if isinstance(expires_in, int | float) and expires_in > 0:
        return float(expires_in)
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        exp = None
    if isinstance(exp, int | float) and exp > now:
        return float(exp) - now
    return 300.0


def publishing_configured(settings: Settings) -> bool:
    """Publishing is on when there is a hub and a credential for at least one tenant."""
    if not settings.hub_url:
        return False
    if settings.hub_token or settings.hub_client_id:
        return True
    return any(t.hub_client_id for t in settings.tenants.values())


# -- the hub's FHIR API, as a site system ------------------------------------------


@dataclass(frozen=True)
class _Credential:
    static: str | None = None
    client_id: str | None = None
    client_secret: str | None = None


def _credential(settings: Settings, tenant: TenantSettings) -> _Credential | None:
    if tenant.hub_client_id and tenant.hub_client_secret:
        return _Credential(None, tenant.hub_client_id, tenant.hub_client_secret.get_secret_value())
    if settings.hub_client_id and settings.hub_client_secret:
        return _Credential(
            None, settings.hub_client_id, settings.hub_client_secret.get_secret_value()
        )
    if settings.hub_token:
        return _Credential(settings.hub_token.get_secret_value())
    return None


class HubClient:
    """The hub's ``/fhir`` as each tenant's site system (one token source per credential)."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not settings.hub_url:
            raise ConfigurationError("publishing needs EXCHANGE_HUB_URL")
        self.base = f"{settings.hub_url}/fhir"
        self._http = http or httpx.Client(timeout=HTTP_TIMEOUT, verify=httpx_verify(settings))
        self._owns_http = http is None
        issuer = settings.issuers[0].issuer.rstrip("/") if settings.issuers else None
        sources: dict[_Credential, TokenSource] = {}
        self._tokens: dict[str, TokenSource] = {}
        for name, tenant in settings.tenants.items():
            credential = _credential(settings, tenant)
            if credential is None:
                continue
            if credential not in sources:
                sources[credential] = TokenSource(
                    self._http,
                    static=credential.static,
                    client_id=credential.client_id,
                    client_secret=credential.client_secret,
                    token_url=settings.hub_token_url,
                    issuer=issuer,
                    clock=clock,
                )
            self._tokens[name] = sources[credential]

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def can_publish(self, tenant: str) -> bool:
        return tenant in self._tokens

    def request(
        self,
        tenant: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        minimal: bool = False,
    ) -> httpx.Response:
        """One call; a 401 gets one fresh token. Raises ``Transient`` for what may pass."""
        source = self._tokens.get(tenant)
        if source is None:
            raise Refused(f"tenant {tenant} has no hub credential (EXCHANGE_HUB_CLIENT_ID)")
        url = path if path.startswith("http") else f"{self.base}/{path}"
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {source.token()}", "Accept": FHIR_JSON}
            if body is not None:
                headers["Content-Type"] = FHIR_JSON
            if minimal:
                headers["Prefer"] = "return=minimal"
            request_id = logs.request_id.get()
            if request_id is not None:
                headers["X-Request-ID"] = request_id
            try:
                response = self._http.request(
                    method, url, params=params, json=body, headers=headers
                )
            except httpx.HTTPError as exc:
                raise Transient(f"the hub is unreachable ({type(exc).__name__})") from None
            if response.status_code == 401 and attempt == 1:
                source.invalidate()
                continue
            if response.status_code in (401, 429) or response.status_code >= 500:
                raise Transient(outcome_text(response), _retry_after(response))
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def pages(
        self, tenant: str, resource_type: str, params: dict[str, str]
    ) -> Iterator[dict[str, Any]]:
        """Every resource a search finds, following the Bundle's ``next`` links."""
        url: str | None = resource_type
        query: dict[str, str] | None = params
        while url is not None:
            response = self.request(tenant, "GET", url, params=query)
            if response.status_code != 200:
                raise Refused(outcome_text(response))
            bundle = response.json()
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource")
                if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
                    yield resource
            url = next(
                (
                    str(link["url"])
                    for link in bundle.get("link") or []
                    if link.get("relation") == "next"
                ),
                None,
            )
            query = None


def _written_id(response: httpx.Response, resource_type: str) -> str:
    location = response.headers.get("location", "")
    match = _LOCATION.search(location)
    if match and match.group(1) == resource_type:
        return match.group(2)
    try:
        rid = response.json().get("id")
    except ValueError:
        rid = None
    if not isinstance(rid, str) or not rid:
        raise Transient(f"the hub did not say which {resource_type} it wrote")
    return rid


# -- the worker ------------------------------------------------------------------


class Result(Enum):
    DONE = "done"
    RETRY = "retry"
    FAILED = "failed"
    SKIPPED = "skipped"


def endpoint_identifier(settings: Settings, organization: str) -> str:
    """The ``urn:exchange:node`` identifier value of the node's Endpoint for ``organization``:
    the node id, made unique per organisation when the node hosts several."""
    organizations = {t.organization for t in settings.tenants.values()}
    if len(organizations) <= 1:
        return settings.node_id
    return f"{settings.node_id}.{organization}"


class Publisher:
    """Delivers outbox rows to the hub; ``start()`` runs it as a daemon thread."""

    def __init__(
        self,
        settings: Settings,
        store: InstanceStore,
        box: Outbox,
        hub: HubClient,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._store = store
        self._outbox = box
        self._hub = hub
        self._clock = clock
        self._rand = rand
        self._endpoints: dict[str, tuple[str, float]] = {}
        self._failures = 0
        self._paused_until = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._outbox.release_claims()  # claims of a node killed mid-delivery
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """New work is in the outbox (called after the store's commit)."""
        self._wake.set()

    def _run(self) -> None:
        poll = self._settings.outbox_poll_seconds
        while not self._stopping.is_set():
            try:
                wait = self.deliver_due()
            except Exception as exc:  # the database, mostly: keep the worker alive
                log.warning("publishing round failed", extra={"error": type(exc).__name__})
                wait = poll
            self._wake.wait(max(0.01, min(wait, poll)))
            self._wake.clear()

    # -- delivering ------------------------------------------------------------
    def deliver_due(self) -> float:
        """Send what is due; seconds until there may be more to do."""
        now = self._clock()
        if now < self._paused_until:
            return self._paused_until - now
        for entry in self._outbox.due(BATCH):
            if self._stopping.is_set():
                return 0.0
            if not self._outbox.claim(entry):
                continue
            # One request id per delivery: the node's log lines about it and the hub's
            # about the calls it makes carry the same id.
            token = logs.request_id.set(uuid.uuid4().hex[:16])
            try:
                result = self.deliver(entry)
            finally:
                logs.request_id.reset(token)
            metrics.OUTBOX_DELIVERIES.labels(result.value).inc()
            if result is Result.RETRY:
                return max(0.0, self._paused_until - self._clock())
        upcoming = self._outbox.next_due()
        if upcoming is None:
            return self._settings.outbox_poll_seconds
        return max(0.0, upcoming - self._clock())

    def deliver(self, entry: Entry) -> Result:
        """Send one claimed row and settle it in the outbox."""
        where = {"outbox_id": entry.id, "tenant": entry.tenant, "action": entry.action}
        try:
            if entry.tenant not in self._settings.tenants:
                raise Refused(f"tenant {entry.tenant} is no longer configured on this node")
            if entry.action == outbox.PUBLISH:
                self._publish(entry)
            else:
                self._retract(entry)
        except Transient as exc:
            self._failures += 1
            delay = outbox.backoff(
                self._failures, cap=self._settings.outbox_retry_max_seconds, rand=self._rand
            )
            delay = max(delay, min(exc.retry_after or 0.0, 300.0))
            self._paused_until = self._clock() + delay
            self._outbox.retry_later(entry, delay, str(exc))
            log.info(
                "hub not reachable; publishing paused",
                extra={**where, "retry_in_seconds": round(delay, 2), "reason": str(exc)[:200]},
            )
            return Result.RETRY
        except OperationalError as exc:  # the node's own database is busy: try again soon
            self._outbox.retry_later(entry, 1.0, f"database: {type(exc).__name__}")
            return Result.RETRY
        except Refused as exc:
            self._failures = 0
            if self._outbox.fail(entry, str(exc)):
                log.warning(
                    "the hub refused a publication; parked as failed "
                    "(see GET /admin/outbox, retry with exchange node reconcile)",
                    extra=where,
                )
                return Result.FAILED
            return Result.SKIPPED
        except Exception as exc:  # a bug or unreadable data: park it rather than loop
            self._failures = 0
            self._outbox.fail(entry, f"internal error at the node ({type(exc).__name__})")
            log.warning(
                "publication failed at the node", extra={**where, "error": type(exc).__name__}
            )
            return Result.FAILED
        self._failures = 0
        if self._outbox.complete(entry):
            log.info("published" if entry.action == outbox.PUBLISH else "retracted", extra=where)
            return Result.DONE
        return Result.SKIPPED  # changed while it was sent: it goes again

    # -- what is sent ------------------------------------------------------------
    def endpoint_id(self, tenant: str) -> str:
        """The hub's id of the tenant organisation's Endpoint, publishing it when due."""
        config = self._settings.tenants[tenant]
        organization = config.organization
        cached = self._endpoints.get(organization)
        if cached is not None and self._clock() < cached[1]:
            return cached[0]
        value = endpoint_identifier(self._settings, organization)
        body: dict[str, Any] = {
            "resourceType": "Endpoint",
            "identifier": [{"system": NODE_SYSTEM, "value": value}],
            "status": "active",
            "connectionType": {"system": CONNECTION_TYPES, "code": "dicom-wado-rs"},
            "name": f"Exchange node {self._settings.node_id} ({organization})",
            "managingOrganization": {"reference": f"Organization/{organization}"},
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": f"{self._settings.base_url()}/dicomweb",
        }
        params = {"identifier": f"{NODE_SYSTEM}|{search_escape(value)}"}
        response = None
        if _FHIR_ID.match(value):
            # A readable id when the hub creates it; the hub's own id wins if one exists.
            response = self._hub.request(
                tenant, "PUT", "Endpoint", params=params, body={**body, "id": value}
            )
        if response is None or response.status_code in (400, 409):
            response = self._hub.request(tenant, "PUT", "Endpoint", params=params, body=body)
        if response.status_code not in (200, 201):
            raise Refused(f"the hub refused the node's Endpoint: {outcome_text(response)}")
        rid = _written_id(response, "Endpoint")
        self._endpoints[organization] = (rid, self._clock() + ENDPOINT_REFRESH_SECONDS)
        return rid

    def _publish(self, entry: Entry) -> None:
        uid = outbox.unseal_uid(self._store.seal(entry.tenant), entry.study_key, entry.sealed_uid)
        views = self._store.instances(entry.tenant, study_uid=uid)
        if not views:  # deleted after it was queued: the hub must not have it either
            self._retract(entry)
            return
        config = self._settings.tenants[entry.tenant]
        mrn_system = config.mrn_system or f"urn:exchange:{config.organization}:mrn"
        accession_system = (
            config.accession_system or f"urn:exchange:{config.organization}:accession"
        )
        attributes = [v.attributes for v in views]
        try:  # before any call: a study that cannot be described fails at once
            patient = imagingstudy.patient(
                attributes[0], mrn_system=mrn_system, organization=config.organization
            )
            study = imagingstudy.build(
                attributes,
                endpoint="Endpoint/-",  # set below, once the hub has said which it is
                mrn_system=mrn_system,
                accession_system=accession_system,
            )
        except ValueError as exc:
            raise Refused(f"the study cannot be published: {exc}") from None
        endpoint = self.endpoint_id(entry.tenant)
        mrn = patient["identifier"][0]["value"]
        written = self._hub.request(
            entry.tenant,
            "PUT",
            "Patient",
            params={"identifier": f"{search_escape(mrn_system)}|{search_escape(mrn)}"},
            body=patient,
            minimal=True,
        )
        if written.status_code not in (200, 201):
            raise Refused(f"the hub refused the Patient: {outcome_text(written)}")
        study["subject"] = {
            "reference": f"Patient/{_written_id(written, 'Patient')}",
            **study["subject"],
        }
        study["endpoint"] = [{"reference": f"Endpoint/{endpoint}"}]
        response = self._put_study(entry.tenant, uid, endpoint, study)
        if (
            response.status_code == 422
            and self._endpoints.pop(config.organization, None) is not None
        ):
            # Perhaps the Endpoint was removed at the hub since it was cached: publish it again.
            endpoint = self.endpoint_id(entry.tenant)
            study["endpoint"] = [{"reference": f"Endpoint/{endpoint}"}]
            response = self._put_study(entry.tenant, uid, endpoint, study)
        if response.status_code not in (200, 201):
            raise Refused(f"the hub refused the ImagingStudy: {outcome_text(response)}")

    def _put_study(
        self, tenant: str, uid: str, endpoint: str, study: dict[str, Any]
    ) -> httpx.Response:
        return self._hub.request(
            tenant,
            "PUT",
            "ImagingStudy",
            params={
                "identifier": f"{imagingstudy.DICOM_UID}|urn:oid:{search_escape(uid)}",
                "endpoint": f"Endpoint/{endpoint}",
            },
            body=study,
            minimal=True,
        )

    def hub_studies(self, tenant: str, uid: str) -> list[str]:
        """Ids of the hub's ImagingStudies of ``uid`` held through this tenant's Endpoint."""
        endpoint = self.endpoint_id(tenant)
        found = self._hub.pages(
            tenant,
            "ImagingStudy",
            {
                "identifier": f"{imagingstudy.DICOM_UID}|urn:oid:{search_escape(uid)}",
                "endpoint": f"Endpoint/{endpoint}",
                "_elements": "identifier",
            },
        )
        return [str(r["id"]) for r in found if r.get("id")]

    def _retract(self, entry: Entry) -> None:
        seal = self._store.seal(entry.tenant)
        uid = outbox.unseal_uid(seal, entry.study_key, entry.sealed_uid)
        for rid in self.hub_studies(entry.tenant, uid):
            response = self._hub.request(entry.tenant, "DELETE", f"ImagingStudy/{rid}")
            if response.status_code not in (200, 204, 404, 410):
                raise Refused(f"the hub refused to retract the study: {outcome_text(response)}")
