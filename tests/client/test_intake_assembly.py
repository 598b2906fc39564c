"""Series settle early (written while the rest is read) and the store is as if they had not."""

from __future__ import annotations

import json

import numpy as np
from dicom_factory import expected_stack, ingest_dicom, plant_secret, write_cine_series

from client.intake.assembly import SeriesAssembly
from client.intake.reading import InstanceResult
from client.store import LocalStore


def _result(index, key="", instance="", reason=""):
    return InstanceResult(index=index, reason=reason, key=key, subject="s", study_uid="st",
                          series_uid=key, instance=instance, fingerprint=f"f{index}")


def _assembly(folder_of, may_settle=lambda key: True):
    skipped, settled = [], []
    assembly = SeriesAssembly(folder_of=folder_of, may_settle=may_settle,
                              on_skip=lambda i, reason: skipped.append((i, reason)),
                              on_settled=settled.append)
    return assembly, skipped, settled


def test_results_are_used_in_scan_order_whatever_order_they_arrive_in():
    # Prepare: files 1 and 3 hold the same instance; file 2 could not be read
    results = [_result(0, "a", "i0"), _result(1, "a", "i1"), _result(2, reason="not_dicom"),
               _result(3, "a", "i1"), _result(4, "a", "i4")]
    assembly, skipped, _ = _assembly([0] * 5)
    assembly.expect(range(5))

    # Execute: chunks come back last first
    assembly.deliver(results[3:])
    assembly.deliver(results[:3])
    assembly.close_pass()

    # Assert: the first scanned copy is kept, as in a sequential read
    assert assembly.parts["a"].files == [0, 1, 4]
    assert assembly.parts["a"].fingerprints == ["f0", "f1", "f4"]
    assert skipped == [(2, "not_dicom"), (3, "duplicate_instance")]


def test_a_series_settles_when_the_scan_leaves_its_folder_and_reopens_on_a_later_file():
    # Prepare: folders 0: a, c (c may not settle); 1: b; 2: a again, d; 3: e
    results = [_result(0, "a", "a0"), _result(1, "c", "c1"), _result(2, "b", "b2"),
               _result(3, "a", "a3"), _result(4, "d", "d4"), _result(5, "e", "e5")]
    assembly, _, settled = _assembly([0, 0, 1, 2, 2, 3], may_settle=lambda key: key != "c")
    assembly.expect(range(6))

    # Execute
    assembly.deliver(results)
    assembly.close_pass()
    again = assembly.reread()

    # Assert: a and b settled, a reopened (its first file is read again); after a reopening
    # nothing more settles (d stays open although the scan left its folder)
    assert [p.key for p in settled] == ["a", "b"]
    assert assembly.reopened == {"a"}
    assert again == [0]
    assert sorted(assembly.parts) == ["a", "c", "d", "e"]
    assert assembly.parts["a"].files == [3]


def test_a_series_spread_over_folders_is_built_from_all_its_files(tmp_path):
    # Prepare: a series missing its last frame in folder a, another series in b, the missing
    # frame in c (the scan settles the first series after a, then finds more of it)
    export = tmp_path / "export"
    partial = write_cine_series(export / "a", seed=1, slices=3, phases=4, study=5, drop=((2, 3),))
    other = write_cine_series(export / "b", seed=2, slices=2, phases=3, study=6)
    full = write_cine_series(tmp_path / "late", seed=1, slices=3, phases=4, study=5)
    late = [p for p in full.files if p.name not in {q.name for q in partial.files}]
    (export / "c").mkdir()
    for path in late:
        path.rename(export / "c" / path.name)

    # Execute
    summary = ingest_dicom(export, tmp_path / "store", crop_px=16)

    # Assert: both series whole, nothing skipped
    store = LocalStore.open(tmp_path / "store")
    arrays = sorted(store.load(r.key).tobytes() for r in store.records())
    assert arrays == sorted(expected_stack(t, 16).tobytes() for t in (full, other))
    assert (summary.series, summary.series_written, summary.skipped) == (2, 2, {})
    assert (summary.files_accepted, summary.files_read) == (18, 18)


def test_a_settled_series_that_fails_qc_once_complete_is_taken_out_again(tmp_path, monkeypatch):
    # Prepare: a valid series in folder a (stored early), a second series in b, and in c one
    # more file of the first series, one frame over the (lowered) size limit: the whole series
    # fails QC; a reference store gets the same export laid out so that nothing settles early
    monkeypatch.setattr("client.intake.series.MAX_FRAMES_PER_SERIES", 6)
    export, flat = tmp_path / "export", tmp_path / "flat"
    first = write_cine_series(export / "a", seed=1, slices=2, phases=3, study=5)
    write_cine_series(export / "b", seed=2, slices=2, phases=3, study=6)
    odd = write_cine_series(tmp_path / "odd", seed=1, slices=2, phases=3, study=5,
                            spacing=(2.0, 2.0), instance_base=100)
    (export / "c").mkdir()
    odd.files[0].rename(export / "c" / odd.files[0].name)
    flat.mkdir()
    for path in sorted(export.rglob("*")):
        if path.is_file():
            (flat / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    for name in ("store", "reference"):
        plant_secret(tmp_path / name)

    # Execute
    summary = ingest_dicom(export, tmp_path / "store", crop_px=16)
    reference = ingest_dicom(flat, tmp_path / "reference", crop_px=16)

    # Assert: the first series is gone again, from the manifest, the arrays and the index
    store = LocalStore.open(tmp_path / "store")
    assert summary.series_skipped == {"series_too_large": 1}
    assert summary.skipped == {"series_too_large": len(first.files) + 1}
    assert (summary.series, summary.series_written) == (1, 1)
    assert len(list((tmp_path / "store" / "arrays").iterdir())) == 1
    index = json.loads((tmp_path / "store" / "intake" / "index.json").read_text())
    assert set(index["series"]) == {r.key for r in store.records()}
    assert (tmp_path / "store" / "manifest.json").read_bytes() == \
        (tmp_path / "reference" / "manifest.json").read_bytes()
    assert (summary.skipped, summary.series_skipped) == (reference.skipped, reference.series_skipped)
    assert np.array_equal(store.load(store.records()[0].key),
                          LocalStore.open(tmp_path / "reference").load(store.records()[0].key))
