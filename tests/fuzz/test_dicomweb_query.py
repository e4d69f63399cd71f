"""Fuzzing DICOMweb query parameters: node QIDO-RS, WADO-RS frames and rendering, broker QIDO.

The node runs in process over a real SQLite data directory holding a small synthetic
study; its grant verifier trusts a key made here (the hub's signing, without a hub). The
hub's broker runs in process too. Parameters come from a grammar of real keywords,
tags, ranges, wildcards, includefield, limit/offset, frame lists, window, viewport and
quality, mixed with arbitrary text. Properties: parsers give a query or ``BadRequest``;
a request is never answered with a 5xx.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from exchange.config import load_settings
from exchange.dicom import rendering
from exchange.errors import BadRequest
from exchange.hub import broker
from exchange.node import query
from exchange.node.app import create_app
from exchange.node.services import NodeServices
from exchange.security import grants
from exchange.security.keys import SigningKey, load_or_create
from exchange.security.tokens import static_resolver
from tests.dicomdata import generated
from tests.fuzz.harness import fuzz, no_server_error, tally
from tests.fuzz.hub import Hub, running_hub

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NODE_QUERY = tally("dicomweb-node-query")
WADO = tally("dicomweb-wado-params")
BROKER = tally("dicomweb-broker-query")
TENANT = "t-q"
HUB = "https://hub.fuzz.test"
NODE_ID = "node-q"

KEYWORDS = (
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "ModalitiesInStudy",
    "SeriesNumber",
    "InstanceNumber",
    "StudyDescription",
    "SOPClassUID",
    "00100020",
    "0020000D",
    "00080020",
    "0008103E",
    "ReferringPhysicianName",
    "PatientBirthDate",
    "Rows",
    "NotAKeyword",
    "ffffffff",
    "7FE00010",
)
CONTROLS = ("limit", "offset", "includefield", "fuzzymatching")
_text = st.text(max_size=20)
_value = st.one_of(
    _text,
    st.integers(-(10**30), 10**30).map(str),
    st.from_regex(r"[0-9]{8}?-?[0-9]{8}?", fullmatch=True),
    st.from_regex(r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,8})?)?)?-?", fullmatch=True),
    st.sampled_from(
        (
            "*",
            "?",
            "**a*a*a*a*a*b",
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2,1.3",
            "1.2\\1.3",
            "CT\\MR",
            "all",
            "00100010,StudyDate",
            "true",
            "TRUE",
            "nan",
            "inf",
            "-",
            "--",
            "٢٠٢٦٠١٠١",
            "1" * 65,
            "1." * 40,
            "Fuzz^Ct",
            "fuzz*",
            "=",
            "",
            "9223372036854775808",
            "1" + "0" * 30,
            "-1",
        )
    ),
)


@st.composite
def qido_params(draw: st.DrawFn) -> list[tuple[str, str]]:
    names = st.sampled_from(KEYWORDS) | st.sampled_from(CONTROLS) | _text
    return draw(st.lists(st.tuples(names, _value), max_size=5))


def _query(items: list[tuple[str, str]]) -> str:
    return "&".join(
        f"{quote(k.encode('utf-8', 'surrogatepass'))}={quote(v.encode('utf-8', 'surrogatepass'))}"
        for k, v in items
    )


@dataclass
class Node:
    client: TestClient
    services: NodeServices
    key: str
    signing: SigningKey
    study: str
    series: str
    sop: str

    def grant(self, action: grants.Action = "view") -> str:
        return grants.issue(
            self.signing,
            issuer=HUB,
            node=NODE_ID,
            caller="dr-fz",
            study=self.study,
            action=action,
            decision="fz",
        )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root: Path = tmp_path_factory.mktemp("fuzz-node-query")
    settings = load_settings(
        data_dir=root, node_id=NODE_ID, tenants={TENANT: {"organization": "org-q"}}
    )
    app = create_app(settings)
    signing = load_or_create(root / "hub-key.pem")
    with TestClient(app, base_url="http://node-q.test", raise_server_exceptions=False) as client:
        services: NodeServices = app.state.services
        services.grants = grants.GrantVerifier(
            HUB, NODE_ID, static_resolver(signing.private.public_key())
        )
        results = [
            services.store.store(TENANT, io.BytesIO(data))
            for data in generated(patient_id="FZ-Q", accession="FZQ", slices=2, size=16)
        ]
        first = results[0]
        yield Node(
            client,
            services,
            services.credentials.create_api_key(TENANT),
            signing,
            first.study_uid,
            first.series_uid,
            first.sop_uid,
        )


@given(st.sampled_from(list(query.Level)), qido_params())
@fuzz(examples=300)
def test_node_queries_parse_and_run_or_are_refused(
    node: Node, level: query.Level, params: list[tuple[str, str]]
) -> None:
    with NODE_QUERY.example():
        try:
            search = query.parse(level, params)
        except BadRequest:
            return
        scope = query.Scope(TENANT, None if level is query.Level.STUDY else node.study)
        runner = query.CatalogSearch(
            node.services.engine, node.services.store, "http://node-q.test"
        )
        runner.run(search, scope)


@given(qido_params(), st.booleans())
@fuzz(examples=80)
def test_node_study_search_over_http_is_never_a_server_error(
    node: Node, params: list[tuple[str, str]], by_grant: bool
) -> None:
    headers = {"Authorization": f"Bearer {node.grant()}"} if by_grant else {"X-API-Key": node.key}
    with NODE_QUERY.example():
        response = node.client.get(f"/dicomweb/studies?{_query(params)}", headers=headers)
        no_server_error(response)


_frames = st.one_of(
    st.lists(st.integers(-2, 10**12).map(str), min_size=1, max_size=4).map(",".join),
    _text,
    st.sampled_from(("1", "0", "1,1", "2", "1,", ",", " 1", "1-2", "%2C")),
)
_window = st.one_of(
    st.builds(
        lambda c, w, f: ",".join(x for x in (c, w, f) if x is not None),
        _value,
        _value,
        st.none() | st.sampled_from(("linear", "LINEAR_EXACT", "sigmoid", "x")),
    ),
    st.sampled_from(
        ("40,400", "1e308,1e308", "-1e308,1", "0,0", "nan,1", "1,inf", "40,400,sigmoid")
    ),
)
_viewport = st.one_of(
    st.builds(lambda w, h: f"{w},{h}", st.integers(-1, 100_000), st.integers(-1, 100_000)),
    _text,
)
_accept = st.sampled_from(
    (
        None,
        "image/png",
        "image/jpeg",
        "*/*",
        "image/gif",
        'multipart/related; type="application/octet-stream"',
        "application/dicom+json",
        "",
        "image/*;q=0",
        "text/html, image/png;q=abc",
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        "image/png;q=1e400, */*;q=-1",
        ",,;;==",
    )
) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@given(
    st.sampled_from(("frames", "rendered", "frame-rendered", "thumbnail", "metadata", "bulkdata")),
    _frames,
    st.dictionaries(
        st.sampled_from(("window", "viewport", "quality", "annotation", "charset")),
        st.one_of(_window, _viewport, _value),
        max_size=3,
    ),
    _accept,
)
@fuzz(examples=80)
def test_wado_parameters_are_never_a_server_error(
    node: Node, kind: str, frames: str, params: dict[str, str], accept: str | None
) -> None:
    base = f"/dicomweb/studies/{node.study}/series/{node.series}/instances/{node.sop}"
    path = {
        "frames": f"{base}/frames/{quote(frames, safe=',')}",
        "rendered": f"{base}/rendered",
        "frame-rendered": f"{base}/frames/{quote(frames, safe=',')}/rendered",
        "thumbnail": f"{base}/thumbnail",
        "metadata": f"{base}/metadata",
        "bulkdata": f"{base}/bulkdata/{quote(frames[:8])}",
    }[kind]
    headers = {"Authorization": f"Bearer {node.grant()}"}
    if accept is not None:
        headers["Accept"] = accept
    with WADO.example():
        response = node.client.get(f"{path}?{_query(list(params.items()))}", headers=headers)
        no_server_error(response)


@given(_window, _viewport, _value)
@fuzz(examples=300)
def test_rendering_parameters_parse_or_are_refused(
    window: str, viewport: str, quality: str
) -> None:
    with WADO.example():
        for parse, text in (
            (rendering.parse_window, window),
            (rendering.parse_viewport, viewport),
            (rendering.parse_quality, quality),
        ):
            with contextlib.suppress(BadRequest):
                parse(text)  # type: ignore[operator]


# -- the broker ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with running_hub(tmp_path_factory.mktemp("fuzz-hub-broker")) as running:
        yield running


@given(qido_params())
@fuzz(examples=300)
def test_broker_queries_parse_or_are_refused(params: list[tuple[str, str]]) -> None:
    with BROKER.example(), contextlib.suppress(BadRequest):
        broker.parse_study_query(params)


@given(qido_params(), st.booleans())
@fuzz(examples=80)
def test_broker_study_search_is_never_a_server_error(
    hub: Hub, params: list[tuple[str, str]], operator: bool
) -> None:
    token = hub.operator if operator else hub.clinician
    with BROKER.example():
        response = hub.client.get(
            f"/dicomweb/studies?{_query(params)}", headers={"Authorization": f"Bearer {token}"}
        )
        no_server_error(response)
