"""Stacks are rebuilt from geometry (position along the normal, TriggerTime), never file names."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import (
    expected_stack,
    ingest_dicom,
    oblique_orientation,
    write_cine_series,
    write_enhanced_series,
)

from client.store import LocalStore


def _only_record(store_path):
    store = LocalStore.open(store_path)
    (record,) = store.records()
    return store, record


def test_cine_stack_rebuilt_from_shuffled_file_names(tmp_path):
    # Prepare: random names, shuffled InstanceNumbers, nested folders
    truth = write_cine_series(tmp_path / "export" / "x" / "y", seed=3, slices=4, phases=5)

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store")

    # Assert
    store, record = _only_record(tmp_path / "store")
    np.testing.assert_array_equal(store.load(record.key), expected_stack(truth))
    assert record.shape == [4, 5, 32, 32]
    assert record.info["slice_positions_mm"] == [0.0, 8.0, 16.0, 24.0]
    assert record.info["trigger_times_ms"][2] == truth.trigger_ms
    assert (record.sequence, record.view) == ("cine", "sax")  # from "cine_SAX" in the header
    assert (summary.files_seen, summary.files_accepted, summary.series) == (20, 20, 1)


def test_enhanced_multiframe_stack_rebuilt_from_shuffled_frames(tmp_path):
    # Prepare: one Enhanced MR file whose frames are stored in random order
    truth = write_enhanced_series(tmp_path / "export" / "enhanced", slices=3, phases=4)

    # Execute
    ingest_dicom(tmp_path / "export", tmp_path / "store")

    # Assert
    store, record = _only_record(tmp_path / "store")
    np.testing.assert_array_equal(store.load(record.key), expected_stack(truth))
    assert (record.sequence, record.view) == ("cine", "4ch")
    assert record.info["enhanced"] is True
    assert record.info["pixel_spacing_mm"] == [1.4, 1.2]


def test_series_interleaved_in_one_folder_are_separated(tmp_path):
    # Prepare: two series of two studies written into the same folder
    a = write_cine_series(tmp_path / "export", seed=5, slices=3, phases=4, study=1)
    b = write_cine_series(tmp_path / "export", seed=6, slices=2, phases=6, study=2,
                          description="")

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store")

    # Assert
    store = LocalStore.open(tmp_path / "store")
    arrays = {store.load(r.key).shape[:2]: store.load(r.key) for r in store.records()}
    np.testing.assert_array_equal(arrays[(3, 4)], expected_stack(a))
    np.testing.assert_array_equal(arrays[(2, 6)], expected_stack(b))
    assert summary.series == 2 and summary.subjects == 1  # one patient, two studies


@pytest.mark.parametrize("description, slices, phases, expected", [
    ("", 4, 12, ("cine", "sax")),  # structure: long time series, several parallel slices
    ("", 1, 12, ("cine", "unknown")),  # a single-slice cine: view not told
    ("", 2, 3, ("unknown", "unknown")),  # nothing tells
    ("LGE PSIR short axis", 3, 1, ("lge", "sax")),
    ("T1 MAP MOLLI 4CH", 1, 1, ("t1_map", "4ch")),
])
def test_sequence_and_view_from_headers_or_unknown(tmp_path, description, slices, phases, expected):
    # Prepare
    write_cine_series(tmp_path / "export", slices=slices, phases=phases, rows=16, cols=16,
                      description=description)

    # Execute
    ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Assert
    _, record = _only_record(tmp_path / "store")
    assert (record.sequence, record.view) == expected


def test_maps_keep_their_physical_scale(tmp_path):
    # Prepare: a T1 map series (raw values are ms)
    truth = write_cine_series(tmp_path / "export", slices=1, phases=1, description="T1 map")

    # Execute
    ingest_dicom(tmp_path / "export", tmp_path / "store")

    # Assert: stored * (hi - lo) + lo gives the raw scale back (within float16 precision)
    store, record = _only_record(tmp_path / "store")
    (lo, hi), = record.info["intensity_window"][0]
    restored = store.load(record.key)[0, 0].astype(np.float32) * (hi - lo) + lo
    assert 500 < float(restored.max()) < 800 and abs(float(np.median(restored)) - 40) < 30
    assert truth.frames[0][0].max() > 600


@pytest.mark.parametrize("drop, reason", [
    (tuple((2, t) for t in range(4)), "missing_slices"),  # a whole middle slice gone
    (((1, 2),), "missing_phases"),  # one frame gone
])
def test_incomplete_stacks_keep_their_frames_for_pretraining(tmp_path, drop, reason):
    # Prepare
    write_cine_series(tmp_path / "export", slices=5, phases=4, rows=16, cols=16, drop=drop)

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Assert: no stack, but every sound frame is in the store, with the reason counted
    assert summary.skipped == {} and summary.series_skipped == {}
    assert summary.series_as_frames == {reason: 1}
    store, record = _only_record(tmp_path / "store")
    assert record.shape == [20 - len(drop), 1, 16, 16]
    assert record.info["stack"] is False and record.info["not_a_stack"] == reason


def test_mixed_orientation_and_spacing_keep_their_frames(tmp_path):
    # Prepare: two halves of "one" series (same UIDs) with different planes / pixel sizes
    write_cine_series(tmp_path / "a" / "p1", seed=1, slices=2, phases=2, rows=16, cols=16)
    write_cine_series(tmp_path / "a" / "p2", seed=2, slices=2, phases=2, rows=16, cols=16,
                      instance_base=100)
    write_cine_series(tmp_path / "b" / "p1", seed=1, slices=2, phases=2, rows=16, cols=16)
    write_cine_series(tmp_path / "b" / "p2", seed=1, slices=2, phases=2, rows=16, cols=16,
                      spacing=(2.0, 2.0), instance_base=100)
    assert oblique_orientation(1) != oblique_orientation(2)

    # Execute
    a = ingest_dicom(tmp_path / "a", tmp_path / "store_a", crop_px=16)
    b = ingest_dicom(tmp_path / "b", tmp_path / "store_b", crop_px=16)

    # Assert
    assert a.series_as_frames == {"inconsistent_orientation": 1} and a.series_skipped == {}
    assert b.series_as_frames == {"inconsistent_spacing": 1} and b.series_skipped == {}
    _, record = _only_record(tmp_path / "store_a")
    assert record.sequence == "localizer"  # frames in two planes
    assert sorted(set(record.info["planes"])) == [0, 1] and record.shape[:2] == [8, 1]


def test_three_plane_localizer_is_split_by_plane(tmp_path):
    # Prepare: one series, three orthogonal planes of 3 frames each (a scout)
    import pydicom

    for plane in range(3):
        write_cine_series(tmp_path / "export" / f"p{plane}", seed=plane, slices=3, phases=1,
                          rows=16, cols=16, instance_base=10 * plane, description="localizer")
    orientations = ([1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1])
    for plane, iop in enumerate(orientations):
        for path in (tmp_path / "export" / f"p{plane}").iterdir():
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = iop
            ds.save_as(path)

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Assert
    assert summary.series_as_frames == {"inconsistent_orientation": 1}
    _, record = _only_record(tmp_path / "store")
    assert record.sequence == "localizer" and record.shape[:2] == [9, 1]
    assert record.info["planes"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
