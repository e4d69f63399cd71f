"""Error rendering and body limits, on an in-process app (no network)."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from exchange.errors import Forbidden
from exchange.web.app import finish
from exchange.web.health import Check


class Body(BaseModel):
    name: str


@pytest.fixture
def client():
    app = FastAPI()

    @app.post("/fhir/Thing")
    async def fhir_thing(body: Body) -> dict[str, str]:
        return {"name": body.name}

    @app.post("/dicomweb/studies")
    async def stow(body: Body) -> dict[str, str]:
        return {"name": body.name}

    @app.get("/fhir/forbidden")
    async def forbidden() -> None:
        raise Forbidden("the patient has opted out of sharing with Organization X")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    async def failing() -> None:
        raise ConnectionError("db down")

    finish(
        app,
        lambda path: 10_000 if path.startswith("/dicomweb") else 100,
        lambda: [Check("database", failing)],
    )
    return TestClient(app, raise_server_exceptions=False)


def test_unknown_fhir_route_is_an_operation_outcome(client):
    response = client.get("/fhir/Nope/1/extra")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/fhir+json"
    assert response.json()["resourceType"] == "OperationOutcome"
    assert response.json()["issue"][0]["code"] == "not-found"


def test_unknown_route_elsewhere_is_a_json_error(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["status"] == 404


def test_refusal_says_why_in_plain_words(client):
    response = client.get("/fhir/forbidden")
    assert response.status_code == 403
    assert "opted out" in response.json()["issue"][0]["diagnostics"]


def test_oversized_body_by_content_length_is_413(client):
    response = client.post(
        "/fhir/Thing", content=b"x" * 101, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"


def test_oversized_chunked_body_is_413(client):
    def chunks():
        for _ in range(10):
            yield b'{"name": "' + b"x" * 20

    response = client.post(
        "/fhir/Thing", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_limit_is_per_route(client):
    response = client.post("/dicomweb/studies", json={"name": "x" * 500})
    assert response.status_code == 200
    response = client.post("/dicomweb/studies", json={"name": "x" * 20_000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too-costly"


def test_malformed_json_is_400(client):
    response = client.post(
        "/fhir/Thing", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["issue"][0]["diagnostics"]


def test_wrong_shape_is_400_with_the_field(client):
    response = client.post("/dicomweb/studies", json={"other": 1})
    assert response.status_code == 400
    assert "name" in response.json()["error"]["message"]


def test_unexpected_error_is_500_without_details(client):
    response = client.get("/boom")
    assert response.status_code == 500
    assert "secret" not in response.text
    assert "Traceback" not in response.text


def test_readiness_reports_failing_check_by_name(client):
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("failing")
    assert client.get("/healthz").status_code == 200


def test_every_response_carries_a_request_id(client):
    assert client.get("/healthz").headers["x-request-id"]


def test_request_log_never_names_a_study():
    from exchange.web.requestlog import redact

    path = "/dicomweb/studies/1.2.840.113619.2.55.3/series/1.2.3.4/instances/1.2.3.4.5/frames/1"
    redacted = redact(path)
    assert "1.2.840.113619.2.55.3" not in redacted
    assert "1.2.3.4" not in redacted
    assert redacted.startswith("/dicomweb/studies/uid-")
    assert redacted.endswith("/frames/1")
    assert redact(path) == redacted  # stable, so requests can be correlated
    assert redact("/fhir/Patient/abc") == "/fhir/Patient/abc"
