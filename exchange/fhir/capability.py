"""The CapabilityStatement: exactly what the index supports, no more."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from exchange.fhir.resources import FHIR_VERSION, SERVED


def capability_statement(base_url: str, software_version: str) -> dict[str, Any]:
    rest_resources = []
    for resource_type, writable in SERVED.items():
        interactions = ["read", "vread"] + (["create", "update"] if writable else [])
        rest_resources.append(
            {
                "type": resource_type,
                "interaction": [{"code": code} for code in interactions],
                "versioning": "versioned-update" if writable else "versioned",
                "readHistory": True,
                "updateCreate": writable,
            }
        )
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
                    "security": {
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
                    "resource": rest_resources,
                }
            ],
        }
    )
    dumped: dict[str, Any] = statement.model_dump(mode="json", exclude_none=True)
    return dumped
