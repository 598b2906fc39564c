"""Re-running is idempotent; an interrupted ingest resumes without redoing or losing series."""

from __future__ import annotations

import pytest
from dicom_factory import ingest_dicom, plant_secret, write_cine_series, write_label_folder

from client.store import LocalStore


def _state(store):
    """(path -> (mtime_ns, size)) of every file but the per-run summary."""
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(store.rglob("*")) if p.is_file() and p.name != "ingest-summary.json"}


def _export(root, n_series=3):
    return [write_cine_series(root, seed=i, slices=2, phases=3, rows=16, cols=16, study=10 + i)
            for i in range(n_series)]


def test_rerun_on_the_same_export_writes_nothing(tmp_path):
    # Prepare
    truths = _export(tmp_path / "export")
    write_label_folder(tmp_path / "labels", truths[0], labeled_phases=(1,))
    first = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16, labels=tmp_path / "labels")
    before = _state(tmp_path / "store")
    manifest = (tmp_path / "store" / "manifest.json").read_bytes()

    # Execute
    second = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16, labels=tmp_path / "labels")

    # Assert: no file touched, no file read again, same counts
    assert _state(tmp_path / "store") == before
    assert (tmp_path / "store" / "manifest.json").read_bytes() == manifest
    assert (second.files_read, second.series_written) == (0, 0)
    assert (second.files_accepted, second.series, second.labels) == (
        first.files_accepted, first.series, first.labels)


def test_interrupted_ingest_resumes_without_redoing_finished_series(tmp_path, monkeypatch):
    # Prepare: the same export into two stores with one secret; interrupt the first after 1 series
    _export(tmp_path / "export")
    for name in ("store", "reference"):
        plant_secret(tmp_path / name)
    ingest_dicom(tmp_path / "export", tmp_path / "reference", crop_px=16)
    original_add = LocalStore.add_series
    calls = []

    def add_then_stop(self, record, array, mask=None):
        if calls:
            raise KeyboardInterrupt  # the operator's Ctrl-C, mid-way
        calls.append(record.key)
        return original_add(self, record, array, mask)

    monkeypatch.setattr(LocalStore, "add_series", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)
    monkeypatch.setattr(LocalStore, "add_series", original_add)
    finished = tmp_path / "store" / "arrays" / f"{calls[0]}.npy"
    finished_stat = finished.stat().st_mtime_ns

    # Execute
    resumed = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Assert: the finished series was neither re-read nor rewritten; the rest was added
    assert finished.stat().st_mtime_ns == finished_stat
    assert (resumed.series, resumed.series_written, resumed.files_read) == (3, 2, 12)
    assert (tmp_path / "store" / "manifest.json").read_bytes() == \
        (tmp_path / "reference" / "manifest.json").read_bytes()


def test_a_file_added_to_a_stored_series_rebuilds_that_series(tmp_path):
    # Prepare: ingest a series with one frame missing, then the frame arrives
    write_cine_series(tmp_path / "export", seed=4, slices=2, phases=3, rows=16, cols=16,
                      drop=((1, 2),))
    incomplete = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)
    write_cine_series(tmp_path / "late", seed=4, slices=2, phases=3, rows=16, cols=16)
    late = next(p for p in sorted((tmp_path / "late").iterdir())
                if p.name not in {q.name for q in (tmp_path / "export").iterdir()})
    late.rename(tmp_path / "export" / late.name)

    # Execute
    complete = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Assert
    assert incomplete.series_as_frames == {"missing_phases": 1}  # frames kept meanwhile
    assert (complete.series, complete.files_accepted, complete.skipped) == (1, 6, {})
    assert LocalStore.open(tmp_path / "store").records()[0].shape[:2] == [2, 3]


def test_changed_labels_are_applied_on_rerun(tmp_path):
    # Prepare
    truth = write_cine_series(tmp_path / "export", seed=8, slices=2, phases=3, rows=16, cols=16)
    ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)
    write_label_folder(tmp_path / "labels", truth, labeled_phases=(0,), disease="HCM")

    # Execute
    rerun = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16, labels=tmp_path / "labels")

    # Assert
    store = LocalStore.open(tmp_path / "store")
    (record,) = store.records()
    assert rerun.series_written == 1 and record.labeled_frames == [[0, 0], [1, 0]]
    assert store.subject_labels("disease") == {record.subject: "HCM"}
