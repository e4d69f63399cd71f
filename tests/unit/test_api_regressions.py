"""Regressions from API fuzzing (issue 11): what schemathesis found wrong in ``/openapi.json``.

Each test names one defect the fuzzing suite (tests/integration/test_api_fuzz.py) found,
now fixed, checked on the documents the hub and node apps build (no server needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from exchange.config import load_settings
from exchange.hub.app import create_app as hub_app
from exchange.node.app import create_app as node_app
from exchange.web.openapi import ERROR_SCHEMA, OUTCOME_SCHEMA

FHIR = "application/fhir+json"
DICOM_JSON = "application/dicom+json"


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root: Path = tmp_path_factory.mktemp("openapi")
    hub = hub_app(load_settings(data_dir=root / "hub", dev_mode=True, dev_idp=True))
    node = node_app(
        load_settings(
            data_dir=root / "node", node_id="site-a", tenants={"tenant-a": {"organization": "a"}}
        )
    )
    return {"hub": hub.openapi(), "node": node.openapi()}


def _op(document: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][path][method]
    return operation


def _media(operation: dict[str, Any], status: int | str) -> set[str]:
    return set(operation["responses"][str(status)].get("content", {}))


def test_broker_routes_declare_their_path_parameters(documents: dict[str, Any]) -> None:
    """Was: 18 broker operations had no path parameters in the document (their endpoint
    reads request.path_params), so no client generator could call them."""
    for path, item in documents["hub"]["paths"].items():
        if not path.startswith("/dicomweb/studies/"):
            continue
        declared = {p["name"] for p in item["get"].get("parameters", []) if p["in"] == "path"}
        assert declared == set(path.replace("}", "{").split("{")[1::2]), path


def test_fhir_answers_are_documented_as_fhir_json(documents: dict[str, Any]) -> None:
    """Was: every FHIR route documented application/json; they answer application/fhir+json."""
    hub = documents["hub"]
    assert _media(_op(hub, "/fhir/metadata"), 200) == {FHIR}
    assert _media(_op(hub, "/fhir/{resource_type}"), 200) == {FHIR}
    assert _media(_op(hub, "/fhir/{resource_type}", "post"), 201) == {FHIR}
    assert _media(_op(hub, "/fhir/ImagingStudy/{rid}/$share", "post"), 201) == {FHIR}


def test_dicomweb_answers_are_documented_with_dicom_media_types(documents: dict[str, Any]) -> None:
    """Was: QIDO-RS and metadata documented application/json (they answer
    application/dicom+json); instances and frames, images and stores likewise."""
    for name in ("hub", "node"):
        document = documents[name]
        assert _media(_op(document, "/dicomweb/studies"), 200) == {DICOM_JSON}
        assert _media(_op(document, "/dicomweb/studies/{study}/metadata"), 200) == {DICOM_JSON}
        assert _media(_op(document, "/dicomweb/studies/{study}"), 200) == {"multipart/related"}
        rendered = _media(_op(document, "/dicomweb/studies/{study}/rendered"), 200)
        assert "image/png" in rendered
        assert "application/json" not in rendered
    stow = _op(documents["node"], "/dicomweb/studies", "post")
    for status in (200, 202, 409):
        assert _media(stow, status) == {DICOM_JSON}


def test_invalid_input_is_documented_as_400_not_fastapis_422(documents: dict[str, Any]) -> None:
    """Was: FastAPI's default 422 HTTPValidationError was documented; our error layer
    answers invalid parameters with 400 (an OperationOutcome under /fhir and the broker)."""
    for document in documents.values():
        for item in document["paths"].values():
            for operation in item.values():
                assert "HTTPValidationError" not in str(operation["responses"].get("422"))
                assert "400" in operation["responses"]
    hub, node = documents["hub"], documents["node"]
    fhir_400 = _op(hub, "/fhir/{resource_type}")["responses"]["400"]["content"][FHIR]
    assert fhir_400["schema"] == OUTCOME_SCHEMA
    broker_403 = _op(hub, "/dicomweb/studies/{study}/metadata")["responses"]["403"]
    assert broker_403["content"][FHIR]["schema"] == OUTCOME_SCHEMA
    node_401 = _op(node, "/dicomweb/studies/{study}/metadata")["responses"]["401"]
    assert node_401["content"]["application/json"]["schema"] == ERROR_SCHEMA


def test_error_bodies_match_their_documented_schemas(tmp_path: Path) -> None:
    """The bodies the error layer renders are what the document declares (a required
    key of the schema missing from the body would fail schemathesis' schema check)."""
    app = node_app(
        load_settings(data_dir=tmp_path, node_id="n", tenants={"t": {"organization": "o"}})
    )
    with TestClient(app) as client:
        answer = client.get("/dicomweb/studies")  # no site credential
    assert answer.status_code == 401
    assert set(answer.json()) == set(ERROR_SCHEMA["required"])
    assert set(answer.json()["error"]) >= set(ERROR_SCHEMA["properties"]["error"]["required"])


def test_dev_idp_documents_its_pages_and_oauth_errors(documents: dict[str, Any]) -> None:
    """Was: /idp/authorize documented JSON (it answers HTML pages and redirects) and
    /idp/token's errors were documented as our error body (they are RFC 6749 errors)."""
    hub = documents["hub"]
    authorize = _op(hub, "/idp/authorize")
    assert _media(authorize, 200) == {"text/html"}
    assert _media(authorize, 400) == {"text/html"}
    assert "302" in authorize["responses"]
    token = _op(hub, "/idp/token", "post")
    error = token["responses"]["400"]["content"]["application/json"]["schema"]
    assert error["required"] == ["error"]
    assert "application/x-www-form-urlencoded" in token["requestBody"]["content"]


def test_fhir_writes_document_a_resource_body(documents: dict[str, Any]) -> None:
    """Was: creates and updates read the raw body, so the document said they take none and
    fuzzers never sent a resource."""
    hub = documents["hub"]
    for path, method in (
        ("/fhir/{resource_type}", "post"),
        ("/fhir/{resource_type}", "put"),
        ("/fhir/{resource_type}/{rid}", "put"),
    ):
        body = _op(hub, path, method)["requestBody"]
        assert body["required"] is True
        assert FHIR in body["content"]
