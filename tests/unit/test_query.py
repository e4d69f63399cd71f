"""QIDO-RS matching over the sealed catalog, on a real SQLite database."""

import io
import time

import pytest
from pydicom.uid import generate_uid

from exchange.database import make_engine
from exchange.dicom.samples import StudySpec, study
from exchange.errors import BadRequest
from exchange.node import query
from exchange.node.query import CatalogSearch, Level, Scope
from exchange.node.store import InstanceStore
from exchange.security.keystore import FileKeyStore, master_key

BASE = "https://node.example"

SPECS = {
    "doe": StudySpec(
        patient_id="P-DOE",
        patient_name="Doe^Jane",
        accession="A-100",
        modality="CT",
        description="Chest CT",
        study_date="20240105",
        slices=3,
        size=8,
    ),
    "roe": StudySpec(
        patient_id="P-ROE",
        patient_name="Roe^Richard",
        accession="A-200",
        modality="MR",
        description="Brain MR",
        study_date="20240610",
        slices=2,
        size=8,
    ),
    "doe2": StudySpec(
        patient_id="P-DOE",
        patient_name="Doe^Jane",
        accession="A-300",
        modality="CT",
        description="Abdomen CT",
        study_date="20250120",
        slices=1,
        size=8,
    ),
}


def _store_study(store, tenant, spec, **changes):
    datasets = study(spec)
    for ds in datasets:
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        store.store(tenant, buffer)
    return datasets


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Three studies in tenant-a (one with a second, MR series), one in tenant-b."""
    root = tmp_path_factory.mktemp("catalog")
    engine = make_engine(f"sqlite:///{root / 'node.db'}")
    keys = FileKeyStore(
        root / "keys", master_key(None, root / "master.key"), ["tenant-a", "tenant-b"]
    )
    store = InstanceStore(engine, root / "blobs", keys, max_instance_bytes=10 * 1024 * 1024)
    uids = {name: _store_study(store, "tenant-a", spec) for name, spec in SPECS.items()}
    extra = StudySpec(**{**SPECS["doe"].__dict__, "modality": "MR", "slices": 2})
    second = study(extra)
    series_uid = generate_uid()
    for ds in second:
        ds.StudyInstanceUID = uids["doe"][0].StudyInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = 2
        ds.SeriesDescription = "Scout localiser"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        store.store("tenant-a", buffer)
    uids["doe-series2"] = second
    uids["other"] = _store_study(
        store, "tenant-b", StudySpec(patient_id="P-DOE", patient_name="Doe^Jane", accession="B-1")
    )
    return CatalogSearch(engine, store, BASE), uids


def _search(catalog, level=Level.STUDY, scope=None, **params):
    search, _ = catalog
    items = [
        (k, v)
        for k, values in params.items()
        for v in (values if isinstance(values, list) else [values])
    ]
    return search.run(query.parse(level, items), scope or Scope("tenant-a"))


def _values(results, tag):
    return [r.get(tag, {}).get("Value", [None])[0] for r in results]


def _study_uids(page):
    return set(_values(page.results, "0020000D"))


# -- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ([("Colour", "red")], "Colour"),
        ([("00100020", "x"), ("PatientWeight", "70")], "PatientWeight"),
        ([("limit", "0")], "limit"),
        ([("limit", "ten")], "limit"),
        ([("offset", "-1")], "offset"),
        ([("StudyDate", "2024")], "StudyDate"),
        ([("StudyDate", "20240101-2025")], "StudyDate"),
        ([("StudyInstanceUID", "1.2.abc")], "StudyInstanceUID"),
        ([("includefield", "NoSuchThing")], "NoSuchThing"),
        ([("fuzzymatching", "maybe")], "fuzzymatching"),
        ([("InstanceNumber", "first")], "InstanceNumber"),
    ],
)
def test_bad_queries_are_refused_by_name(params, named):
    with pytest.raises(BadRequest) as raised:
        query.parse(Level.STUDY, params)
    assert named in raised.value.message
    assert raised.value.status == 400


def test_keywords_and_tags_are_the_same_key_and_limit_is_bounded():
    by_tag = query.parse(Level.STUDY, [("00100020", "P-1"), ("limit", "5000")])
    assert by_tag.match("PatientID").values == ("P-1",)
    assert by_tag.limit == query.MAX_LIMIT
    assert query.parse(Level.STUDY, []).limit == query.DEFAULT_LIMIT
    lists = query.parse(Level.STUDY, [("StudyInstanceUID", "1.2,1.3"), ("StudyInstanceUID", "1.4")])
    assert lists.match("StudyInstanceUID").values == ("1.2", "1.3", "1.4")
    assert query.parse(Level.STUDY, [("PatientName", "*")]).match("PatientName").universal


# -- matching ------------------------------------------------------------------------


def test_patient_id_matches_exactly_through_the_blind_index(catalog):
    _, uids = catalog
    page = _search(catalog, PatientID="P-DOE")
    assert _study_uids(page) == {uids["doe"][0].StudyInstanceUID, uids["doe2"][0].StudyInstanceUID}
    assert _search(catalog, PatientID="P-DO").results == []
    assert _search(catalog, PatientID="p-doe").results == []  # IDs are case-sensitive


def test_study_results_carry_computed_counts_modalities_and_url(catalog):
    _, uids = catalog
    uid = uids["doe"][0].StudyInstanceUID
    (result,) = _search(catalog, AccessionNumber="A-100").results
    assert result["0020000D"]["Value"] == [uid]
    assert result["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
    assert result["00080061"]["Value"] == ["CT", "MR"]  # ModalitiesInStudy
    assert result["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries
    assert result["00201208"]["Value"] == [5]  # NumberOfStudyRelatedInstances
    assert result["00081190"]["Value"] == [f"{BASE}/dicomweb/studies/{uid}"]
    assert list(result) == sorted(result)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240105", {"doe"}),
        ("20240101-20241231", {"doe", "roe"}),
        ("-20240301", {"doe"}),
        ("20240601-", {"roe", "doe2"}),
        ("19000101-19991231", set()),
    ],
)
def test_study_date_exact_and_ranges(catalog, value, expected):
    _, uids = catalog
    assert _study_uids(_search(catalog, StudyDate=value)) == {
        uids[n][0].StudyInstanceUID for n in expected
    }


def test_names_and_descriptions_match_wildcards_case_insensitively(catalog):
    _, uids = catalog
    assert _study_uids(_search(catalog, PatientName="doe*")) == {
        uids["doe"][0].StudyInstanceUID,
        uids["doe2"][0].StudyInstanceUID,
    }
    assert _study_uids(_search(catalog, PatientName="R?E^RICHARD")) == {
        uids["roe"][0].StudyInstanceUID
    }
    assert _search(catalog, PatientName="Doe").results == []  # no wildcard: the whole name
    assert _study_uids(_search(catalog, StudyDescription="*ct")) == {
        uids["doe"][0].StudyInstanceUID,
        uids["doe2"][0].StudyInstanceUID,
    }


def test_wildcards_cannot_be_made_to_backtrack_for_ever(catalog):
    started = time.perf_counter()
    page = _search(catalog, PatientName="*d" * 40 + "x", StudyDescription="*?*?*?*" * 20)
    assert page.results == []
    assert time.perf_counter() - started < 2


def test_modalities_in_study_and_uid_lists(catalog):
    _, uids = catalog
    mr = _search(catalog, ModalitiesInStudy="MR")
    assert _study_uids(mr) == {uids["roe"][0].StudyInstanceUID, uids["doe"][0].StudyInstanceUID}
    listed = _search(
        catalog,
        StudyInstanceUID=f"{uids['roe'][0].StudyInstanceUID},{uids['doe2'][0].StudyInstanceUID}",
    )
    assert _study_uids(listed) == {
        uids["roe"][0].StudyInstanceUID,
        uids["doe2"][0].StudyInstanceUID,
    }


def test_a_series_key_at_study_level_finds_the_study_but_counts_all_of_it(catalog):
    _, uids = catalog
    (result,) = _search(catalog, SeriesDescription="scout*").results
    assert result["0020000D"]["Value"] == [uids["doe"][0].StudyInstanceUID]
    assert result["00201208"]["Value"] == [5]


def test_keys_combine_with_and(catalog):
    assert _search(catalog, PatientID="P-DOE", StudyDate="20250120").results[0]["00080050"][
        "Value"
    ] == ["A-300"]
    assert (
        _search(catalog, PatientID="P-DOE", ModalitiesInStudy="MR", StudyDate="20250101-").results
        == []
    )


def test_tenants_never_see_each_other(catalog):
    _, uids = catalog
    other = _search(catalog, scope=Scope("tenant-b"), PatientID="P-DOE")
    assert _study_uids(other) == {uids["other"][0].StudyInstanceUID}
    assert _search(catalog, scope=Scope("tenant-b"), AccessionNumber="A-100").results == []


def test_paging_with_limit_and_offset(catalog):
    everything = _search(catalog)
    assert len(everything.results) == 3
    assert not everything.more
    first = _search(catalog, limit="2")
    assert first.more
    rest = _search(catalog, limit="2", offset="2")
    assert not rest.more
    assert _study_uids(first) | _study_uids(rest) == _study_uids(everything)
    assert len(_study_uids(first) | _study_uids(rest)) == 3
    # The same paging when a key is matched after unsealing.
    named = [_search(catalog, PatientName="*", limit="1", offset=str(i)) for i in range(4)]
    assert [len(p.results) for p in named] == [1, 1, 1, 0]


# -- series and instance levels --------------------------------------------------------


def test_series_of_a_study(catalog):
    _, uids = catalog
    study_uid = uids["doe"][0].StudyInstanceUID
    page = _search(catalog, Level.SERIES, Scope("tenant-a", study_uid))
    assert _values(page.results, "00200011") == [1, 2]  # SeriesNumber order
    assert _values(page.results, "00201209") == [3, 2]  # NumberOfSeriesRelatedInstances
    assert _values(page.results, "00080060") == ["CT", "MR"]
    assert "00100010" not in page.results[0]  # study attributes only when asked
    mr = _search(catalog, Level.SERIES, Scope("tenant-a", study_uid), Modality="MR")
    assert _values(mr.results, "0020000E") == [uids["doe-series2"][0].SeriesInstanceUID]
    asked = _search(catalog, Level.SERIES, Scope("tenant-a", study_uid), includefield="PatientName")
    assert asked.results[0]["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]


def test_instances_of_a_series_with_includefield_all(catalog):
    _, uids = catalog
    first = uids["doe"][0]
    scope = Scope("tenant-a", first.StudyInstanceUID, first.SeriesInstanceUID)
    page = _search(catalog, Level.INSTANCE, scope)
    assert _values(page.results, "00200013") == [1, 2, 3]
    assert page.results[0]["00081190"]["Value"] == [
        f"{BASE}/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        f"/instances/{first.SOPInstanceUID}"
    ]
    assert "00100020" not in page.results[0]
    full = _search(catalog, Level.INSTANCE, scope, includefield="all", InstanceNumber="2")
    (only,) = full.results
    assert only["00100020"]["Value"] == ["P-DOE"]
    assert only["0008103E"]["Value"] == ["Chest CT axial"]
    assert only["00080018"]["Value"] == [uids["doe"][1].SOPInstanceUID]


def test_instances_of_a_study_by_sop_uid(catalog):
    _, uids = catalog
    wanted = uids["doe-series2"][1].SOPInstanceUID
    scope = Scope("tenant-a", uids["doe"][0].StudyInstanceUID)
    page = _search(catalog, Level.INSTANCE, scope, SOPInstanceUID=wanted)
    assert _values(page.results, "00080018") == [wanted]
    assert len(_search(catalog, Level.INSTANCE, scope).results) == 5
