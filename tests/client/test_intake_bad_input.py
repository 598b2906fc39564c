"""Bad input is a counted skip with its reason: never a crash, never a hang, never a lost series."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from dicom_factory import BAD_KINDS, expected_stack, ingest_dicom, write_bad_file, write_cine_series
from pydicom.data import get_testdata_file

from client.store import LocalStore


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
@pytest.mark.reliability(15)
def test_each_bad_kind_is_skipped_with_its_reason(tmp_path, kind):
    # Prepare: one good series and one bad file next to it
    truth = write_cine_series(tmp_path / "export", slices=2, phases=3, rows=16, cols=16)
    write_bad_file(kind, tmp_path / "export" / "zz" / "bad")

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Assert
    assert summary.skipped == {BAD_KINDS[kind]: 1}
    assert (summary.files_seen, summary.files_accepted, summary.series) == (7, 6, 1)
    store = LocalStore.open(tmp_path / "store")
    np.testing.assert_array_equal(store.load(store.records()[0].key), expected_stack(truth, 16))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, reason", [
    ("CT_small.dcm", "not_mr"),
    ("MR_truncated.dcm", "truncated"),
    ("rtplan.dcm", "not_mr"),
    ("no_meta.dcm", "not_dicom"),
    ("JPEG2000.dcm", "not_mr"),
])
@pytest.mark.reliability(15)
def test_pydicom_sample_files_are_skipped_with_reason(tmp_path, name, reason):
    # Prepare
    (tmp_path / "export").mkdir()
    shutil.copy(get_testdata_file(name), tmp_path / "export" / "file")

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Assert
    assert summary.skipped == {reason: 1} and summary.series == 0


@pytest.mark.timeout(60)
def test_pydicom_sample_mr_files_in_other_syntaxes_are_read(tmp_path):
    # Prepare: one MR image as big endian, implicit VR, RLE, JPEG 2000 and JPEG-LS (same series)
    names = ("MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
             "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm")
    for name in names:
        target = tmp_path / name
        (target).mkdir()
        shutil.copy(get_testdata_file(name), target / "file")

    # Execute
    summaries = [ingest_dicom(tmp_path / name, tmp_path / f"store-{name}", crop_px=16)
                 for name in names]

    # Assert: every syntax decodes to the same store image
    assert [s.files_accepted for s in summaries] == [1] * len(names)
    images = [LocalStore.open(tmp_path / f"store-{name}") for name in names]
    arrays = [s.load(s.records()[0].key) for s in images]
    for array in arrays[1:]:
        np.testing.assert_array_equal(array, arrays[0])


@pytest.mark.timeout(180)
@pytest.mark.reliability(15)
def test_thousand_files_with_ten_percent_bad_ingest_the_good_ones(tmp_path):
    # Prepare: 30 series x 30 tiny frames = 900 good files, 100 bad ones of every kind
    truths = [write_cine_series(tmp_path / "export" / f"s{i:02d}", seed=i, slices=5, phases=6,
                                rows=12, cols=12, study=100 + i) for i in range(30)]
    kinds = sorted(BAD_KINDS)
    expected = {}
    for i in range(100):
        kind = kinds[i % len(kinds)]
        write_bad_file(kind, tmp_path / "export" / "bad" / f"{i:03d}", seed=1000 + i)
        expected[BAD_KINDS[kind]] = expected.get(BAD_KINDS[kind], 0) + 1

    # Execute: through the process pool
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=12, workers=2)

    # Assert
    assert (summary.files_seen, summary.files_accepted, summary.series) == (1000, 900, 30)
    assert summary.skipped == dict(sorted(expected.items()))
    store = LocalStore.open(tmp_path / "store")
    stored = sorted(store.load(r.key).tobytes() for r in store.records())
    assert stored == sorted(expected_stack(t, 12).tobytes() for t in truths)


@pytest.mark.timeout(120)
@pytest.mark.reliability(15)
def test_a_file_that_kills_its_worker_costs_only_itself(tmp_path, monkeypatch):
    # Prepare: 60 good files and one whose reading kills the worker process (forked workers
    # inherit the patched reader)
    import os

    from client.intake import reading

    truths = [write_cine_series(tmp_path / "export" / f"s{i}", seed=i, slices=3, phases=4,
                                rows=12, cols=12, study=50 + i) for i in range(5)]
    write_bad_file("not_dicom_text", tmp_path / "export" / "s2" / "boom")
    original = reading.InstanceReader.read

    def read_or_die(self, index, path):
        if str(path).endswith("boom"):
            os._exit(3)
        return original(self, index, path)

    monkeypatch.setattr(reading.InstanceReader, "read", read_or_die)

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=12, workers=2)

    # Assert
    assert summary.skipped == {"worker_crashed": 1}
    assert (summary.files_accepted, summary.series) == (60, 5)
    store = LocalStore.open(tmp_path / "store")
    assert sorted(store.load(r.key).tobytes() for r in store.records()) == \
        sorted(expected_stack(t, 12).tobytes() for t in truths)


@pytest.mark.timeout(120)
@pytest.mark.reliability(15)
def test_a_file_that_hangs_its_worker_is_timed_out(tmp_path, monkeypatch):
    # Prepare: one file on which reading never returns
    import time

    from client.intake import reading, workers

    truths = [write_cine_series(tmp_path / "export" / f"s{i}", seed=i, slices=3, phases=4,
                                rows=12, cols=12, study=60 + i) for i in range(5)]
    write_bad_file("not_dicom_text", tmp_path / "export" / "s1" / "hang")
    original = reading.InstanceReader.read

    def read_or_hang(self, index, path):
        if str(path).endswith("hang"):
            time.sleep(3600)
        return original(self, index, path)

    monkeypatch.setattr(reading.InstanceReader, "read", read_or_hang)
    monkeypatch.setattr(workers, "SECONDS_PER_FILE", 0.25)

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=12, workers=2)

    # Assert
    assert summary.skipped == {"read_timeout": 1}
    assert (summary.files_accepted, summary.series) == (60, len(truths))
