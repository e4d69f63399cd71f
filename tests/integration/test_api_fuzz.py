"""API fuzzing (issue 11): schemathesis against the hub's and a node's ``/openapi.json``.

Real processes (a LocalFederation: hub with the development IdP, one node holding one
small study). Every operation of each document gets generated requests (valid and
invalid parameters, headers and bodies) and each request is sent with several
credentials: for the hub an HIE operator's and a clinician's token, none, and a bad one;
for the node a hub grant for the study it holds, a STOW API key, none, and a bad one.
Checks: never a 5xx (``not_a_server_error``), and the status code, content type and body
conform to what the document declares (so the documents tell the truth).

Short mode (CI): ``SHORT_EXAMPLES`` generated requests per operation. Long mode
(``EXCHANGE_RELIABILITY=full``): ``FULL_EXAMPLES``. The figures go to
``reliability.report("schemathesis:hub" | "schemathesis:node", ...)``.
"""

from __future__ import annotations

import io
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from exchange.dicom.samples import StudySpec, study
from exchange.federation import LocalFederation, NodeSpec
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests import reliability

pytestmark = pytest.mark.integration

SHORT_EXAMPLES = 6
FULL_EXAMPLES = 100
EXAMPLES = reliability.iterations(SHORT_EXAMPLES, FULL_EXAMPLES)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SITE = NodeSpec("site-a", "org-a", "tenant-a")


@dataclass
class Tally:
    inputs: Counter[str] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)
    crashes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


TALLY = Tally()


@dataclass
class Target:
    base_url: str
    credentials: dict[str, dict[str, str]]
    session: requests.Session


@dataclass
class Fuzz:
    fed: LocalFederation
    hub: Target
    node: Target
    study: str


def _part10_files(mrn: str) -> list[bytes]:
    out = []
    for ds in study(
        StudySpec(patient_id=mrn, patient_name="Fuzz^Case", accession="A1", slices=1, size=16)
    ):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    root: Path = tmp_path_factory.mktemp("apifuzz")
    with LocalFederation(root=root, nodes=[SITE], publishing=False) as fed:
        idp = DevIdentityProvider(
            f"{fed.hub.url}/idp", load_or_create(key_path(fed.hub.data_dir)), "exchange"
        )
        key = fed.api_key(SITE.node_id)
        files = _part10_files("FUZZ-1")
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
                for f in files
            )
            + f"--{boundary}--\r\n".encode()
        )
        stored = httpx.post(
            f"{fed.node(SITE.node_id).url}/dicomweb/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "X-API-Key": key,
            },
            timeout=60,
        )
        assert stored.status_code == 200, stored.text
        uid = str(stored.json()["00081190"]["Value"][0]).rsplit("/", 1)[-1]
        operator = idp.issue(sub="fuzz-operator", role="operator", org="hie", purpose=["HOPERAT"])
        clinician = idp.issue(sub="fuzz-dr", role="clinician", org="org-a", purpose=["TREAT"])
        bad = {"Authorization": "Bearer not.a.token"}
        hub = Target(
            fed.hub.url,
            {
                "operator": {"Authorization": f"Bearer {operator}"},
                "clinician": {"Authorization": f"Bearer {clinician}"},
                "none": {},
                "bad": bad,
            },
            requests.Session(),
        )
        # One grant, long enough for the short mode; the long mode renews it as it goes.
        node = Target(
            fed.node(SITE.node_id).url,
            {"grant": {}, "api-key": {"X-API-Key": key}, "none": {}, "bad": bad},
            requests.Session(),
        )
        yield Fuzz(fed, hub, node, uid)
        hub.session.close()
        node.session.close()


def _exercise(suite: str, target: Target, case: Case) -> None:
    """Send ``case`` once per credential; count and check every answer."""
    problems: list[str] = []
    for name, headers in target.credentials.items():
        TALLY.inputs[suite] += 1
        try:
            response = case.call(base_url=target.base_url, session=target.session, headers=headers)
        except requests.RequestException as exc:  # the server dropped the connection
            TALLY.crashes[suite] += 1
            problems.append(f"[{name}] no answer: {type(exc).__name__}")
            continue
        if response.status_code >= 500:
            TALLY.server_errors[suite] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (AssertionError, BaseExceptionGroup) as failed:  # schemathesis' FailureGroup
            TALLY.failures[suite] += 1
            problems.append(f"[{name}] {str(failed)[:1500]}")
    assert not problems, "\n".join(problems)


_FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    derandomize=not reliability.full(),
    # no shrinking in the short mode: the first failing input is reported as it is
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if reliability.full() else []),
)


def _fuzz_schema(suite: str, url: str, target: Target, before: Callable[[Case], None]) -> None:
    """Every operation of the document at ``url``; all operations run, failures are listed."""
    schema = schemathesis.openapi.from_url(url)
    failed: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @_FUZZ_SETTINGS
        def run(case: Case) -> None:
            before(case)
            _exercise(suite, target, case)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # hypothesis re-raises the first failure
            # a flaky failure hides the one seen first among its sub-exceptions: show them
            subs = exc.exceptions if isinstance(exc, BaseExceptionGroup) else ()
            shown = "\n".join([str(exc), *(f"  - {sub}"[:2000] for sub in subs)])
            failed.append(f"== {operation.label}:\n{shown}")
    assert operations > 0
    assert not failed, f"{len(failed)} of {operations} operations failed:\n" + "\n".join(failed)


def test_hub_api_answers_as_documented(fuzz: Fuzz) -> None:
    _fuzz_schema("schemathesis:hub", f"{fuzz.hub.base_url}/openapi.json", fuzz.hub, lambda _: None)


def test_node_api_answers_as_documented(fuzz: Fuzz) -> None:
    def with_grant(case: Case) -> None:
        """A fresh export grant for the study in the path (or the one held)."""
        study_uid = (case.path_parameters or {}).get("study")
        grant = fuzz.fed.grant(SITE.node_id, str(study_uid or fuzz.study), "export", ttl=60)
        fuzz.node.credentials["grant"] = {"Authorization": f"Bearer {grant}"}

    _fuzz_schema("schemathesis:node", f"{fuzz.node.base_url}/openapi.json", fuzz.node, with_grant)


def test_zz_report_schemathesis_figures(fuzz: Fuzz) -> None:
    """Runs last in the module: what the two suites above tried and found."""
    del fuzz
    for suite in ("schemathesis:hub", "schemathesis:node"):
        reliability.report(
            suite,
            inputs=TALLY.inputs[suite],
            server_errors=TALLY.server_errors[suite],
            crashes=TALLY.crashes[suite],
            nonconforming=TALLY.failures[suite],
        )
    assert sum(TALLY.inputs.values()) > 0
    assert not TALLY.server_errors, dict(TALLY.server_errors)
