"""Who may write what into the index: sites publish only what they hold.

A site's system credential may create, update or delete an ImagingStudy only
when every Endpoint it names is a DICOMweb endpoint managed by the site's own
organisation, both in the new content and in the version it replaces (so a
site cannot take over another site's study). Endpoints and Patients it writes
must be managed by its own organisation. Checks run inside the write's
transaction (a repository write hook). ``Patient.link`` is always the hub's
(master patient index), whoever writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exchange.errors import Forbidden, Gone, NotFound, Unprocessable
from exchange.fhir import mpi, profiles
from exchange.fhir.repository import Repository, WriteHook
from exchange.security.tokens import Principal

Check = Callable[[dict[str, Any]], None]


def _managing(body: dict[str, Any]) -> str | None:
    reference = (body.get("managingOrganization") or {}).get("reference")
    return str(reference) if reference else None


def _owned_by(own: str, what: str) -> Check:
    def check(body: dict[str, Any]) -> None:
        managing = _managing(body)
        if managing != own:
            shown = managing or "no organisation"
            raise Forbidden(
                f"this {what} is managed by {shown}; a site may only publish "
                f"{what}s managed by its own organisation ({own})"
            )

    return check


def _study_endpoints_owned(repository: Repository, own: str) -> Check:
    def check(body: dict[str, Any]) -> None:
        references = [str(e.get("reference", "")) for e in body.get("endpoint") or []]
        for index, reference in enumerate(references):
            if not reference.startswith("Endpoint/"):
                raise Forbidden(f"endpoint {reference!r} is not one of this hub's Endpoints")
            try:
                endpoint = repository.read("Endpoint", reference.removeprefix("Endpoint/")).body
            except (NotFound, Gone):
                raise Unprocessable(
                    f"{reference} does not exist; publish the site's Endpoint first"
                ) from None
            issues = profiles.endpoint_is_wado_rs(
                endpoint, referenced_from=f"ImagingStudy.endpoint[{index}]"
            )
            if issues:
                raise Unprocessable(
                    f"{reference} is not a DICOMweb (WADO-RS) endpoint", issues=issues
                )
            if _managing(endpoint) != own:
                raise Forbidden(
                    f"{reference} belongs to another organisation; a site may only "
                    "publish studies it holds, through its own endpoint"
                )

    return check


def _checks(repository: Repository, principal: Principal, resource_type: str) -> list[Check]:
    if principal.role != "system":
        return []  # operators administer; other roles are refused by the policy first
    if not principal.organization:
        raise Forbidden("the site credential names no organisation")
    own = f"Organization/{principal.organization}"
    if resource_type == "ImagingStudy":
        return [_study_endpoints_owned(repository, own)]
    if resource_type in ("Endpoint", "Patient"):
        return [_owned_by(own, resource_type)]
    return []


def write_hook(
    repository: Repository, principal: Principal, resource_type: str
) -> WriteHook | None:
    """The hook for one REST write by ``principal`` (None when nothing needs checking)."""
    checks = _checks(repository, principal, resource_type)
    keep_links = resource_type == "Patient"
    if not checks and not keep_links:
        return None

    def hook(current: dict[str, Any] | None, body: dict[str, Any] | None) -> dict[str, Any] | None:
        for check in checks:
            if current is not None:
                check(current)  # what is replaced or deleted must be the site's too
            if body is not None:
                check(body)
        return mpi.preserve_links(current, body) if keep_links else body

    return hook
