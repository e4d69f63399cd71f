"""Issue 9 end to end: the viewer launched from a (simulated) EHR, view without download.

Real processes on loopback (a hub with the development IdP and two site nodes), driven
by Playwright through Debian's Chromium (DESIGN.md §3a). Playwright's own browsers are
never downloaded: without /usr/bin/chromium these tests skip and say why.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.pixels.processing import apply_modality_lut

from exchange.dicom.rendering import Window, apply_window, default_window
from exchange.dicom.samples import StudySpec, write_study
from exchange.federation import LocalFederation
from tests.e2e.test_brokered_federation import SITES, Hub, subject_of

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "viewer.png"
LAPTOP = {"width": 1366, "height": 768}
TIMEOUT_MS = 15_000
REASON = "unconscious patient in ED, head CT needed"

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed (/usr/bin/chromium); run scripts/bootstrap.sh "
            "or apt-get install chromium"
        )
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(root=tmp_path_factory.mktemp("viewer"), nodes=SITES) as fed:
        yield fed


@pytest.fixture(scope="module")
def hub(federation: LocalFederation) -> Iterator[Hub]:
    h = Hub(federation)
    yield h
    h.http.close()


def import_study(
    federation: LocalFederation,
    site: str,
    mrn: str,
    *,
    modality: str,
    slices: int,
    size: int,
    date: str,
    description: str,
) -> tuple[str, list[pydicom.Dataset]]:
    folder = federation.root / "studies" / f"{site}-{mrn}-{uuid.uuid4().hex[:6]}"
    spec = StudySpec(
        patient_id=mrn,
        patient_name=f"Synthetic^{mrn}",
        accession=uuid.uuid4().hex[:12],
        modality=modality,
        description=description,
        study_date=date,
        slices=slices,
        size=size,
        issuer=next(s.organization for s in SITES if s.node_id == site),
    )
    paths = write_study(spec, folder)
    federation.import_into(site, folder)
    datasets = [pydicom.dcmread(p) for p in paths]
    return str(datasets[0].StudyInstanceUID), datasets


class Data:
    """Patient P: a CT at site A and an MR at site B (linked records); patient Q opted out."""

    def __init__(self, hub: Hub) -> None:
        fed = hub.federation
        ct_uid, self.ct = import_study(
            fed,
            "site-a",
            "VIEW-P",
            modality="CT",
            slices=12,
            size=512,
            date="20260301",
            description="CT chest",
        )
        mr_uid, self.mr = import_study(
            fed,
            "site-b",
            "VIEW-P",
            modality="MR",
            slices=4,
            size=128,
            date="20250601",
            description="MR knee",
        )
        q_uid, self.q = import_study(
            fed,
            "site-a",
            "VIEW-Q",
            modality="CT",
            slices=3,
            size=128,
            date="20260201",
            description="CT head",
        )
        ct, mr, q = hub.wait_indexed(ct_uid), hub.wait_indexed(mr_uid), hub.wait_indexed(q_uid)
        self.patient = subject_of(ct)
        linked = hub.http.post(
            "/admin/mpi/link",
            json={"patients": [self.patient, subject_of(mr)]},
            headers={"Authorization": f"Bearer {hub.operator}"},
        )
        assert linked.status_code == 200, linked.text
        self.ct_study, self.mr_study = ct, mr
        self.q_patient, self.q_study = subject_of(q), q
        hub.consent(self.q_patient, {"type": "deny"})
        self.by_sop = {str(d.SOPInstanceUID): d for d in [*self.ct, *self.mr, *self.q]}


@pytest.fixture(scope="module")
def data(hub: Hub) -> Data:
    return Data(hub)


def expected(ds: pydicom.Dataset, window: str) -> np.ndarray:
    """The windowing of exchange/dicom/rendering.py, computed here from the original DICOM."""
    values = apply_modality_lut(ds.pixel_array, ds)
    if window == "default":
        chosen = default_window(values, ds)
    else:
        center, width = (float(v) for v in window.split(","))
        chosen = Window(center, width)
    return apply_window(values, chosen)


_PIXELS = """() => {
  const c = document.getElementById('image');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = '';
  for (let i = 0; i < d.length; i += 4) s += String.fromCharCode(d[i]);
  return {w: c.width, h: c.height, grey: btoa(s), sop: c.dataset.sop,
          frame: c.dataset.frame, window: c.dataset.window, drawn: Number(c.dataset.drawn)};
}"""
_SETTLED = """() => {
  const v = window.__viewer, c = document.getElementById('image');
  const want = v.window ? v.window.join(',') : 'default';
  return c.dataset.window === want && Number(c.dataset.index) === v.index;
}"""


def displayed(page: Any) -> tuple[np.ndarray, dict[str, Any]]:
    page.wait_for_function(_SETTLED, timeout=TIMEOUT_MS)
    shown = page.evaluate(_PIXELS)
    grey = np.frombuffer(base64.b64decode(shown["grey"]), dtype=np.uint8)
    return grey.reshape(shown["h"], shown["w"]), shown


def assert_windowing(page: Any, data: Data) -> dict[str, Any]:
    """The displayed pixels are exactly the server-side windowing of the original frame."""
    pixels, shown = displayed(page)
    want = expected(data.by_sop[shown["sop"]], shown["window"])
    assert pixels.shape == want.shape
    assert int(np.abs(pixels.astype(int) - want.astype(int)).max()) <= 1, shown["window"]
    return shown


def media_type(value: str) -> str:
    return value.split(";")[0].strip().lower()


def carries_dicom(content_type: str) -> bool:
    """``application/dicom`` itself, or multipart/related whose parts are DICOM files."""
    lowered = content_type.lower().replace(" ", "")
    if media_type(lowered) == "application/dicom":
        return True
    return media_type(lowered) == "multipart/related" and (
        'type="application/dicom"' in lowered or "type=application/dicom;" in lowered + ";"
    )


class Session:
    """One browser tab and every response it received."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport=LAPTOP)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.responses: list[tuple[str, str]] = []
        self.page.on(
            "response", lambda r: self.responses.append((r.url, r.headers.get("content-type", "")))
        )

    def launch_from_ehr(self, hub: Hub, patient: str, study: str | None = None) -> float:
        """Press "View images" in the simulated EHR; seconds until the first image is drawn."""
        query = f"patient={patient}&user=dr-carter&org=org-c" + (f"&study={study}" if study else "")
        self.page.goto(f"{hub.url}/viewer/ehr-sim?{query}")
        started = time.perf_counter()
        self.page.click("#view-images")
        self.page.wait_for_url(f"{hub.url}/viewer/")
        if study is None:
            self.page.wait_for_selector("#image[data-drawn]")
        return time.perf_counter() - started

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def clinician(browser: Any, hub: Hub, data: Data) -> Iterator[tuple[Session, float]]:
    session = Session(browser)
    seconds = session.launch_from_ehr(hub, data.patient)
    yield session, seconds
    session.close()


# -- acceptance 1: EHR launch, studies from both sites, first image -------------------------


def test_ehr_launch_lists_both_sites_and_draws_the_first_image(
    clinician: tuple[Session, float], data: Data
) -> None:
    session, seconds = clinician
    page = session.page
    in_page = page.evaluate("window.__viewer.firstImageMs")
    print(
        f"\ntime to first image: {seconds * 1000:.0f} ms from 'View images' (launch, sign-in, "
        f"code exchange, search, first frame); {in_page:.0f} ms after the viewer page started"
    )
    assert in_page < 1000, "the first CT frame should be on screen within 1 s of the page"

    studies = page.locator("#studies li.study")
    assert studies.count() == 2
    listed = studies.all_inner_texts()
    assert any("org-a" in s and "CT" in s for s in listed), listed
    assert any("org-b" in s and "MR" in s for s in listed), listed
    page.wait_for_function(
        "() => document.getElementById('patient-name').textContent.includes('Synthetic')"
    )
    assert "born 1970-01-01" in page.inner_text("#patient-details")
    assert "TREAT" in page.inner_text("#purpose")

    pixels, shown = displayed(page)
    assert pixels.std() > 10, "the first image is blank"
    assert shown["sop"] in {str(d.SOPInstanceUID) for d in data.ct}
    assert_windowing(page, data)  # the image's own window (40/400), computed server-side
    page.wait_for_selector("#series li img[src^='blob:']")  # the series thumbnail


# -- acceptance 2: window/level drag, scrolling, presets, zoom ------------------------------


def test_window_level_scrolling_and_presets(clinician: tuple[Session, float], data: Data) -> None:
    page = clinician[0].page
    before, shown = displayed(page)
    box = page.locator("#viewport").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y + 60, steps=6)
    page.mouse.up()
    dragged = assert_windowing(page, data)
    assert dragged["window"] != "default"
    after, _ = displayed(page)
    assert not np.array_equal(before, after), "window/level drag did not change the pixels"

    page.mouse.wheel(0, 120)
    scrolled = assert_windowing(page, data)
    assert scrolled["sop"] != shown["sop"], "the wheel did not change the frame"
    page.keyboard.press("ArrowDown")
    keyed = assert_windowing(page, data)
    assert keyed["sop"] not in (shown["sop"], scrolled["sop"])

    page.keyboard.press("1")  # CT lung preset
    lung = assert_windowing(page, data)
    assert lung["window"] == "-600,1500"
    page.click("button[data-preset='bone']")
    assert assert_windowing(page, data)["window"] == "300,1500"
    page.keyboard.press("4")
    assert assert_windowing(page, data)["window"] == "40,80"

    transform = page.eval_on_selector("#image", "c => c.style.transform")
    page.keyboard.press("+")
    assert page.eval_on_selector("#image", "c => c.style.transform") != transform
    page.keyboard.press("0")
    assert page.eval_on_selector("#image", "c => c.style.transform") == transform


# -- acceptance 3: no DICOM reaches the browser, no download control -------------------------


def test_no_dicom_reaches_the_browser_and_no_download_control(
    clinician: tuple[Session, float],
) -> None:
    session = clinician[0]
    page = session.page
    page.click("#studies li.study:has-text('MR') button")
    page.wait_for_function(
        "() => document.getElementById('image').dataset.sop && "
        "window.__viewer.study.resource.modality[0].code === 'MR'"
    )
    displayed(page)
    assert page.locator("#download").is_hidden()
    assert session.responses, "no responses were recorded"
    images = [c for u, c in session.responses if "/rendered" in u]
    assert images
    assert all(media_type(c) == "image/png" for c in images)
    dicom = [(u, c) for u, c in session.responses if carries_dicom(c)]
    assert dicom == [], dicom


# -- acceptance 5: screenshots --------------------------------------------------------------


def test_screenshots(clinician: tuple[Session, float]) -> None:
    page = clinician[0].page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.click("#studies li.study:has-text('CT') button")
    page.wait_for_function(
        "() => window.__viewer.study.resource.modality[0].code === 'CT' && "
        "document.getElementById('image').dataset.drawn"
    )
    page.keyboard.press("1")
    displayed(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#series img')].every(i => i.complete && i.src)"
    )
    page.screenshot(path=str(ARTIFACTS / "viewer-study-list.png"), full_page=True)
    page.locator("#viewport").screenshot(path=str(ARTIFACTS / "viewer-image.png"))
    # docs/ shows one; it is refreshed only when asked, so a test run leaves the tree clean
    if os.environ.get("EXCHANGE_UPDATE_DOCS_SCREENSHOT") or not DOCS_SCREENSHOT.exists():
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / "viewer-study-list.png", DOCS_SCREENSHOT)
    assert (ARTIFACTS / "viewer-image.png").stat().st_size > 1000


# -- acceptance 4: refused study, break-the-glass -------------------------------------------


def test_refused_study_shows_its_reason_and_break_the_glass_opens_it(
    browser: Any, hub: Hub, data: Data
) -> None:
    session = Session(browser)
    try:
        page = session.page
        session.launch_from_ehr(hub, data.q_patient, data.q_study["id"])
        reason = page.locator(".refusal .refusal-reason")
        reason.wait_for()
        assert "opted out" in reason.inner_text()
        assert page.locator("#studies li.study").count() == 0

        page.click(".refusal button.break-glass")
        page.click("#glass-confirm")  # no reason: the dialog stays open
        assert page.locator("#glass-dialog").is_visible()
        page.fill("#glass-reason", REASON)
        page.click("#glass-confirm")
        page.wait_for_selector("#purpose.emergency")
        page.wait_for_selector("#image[data-drawn]")
        assert "ETREAT" in page.inner_text("#purpose")
        assert REASON in page.inner_text("#purpose")
        pixels, shown = displayed(page)
        assert pixels.std() > 10
        assert shown["sop"] in {str(d.SOPInstanceUID) for d in data.q}
        assert page.locator("#download").is_hidden()
        assert not [c for _, c in session.responses if carries_dicom(c)]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewer-break-the-glass.png"))
    finally:
        session.close()

    events = hub.search(
        f"AuditEvent?entity=ImagingStudy/{data.q_study['id']}&_count=200", hub.operator
    )
    flagged = [
        e["resource"] for e in events.get("entry", []) if REASON in json.dumps(e["resource"])
    ]
    assert flagged, "the break-the-glass views left no AuditEvent with their reason"
    assert all(e["outcome"] == "0" for e in flagged)
    assert all(
        any(c.get("code") == "ETREAT" for p in e.get("purposeOfEvent", []) for c in p["coding"])
        for e in flagged
    )


# -- standalone: a patient with an access code ----------------------------------------------


def test_patient_opens_a_study_with_an_access_code(browser: Any, hub: Hub, data: Data) -> None:
    staff = hub.clinician("org-a", sub="clerk-a")
    issued = hub.http.post(
        "/exchange/access-codes",
        json={
            "patient": data.patient,
            "studies": [data.ct_study["id"]],
            "verification": {"method": "photo-id", "verified_at": datetime.now(UTC).isoformat()},
        },
        headers={"Authorization": f"Bearer {staff}"},
    )
    assert issued.status_code == 201, issued.text
    session = Session(browser)
    try:
        page = session.page
        page.goto(f"{hub.url}/viewer/access")
        page.fill("#access-code", "WRONG-CODE")
        page.click("#access-open")
        page.locator("#access-error").wait_for()
        assert page.inner_text("#access-error")
        page.fill("#access-code", issued.json()["code"].lower())
        page.click("#access-open")
        page.wait_for_selector("#image[data-drawn]")
        assert page.locator("#studies li.study").count() == 1
        assert "access code" in page.inner_text("#purpose")
        assert page.locator("#download").is_visible()  # a patient may download their own
        assert not [c for _, c in session.responses if carries_dicom(c)]
    finally:
        session.close()


# -- the launch itself, over plain HTTP ------------------------------------------------------


def test_launch_checks_iss_and_uses_pkce(hub: Hub) -> None:
    with httpx.Client(base_url=hub.url, follow_redirects=False) as http:
        wrong = http.get("/viewer/launch", params={"iss": "http://evil.example/fhir"})
        assert wrong.status_code == 400
        assert "serves the FHIR server" in wrong.text
        started = http.get("/viewer/launch", params={"iss": f"{hub.url}/fhir", "launch": "x"})
        assert started.status_code == 302
        location = httpx.URL(started.headers["location"])
        assert str(location).startswith(f"{hub.url}/idp/authorize")
        assert location.params["code_challenge_method"] == "S256"
        assert location.params["redirect_uri"] == f"{hub.url}/viewer/callback"
        assert "launch" in location.params["scope"].split()
        cookie = started.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "path=/viewer/callback" in cookie
        forged = http.get("/viewer/callback", params={"code": "c", "state": "not-mine"})
        assert forged.status_code == 400
        page = http.get("/viewer/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for external in ("http://", "https://", "//cdn"):
            assert external not in page.text
