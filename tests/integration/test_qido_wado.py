"""QIDO-RS and WADO-RS at a real node, through the dicomweb-client library and raw HTTP."""

from __future__ import annotations

import io
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid

from exchange.dicom.samples import StudySpec, write_study
from exchange.node.importer import collect
from exchange.security import grants
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests.dicomdata import bundled

pytestmark = pytest.mark.integration

DICOM_ACCEPT = 'multipart/related; type="application/dicom"'
PATIENT = StudySpec(
    patient_id="QW-PAT-7731",
    patient_name="Quidowado^Testa",
    accession="QW-ACC-1",
    description="Grant-gated chest",
    study_date="20230815",
    slices=4,
    size=64,
)
BUNDLED = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm"]


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def seeded(federation, tmp_path_factory):
    """Bundled files, the DICOMDIR set, a generated study and a JPEG-LS copy, all at site-a."""
    root = tmp_path_factory.mktemp("qido-wado")
    originals = [bundled(name) for name in BUNDLED]
    originals += [bundled("examples_overlay.dcm")]
    for path in originals:
        federation.import_into("site-a", path)
    dicomdir = bundled("DICOMDIR")
    federation.import_into("site-a", dicomdir)
    originals += collect(dicomdir)
    generated = write_study(PATIENT, root / "generated")
    federation.import_into("site-a", root / "generated")
    # The same MR as JPEG-LS, which this node cannot decode, under new UIDs.
    jpegls = pydicom.dcmread(bundled("MR_small_jpeg_ls_lossless.dcm"))
    jpegls.StudyInstanceUID = generate_uid()
    jpegls.SeriesInstanceUID = generate_uid()
    jpegls.SOPInstanceUID = jpegls.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    jpegls_path = root / "jpegls.dcm"
    jpegls.save_as(jpegls_path, enforce_file_format=True)
    federation.import_into("site-a", jpegls_path)
    return {
        "originals": originals,
        "generated": generated,
        "jpegls": jpegls_path,
        "node": federation.node("site-a").url,
    }


def _client(node: str, grant: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"{node}/dicomweb", headers={"Authorization": f"Bearer {grant}"})


def _auth(grant: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {grant}", **headers}


def _parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related response."""
    boundary = re.search(r"boundary=([^;\s]+)", response.headers["content-type"])
    assert boundary is not None
    delimiter = b"--" + boundary.group(1).strip('"').encode()
    parts = []
    for piece in response.content.split(delimiter)[1:]:
        if piece.startswith(b"--"):
            break
        _head, _, body = piece.partition(b"\r\n\r\n")
        assert body.endswith(b"\r\n")
        parts.append(body[:-2])
    return parts


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _instance_url(node: str, path: Path) -> str:
    study, series, sop = _uids(path)
    return f"{node}/dicomweb/studies/{study}/series/{series}/instances/{sop}"


# -- retrieval: the acceptance ----------------------------------------------------------


def test_every_imported_file_comes_back_byte_for_byte_apart_from_the_preamble(federation, seeded):
    by_study: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in seeded["originals"]:
        study, _series, sop = _uids(path)
        by_study[study][sop] = path
    assert len(by_study) >= 6
    for study, expected in by_study.items():
        grant = federation.grant("site-a", study, "export")
        response = httpx.get(
            f"{seeded['node']}/dicomweb/studies/{study}",
            headers=_auth(grant, Accept=DICOM_ACCEPT),
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(DICOM_ACCEPT)
        received = {}
        for part in _parts(response):
            sop = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID
            received[sop] = part
        # The study may hold more (the DICOMDIR's studies span files); ours are all there.
        assert set(expected) <= set(received)
        for sop, path in expected.items():
            original = path.read_bytes()
            assert received[sop][:128] == bytes(128)
            assert received[sop][128:] == original[128:], path.name


def test_dicomweb_client_retrieves_instances_series_and_studies(federation, seeded):
    node = seeded["node"]
    path = bundled("JPEG2000.dcm")
    study, series, sop = _uids(path)
    client = _client(node, federation.grant("site-a", study, "export"))
    instance = client.retrieve_instance(study, series, sop)
    original = _read(path)
    assert instance.SOPInstanceUID == sop
    assert instance.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert instance.PixelData == original.PixelData
    assert [ds.SOPInstanceUID for ds in client.retrieve_series(study, series)] == [sop]
    generated = sorted(seeded["generated"])
    g_study, g_series, _ = _uids(generated[0])
    g_client = _client(node, federation.grant("site-a", g_study, "export"))
    retrieved = g_client.retrieve_study(g_study)
    assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(_uids(p)[2] for p in generated)
    assert len(g_client.retrieve_series(g_study, g_series)) == PATIENT.slices


def test_transfer_syntax_negotiation_never_transcodes(federation, seeded):
    path = bundled("CT_small.dcm")  # stored as Explicit VR Little Endian
    study, series, sop = _uids(path)
    url = f"{seeded['node']}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    grant = federation.grant("site-a", study, "export")
    for accept in (
        "*/*",
        f"{DICOM_ACCEPT}; transfer-syntax=*",
        f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.1",
        f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.4.50, "
        f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.1; q=0.5",
    ):
        response = httpx.get(url, headers=_auth(grant, Accept=accept))
        assert response.status_code == 200, accept
        assert _parts(response)[0][128:] == path.read_bytes()[128:]
    refused = httpx.get(
        url, headers=_auth(grant, Accept=f"{DICOM_ACCEPT}; transfer-syntax=1.2.840.10008.1.2.4.50")
    )
    assert refused.status_code == 406
    assert "does not transcode" in refused.json()["error"]["message"]
    wrong_type = httpx.get(url, headers=_auth(grant, Accept="application/pdf"))
    assert wrong_type.status_code == 406


# -- QIDO-RS within a granted study -------------------------------------------------------


def test_series_and_instance_searches_with_a_view_grant(federation, seeded):
    generated = sorted(seeded["generated"])
    study, series, _ = _uids(generated[0])
    client = _client(seeded["node"], federation.grant("site-a", study, "view"))
    (found,) = client.search_for_series(study)
    assert found["0020000E"]["Value"] == [series]
    assert found["00201209"]["Value"] == [PATIENT.slices]
    assert found["00080060"]["Value"] == ["CT"]
    instances = client.search_for_instances(study, series)
    assert [i["00200013"]["Value"][0] for i in instances] == [1, 2, 3, 4]
    assert {i["00080018"]["Value"][0] for i in instances} == {_uids(p)[2] for p in generated}
    assert len(client.search_for_instances(study)) == PATIENT.slices
    one = client.search_for_instances(study, series, search_filters={"InstanceNumber": 3})
    assert [i["00200013"]["Value"][0] for i in one] == [3]
    assert client.search_for_series(study, search_filters={"Modality": "MR"}) == []
    paged = client.search_for_instances(study, series, limit=3)
    assert len(paged) == 3
    assert len(client.search_for_instances(study, series, limit=3, get_remaining=True)) == 4


def test_qido_bad_input_is_400_naming_it(federation, seeded):
    study, _, _ = _uids(sorted(seeded["generated"])[0])
    grant = federation.grant("site-a", study, "view")
    url = f"{seeded['node']}/dicomweb/studies/{study}/series"
    unknown = httpx.get(url, params={"Colour": "blue"}, headers=_auth(grant))
    assert unknown.status_code == 400
    assert "Colour" in unknown.json()["error"]["message"]
    bad_date = httpx.get(url, params={"StudyDate": "last week"}, headers=_auth(grant))
    assert bad_date.status_code == 400
    assert "StudyDate" in bad_date.json()["error"]["message"]
    xml = httpx.get(url, headers=_auth(grant, Accept="application/dicom+xml"))
    assert xml.status_code == 406


# -- QIDO-RS study search ---------------------------------------------------------------------


def test_site_credential_searches_its_own_tenant(federation, seeded):
    node = seeded["node"]
    key = federation.api_key("site-a")
    study, _, _ = _uids(sorted(seeded["generated"])[0])
    headers = {"X-API-Key": key, "Accept": "application/dicom+json"}
    by_id = httpx.get(
        f"{node}/dicomweb/studies", params={"PatientID": PATIENT.patient_id}, headers=headers
    )
    assert by_id.status_code == 200
    assert by_id.headers["content-type"].startswith("application/dicom+json")
    (result,) = by_id.json()
    assert result["0020000D"]["Value"] == [study]
    assert result["00100010"]["Value"] == [{"Alphabetic": PATIENT.patient_name}]
    assert result["00201208"]["Value"] == [PATIENT.slices]
    assert result["00081190"]["Value"] == [f"{node}/dicomweb/studies/{study}"]
    by_dates = httpx.get(
        f"{node}/dicomweb/studies",
        params={"StudyDate": "20230801-20230831", "PatientName": "quidowado*"},
        headers=headers,
    )
    assert [r["0020000D"]["Value"][0] for r in by_dates.json()] == [study]
    none = httpx.get(
        f"{node}/dicomweb/studies",
        params={"StudyDate": "-20000101", "PatientID": PATIENT.patient_id},
        headers=headers,
    )
    assert none.status_code == 200
    assert none.json() == []
    by_key_in_bearer = httpx.get(
        f"{node}/dicomweb/studies",
        params={"00100020": PATIENT.patient_id},
        headers={"Authorization": f"ApiKey {key}"},
    )
    assert len(by_key_in_bearer.json()) == 1


def test_another_sites_credential_never_sees_these_studies(federation, seeded):
    key_b = federation.api_key("site-b")
    at_a = httpx.get(
        f"{seeded['node']}/dicomweb/studies",
        params={"PatientID": PATIENT.patient_id},
        headers={"X-API-Key": key_b},
    )
    assert at_a.status_code == 401  # site-b's key is not a credential at site-a
    at_b = httpx.get(
        f"{federation.node('site-b').url}/dicomweb/studies",
        params={"PatientID": PATIENT.patient_id},
        headers={"X-API-Key": key_b},
    )
    assert at_b.status_code == 200
    assert at_b.json() == []


def test_a_grant_searches_only_for_its_own_study(federation, seeded):
    node = seeded["node"]
    study, _, _ = _uids(sorted(seeded["generated"])[0])
    other, _, _ = _uids(bundled("CT_small.dcm"))
    grant = federation.grant("site-a", study, "view")
    client = _client(node, grant)
    (found,) = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert found["00100020"]["Value"] == [PATIENT.patient_id]
    missing = httpx.get(f"{node}/dicomweb/studies", headers=_auth(grant))
    assert missing.status_code == 400
    assert "StudyInstanceUID" in missing.json()["error"]["message"]
    wrong = httpx.get(
        f"{node}/dicomweb/studies", params={"StudyInstanceUID": other}, headers=_auth(grant)
    )
    assert wrong.status_code == 403
    both = httpx.get(
        f"{node}/dicomweb/studies",
        params={"StudyInstanceUID": f"{study},{other}"},
        headers=_auth(grant),
    )
    assert both.status_code == 403
    nothing = httpx.get(f"{node}/dicomweb/studies")
    assert nothing.status_code == 401
    assert nothing.headers["www-authenticate"].startswith("Bearer ")


# -- metadata, frames, bulk data -----------------------------------------------------------


def test_metadata_is_the_full_dataset_with_bulk_data_by_reference(federation, seeded):
    node = seeded["node"]
    path = bundled("examples_overlay.dcm")
    study, series, sop = _uids(path)
    client = _client(node, federation.grant("site-a", study, "view"))
    metadata = client.retrieve_instance_metadata(study, series, sop)
    original = _read(path)
    restored = pydicom.Dataset.from_json(metadata, lambda _tag, _vr, uri: uri.encode())
    assert restored.PatientName == original.PatientName
    assert restored.Rows == original.Rows
    assert len(metadata) >= len(original) - 1  # everything but pixel data, by tag
    pixel_uri = metadata["7FE00010"]["BulkDataURI"]
    assert pixel_uri == f"{_instance_url(node, path)}/bulkdata/7FE00010"
    overlay = metadata["60003000"]
    assert "BulkDataURI" in overlay
    assert client.retrieve_bulkdata(overlay["BulkDataURI"]) == [original[0x60003000].value]
    (pixels,) = client.retrieve_bulkdata(pixel_uri)
    assert pixels == original.pixel_array.astype("<u2").tobytes()
    assert metadata["00083002"]["Value"] == [str(original.file_meta.TransferSyntaxUID)]
    series_metadata = client.retrieve_series_metadata(study, series)
    assert [m["00080018"]["Value"][0] for m in series_metadata] == [sop]


def test_study_metadata_lists_every_instance(federation, seeded):
    generated = sorted(seeded["generated"])
    study, _, _ = _uids(generated[0])
    client = _client(seeded["node"], federation.grant("site-a", study, "view"))
    metadata = client.retrieve_study_metadata(study)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(
        _uids(p)[2] for p in generated
    )
    assert all(m["00100020"]["Value"] == [PATIENT.patient_id] for m in metadata)


def test_frames_are_uncompressed_and_in_the_order_asked(federation, seeded):
    node = seeded["node"]
    for name in ("CT_small.dcm", "JPEG2000.dcm"):
        study, series, sop = _uids(bundled(name))
        client = _client(node, federation.grant("site-a", study, "view"))
        (frame,) = client.retrieve_instance_frames(study, series, sop, [1])
        expected = _read(bundled(name)).pixel_array
        assert frame == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), name
    study, series, sop = _uids(bundled("SC_rgb_rle_2frame.dcm"))
    client = _client(node, federation.grant("site-a", study, "view"))
    second, first = client.retrieve_instance_frames(study, series, sop, [2, 1])
    expected = _read(bundled("SC_rgb_rle_2frame.dcm")).pixel_array
    assert first == expected[0].tobytes()
    assert second == expected[1].tobytes()
    octets = client.retrieve_instance_frames(
        study, series, sop, [1], media_types=("application/octet-stream",)
    )
    assert octets == [first]


def test_frame_errors_are_plain(federation, seeded):
    node = seeded["node"]
    study, series, sop = _uids(bundled("CT_small.dcm"))
    grant = federation.grant("site-a", study, "view")
    base = f"{node}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    beyond = httpx.get(f"{base}/frames/2", headers=_auth(grant))
    assert beyond.status_code == 404
    assert "frame 2" in beyond.json()["error"]["message"]
    for frames in ("0", "1,x", "1,,2", "\u00b2", "9" * 5000):
        response = httpx.get(f"{base}/frames/{frames}", headers=_auth(grant))
        assert response.status_code == 400, frames
    jpeg = httpx.get(
        f"{base}/frames/1", headers=_auth(grant, Accept='multipart/related; type="image/jpeg"')
    )
    assert jpeg.status_code == 406


def test_undecodable_pixels_are_406_but_the_instance_still_exports(federation, seeded):
    node = seeded["node"]
    path = seeded["jpegls"]
    study, series, sop = _uids(path)
    base = _instance_url(node, path)
    view = federation.grant("site-a", study, "view")
    for suffix in ("/frames/1", "/rendered", "/thumbnail"):
        response = httpx.get(base + suffix, headers=_auth(view))
        assert response.status_code == 406, suffix
        assert "JPEG-LS" in response.json()["error"]["message"]
    export = _client(node, federation.grant("site-a", study, "export"))
    assert export.retrieve_instance(study, series, sop).PixelData == _read(path).PixelData


# -- rendered ----------------------------------------------------------------------------


def test_rendered_png_and_jpeg(federation, seeded):
    node = seeded["node"]
    study, series, sop = _uids(bundled("CT_small.dcm"))
    client = _client(node, federation.grant("site-a", study, "view"))
    png = client.retrieve_instance_rendered(study, series, sop)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size, image.mode) == ("PNG", (128, 128), "L")
    jpeg = client.retrieve_instance_rendered(
        study, series, sop, media_types=("image/jpeg",), params={"quality": 50}
    )
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    small = client.retrieve_instance_rendered(study, series, sop, params={"viewport": "64,32"})
    assert Image.open(io.BytesIO(small)).size == (32, 32)
    narrow = client.retrieve_instance_rendered(study, series, sop, params={"window": "40,80"})
    wide = client.retrieve_instance_rendered(study, series, sop, params={"window": "40,4000"})
    narrow_pixels = np.asarray(Image.open(io.BytesIO(narrow)))
    wide_pixels = np.asarray(Image.open(io.BytesIO(wide)))
    assert narrow_pixels.std() > wide_pixels.std()  # a narrow window has more contrast


def test_rendered_frames_series_study_and_thumbnails(federation, seeded):
    node = seeded["node"]
    study, series, sop = _uids(bundled("SC_rgb_rle_2frame.dcm"))
    grant = federation.grant("site-a", study, "view")
    client = _client(node, grant)
    frame = client.retrieve_instance_frames_rendered(study, series, sop, [2])
    image = Image.open(io.BytesIO(frame))
    assert (image.mode, image.size) == ("RGB", (100, 100))
    expected = _read(bundled("SC_rgb_rle_2frame.dcm")).pixel_array[1]
    assert np.array_equal(np.asarray(image), expected)  # PNG is lossless
    series_png = client.retrieve_series_rendered(study, series)
    assert Image.open(io.BytesIO(series_png)).size == (100, 100)
    base = f"{node}/dicomweb/studies/{study}"
    for url in (f"{base}/rendered", f"{base}/thumbnail", f"{base}/series/{series}/thumbnail"):
        response = httpx.get(url, headers=_auth(grant, Accept="image/*"))
        assert response.status_code == 200, url
        assert response.headers["content-type"] == "image/png"
    thumb = httpx.get(
        f"{base}/series/{series}/instances/{sop}/thumbnail",
        params={"viewport": "50,50"},
        headers=_auth(grant, Accept="image/jpeg"),
    )
    assert Image.open(io.BytesIO(thumb.content)).size == (50, 50)


def test_rendering_bad_input_is_400_or_406(federation, seeded):
    node = seeded["node"]
    study, _, _ = _uids(bundled("CT_small.dcm"))
    grant = federation.grant("site-a", study, "view")
    url = f"{_instance_url(node, bundled('CT_small.dcm'))}/rendered"
    for params in ({"window": "wide"}, {"window": "40,0"}, {"viewport": "-1,5"}, {"quality": "0"}):
        response = httpx.get(url, params=params, headers=_auth(grant))
        assert response.status_code == 400, params
        assert response.json()["error"]["code"] == "invalid"
    unsupported = httpx.get(url, params={"annotation": "patient"}, headers=_auth(grant))
    assert unsupported.status_code == 400
    assert "annotation" in unsupported.json()["error"]["message"]
    for accept in ("image/gif", ";", ",,", "image/png; q=0", 'image/"png'):
        response = httpx.get(url, headers=_auth(grant, Accept=accept))
        assert response.status_code == 406, accept


# -- refusals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct(seeded):
    study, _, _ = _uids(bundled("CT_small.dcm"))
    return {
        "study": study,
        "instance": _instance_url(seeded["node"], bundled("CT_small.dcm")),
    }


def test_no_grant_is_401_with_a_challenge(seeded, ct):
    for suffix in ("", "/metadata", "/rendered", "/frames/1"):
        response = httpx.get(ct["instance"] + suffix)
        assert response.status_code == 401, suffix
        assert response.headers["www-authenticate"].startswith("Bearer ")
    series = httpx.get(f"{seeded['node']}/dicomweb/studies/{ct['study']}/series")
    assert series.status_code == 401


def test_expired_grant_is_401(federation, ct, monkeypatch):
    monkeypatch.setattr(grants, "now", lambda: int(time.time()) - 120)
    expired = federation.grant("site-a", ct["study"], "view", ttl=30)
    response = httpx.get(f"{ct['instance']}/metadata", headers=_auth(expired))
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


def test_grant_for_another_study_is_403(federation, seeded, ct):
    other, _, _ = _uids(bundled("MR_small.dcm"))
    grant = federation.grant("site-a", other, "export")
    for suffix in ("", "/metadata"):
        response = httpx.get(ct["instance"] + suffix, headers=_auth(grant))
        assert response.status_code == 403
        assert response.json()["error"]["message"] == "the grant is for another study"


def test_grant_for_another_node_is_401(federation, ct):
    for_b = federation.grant("site-b", ct["study"], "export")
    response = httpx.get(ct["instance"], headers=_auth(for_b))
    assert response.status_code == 401
    assert "another node" in response.json()["error"]["message"]


def test_view_grant_cannot_export_raw_dicom(federation, ct):
    view = federation.grant("site-a", ct["study"], "view")
    response = httpx.get(ct["instance"], headers=_auth(view, Accept=DICOM_ACCEPT))
    assert response.status_code == 403
    assert "export" in response.json()["error"]["message"]
    study_level = httpx.get(
        ct["instance"].split("/series/")[0], headers=_auth(view, Accept=DICOM_ACCEPT)
    )
    assert study_level.status_code == 403


def test_a_users_own_token_is_never_a_grant(federation, ct):
    hub = federation.hub
    idp = DevIdentityProvider(f"{hub.url}/idp", load_or_create(key_path(hub.data_dir)), "exchange")
    token = idp.issue(sub="dr", role="clinician", org="org-a")
    for suffix in ("", "/metadata", "/rendered"):
        response = httpx.get(ct["instance"] + suffix, headers=_auth(token))
        assert response.status_code == 401, suffix
        assert "user tokens are not accepted" in response.json()["error"]["message"]


def test_a_study_held_at_site_a_is_not_found_at_site_b(federation, ct):
    grant = federation.grant("site-b", ct["study"], "export")
    url = ct["instance"].replace(federation.node("site-a").url, federation.node("site-b").url)
    response = httpx.get(url, headers=_auth(grant))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not-found"


def test_unknown_series_or_instance_in_the_granted_study_is_404(federation, ct):
    grant = federation.grant("site-a", ct["study"], "export")
    study_url = ct["instance"].split("/series/")[0]
    for url in (
        f"{study_url}/series/1.2.3.999",
        f"{study_url}/series/1.2.3.999/metadata",
        f"{study_url}/series/1.2.3.999/rendered",
        f"{ct['instance'].rsplit('/', 1)[0]}/1.2.3.999",
        f"{ct['instance'].rsplit('/', 1)[0]}/1.2.3.999/frames/1",
    ):
        response = httpx.get(url, headers=_auth(grant))
        assert response.status_code == 404, url
        assert response.json()["error"]["code"] == "not-found"
