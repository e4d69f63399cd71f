"""``exchange import``: nothing silently dropped, re-runs idempotent, DICOMDIR followed."""

import shutil

import pytest

from exchange.config import load_settings
from exchange.errors import ConfigurationError
from exchange.node.importer import collect, import_path
from tests.dicomdata import bundled, generated


@pytest.fixture
def settings(tmp_path, monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)
    return load_settings(
        data_dir=tmp_path / "node", node_id="n1", tenants={"t1": {"organization": "org-1"}}
    )


def test_folder_import_counts_everything_and_quarantines_rejects(settings, tmp_path):
    folder = tmp_path / "in"
    (folder / "series").mkdir(parents=True)
    for index, data in enumerate(generated(slices=3)):
        (folder / "series" / f"{index}.dcm").write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    report, quarantine = import_path(settings, folder, "t1")
    assert report.counts["stored"] == 3
    assert report.counts["rejected"] == 1
    assert [p.name for p, _ in report.rejected] == ["notes.txt"]
    reasons = list(quarantine.glob("*.reason.txt"))
    assert len(reasons) == 1
    assert "not a DICOM Part 10 file" in reasons[0].read_text()
    copies = [p for p in quarantine.iterdir() if not p.name.endswith(".reason.txt")]
    assert copies[0].read_text() == "not an image"
    assert (folder / "notes.txt").exists()  # the source is never deleted

    again, _ = import_path(settings, folder, "t1")
    assert again.counts["already present"] == 3
    assert again.counts["stored"] == 0


def test_dicomdir_imports_its_referenced_files(settings, tmp_path):
    source = bundled("DICOMDIR").parent
    media = tmp_path / "media"
    shutil.copytree(source / "77654033", media / "77654033")
    shutil.copytree(source / "98892003", media / "98892003")
    shutil.copytree(source / "98892001", media / "98892001")
    shutil.copy(source / "DICOMDIR", media / "DICOMDIR")
    files = collect(media / "DICOMDIR")
    assert files
    assert all(f.exists() for f in files)
    report, _ = import_path(settings, media / "DICOMDIR", "t1")
    assert report.total == len(files)
    assert report.counts["stored"] + report.counts["rejected"] == len(files)


def test_unknown_tenant_is_a_configuration_error(settings, tmp_path):
    with pytest.raises(ConfigurationError, match="unknown tenant"):
        import_path(settings, tmp_path, "nope")


def test_missing_path_is_a_configuration_error(settings, tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        import_path(settings, tmp_path / "absent", "t1")


def test_groups_report_each_file_and_a_copy_in_the_same_group_is_already_present(
    settings, tmp_path, monkeypatch
):
    from exchange.node import importer

    monkeypatch.setattr(importer, "GROUP_FILES", 4)
    folder = tmp_path / "in"
    folder.mkdir()
    series = generated(slices=5)
    for index, data in enumerate(series):
        (folder / f"{index}.dcm").write_bytes(data)
    (folder / "0-copy.dcm").write_bytes(series[0])  # sorts beside 0.dcm: same group
    (folder / "2-broken.dcm").write_bytes(series[2][:300])
    report, _ = import_path(settings, folder, "t1")
    assert report.counts["stored"] == 5
    assert report.counts["already present"] == 1
    assert report.counts["rejected"] == 1
    assert [p.name for p, _ in report.rejected] == ["2-broken.dcm"]
