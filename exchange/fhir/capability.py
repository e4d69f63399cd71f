"""The CapabilityStatement: exactly what the index supports, built from the same registry
that drives indexing and search, so it cannot claim more than the server does."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from exchange.fhir import searchparams as sp
from exchange.fhir.resources import FHIR_VERSION, SERVED

_READ = ["read", "vread", "history-instance", "search-type"]
_WRITE = ["create", "update", "delete"]


def _resource(resource_type: str, writable: bool) -> dict[str, Any]:
    params = sp.PARAMS[resource_type]
    entry: dict[str, Any] = {
        "type": resource_type,
        "interaction": [{"code": code} for code in _READ + (_WRITE if writable else [])],
        "versioning": "versioned-update" if writable else "versioned",
        "readHistory": True,
        "updateCreate": writable,
        "conditionalCreate": writable,
        "conditionalRead": "not-supported",
        "conditionalUpdate": writable,
        "conditionalDelete": "not-supported",
        "searchParam": [
            {"name": p.name, "type": p.type, "documentation": p.documentation}
            for p in params.values()
        ],
    }
    if not writable:
        entry["documentation"] = "Written by the hub itself; append-only (read and search only)."
    if includes := sp.INCLUDES.get(resource_type):
        entry["searchInclude"] = list(includes)
    if revincludes := sp.REVINCLUDES.get(resource_type):
        entry["searchRevInclude"] = list(revincludes)
    if operations := OPERATIONS.get(resource_type):
        entry["operation"] = [
            {"name": name, "definition": f"{OPERATION_BASE}/{name}", "documentation": doc}
            for name, doc in operations
        ]
    return entry


OPERATION_BASE = "https://exchange.example.org/fhir/OperationDefinition"
#: Instance operations the hub serves, per type: (name, what it does).
OPERATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "ImagingStudy": (
        (
            "share",
            "POST ImagingStudy/{id}/$share: share a study you may view with one other "
            "provider (a Consent and its Provenance); recipients cannot share it on",
        ),
    ),
    "Consent": (("revoke", "POST Consent/{id}/$revoke: end a provider share"),),
}


OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def capability_statement(
    base_url: str, software_version: str, oauth: dict[str, str] | None = None
) -> dict[str, Any]:
    """``oauth``: the authorization server's ``authorize``/``token`` URLs, when known, so
    SMART clients that read them from the CapabilityStatement find them."""
    statement = CapabilityStatement.model_validate(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-23",
            "kind": "instance",
            "software": {"name": "Exchange", "version": software_version},
            "implementation": {"description": "Exchange hub FHIR index", "url": f"{base_url}/fhir"},
            "fhirVersion": FHIR_VERSION,
            "format": ["application/fhir+json"],
            "rest": [
                {
                    "mode": "server",
                    "documentation": (
                        "Search: comma-separated values are ORed, repeated parameters ANDed; "
                        "_count (default 20, at most 500), _offset, _sort, _elements, "
                        "_summary (count, data, true), _total, _include and _revinclude as "
                        "listed. Unknown parameters are refused unless the request says "
                        "Prefer: handling=lenient."
                    ),
                    "security": {
                        **(
                            {
                                "extension": [
                                    {
                                        "url": OAUTH_URIS,
                                        "extension": [
                                            {"url": name, "valueUri": uri}
                                            for name, uri in oauth.items()
                                        ],
                                    }
                                ]
                            }
                            if oauth
                            else {}
                        ),
                        "service": [
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                        "code": "SMART-on-FHIR",
                                    }
                                ]
                            }
                        ],
                        "description": "Bearer tokens from the HIE's OpenID Connect "
                        "identity provider (SMART App Launch v2 scopes).",
                    },
                    "resource": [_resource(t, writable) for t, writable in SERVED.items()],
                }
            ],
        }
    )
    dumped: dict[str, Any] = statement.model_dump(mode="json", exclude_none=True)
    return dumped
