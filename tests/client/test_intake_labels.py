"""Label files keyed by hospital UIDs land on the right series, in store coordinates."""

from __future__ import annotations

import numpy as np
from dicom_factory import ingest_dicom, write_cine_series, write_enhanced_series, write_label_folder
from typer.testing import CliRunner

from client.cli import app
from client.intake.geometry import point_to_store, resample_mask
from client.store import LocalStore
from shared_model.labels import MASK_VALUES


def _disc_centre(frame: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(frame > 300)
    return float(rows.mean()), float(cols.mean())


def test_masks_landmarks_classes_and_disease_reach_the_store(tmp_path):
    # Prepare: a landmark on the disc centre of frame (1, 0)
    truth = write_cine_series(tmp_path / "export", seed=21, slices=3, phases=4,
                              spacing=(1.3, 1.3), description="")
    centre = _disc_centre(truth.frames[1][0])
    hospital_mask = write_label_folder(tmp_path / "labels", truth, labeled_phases=(0, 2),
                                       sequence="cine", view="sax", disease="DCM",
                                       landmarks={(1, 0): {"rv_insertion_anterior": centre}})

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", labels=tmp_path / "labels")

    # Assert: mask = nearest-neighbour resampling of the hospital mask, on labelled frames only
    store = LocalStore.open(tmp_path / "store")
    (record,) = store.records()
    mask = store.load_mask(record.key)
    assert record.labeled_frames == [[s, t] for s in range(3) for t in (0, 2)]
    for s in range(3):
        for t in range(4):
            expected = resample_mask(hospital_mask[s, t], truth.spacing, 32, 1.0) if t in (0, 2) \
                else np.zeros((32, 32), np.uint8)
            np.testing.assert_array_equal(mask[s, t], expected)
    # landmark: mapped exactly, and still on the disc centre in store pixels
    (row, col), = record.landmarks["1,0"].values()
    assert (row, col) == tuple(round(v, 3) for v in point_to_store(*centre, (32, 32), truth.spacing, 32, 1.0))
    store_centre = np.argwhere(mask[1, 0] == MASK_VALUES["lv_blood"]).mean(axis=0)
    assert np.allclose((row, col), store_centre, atol=0.75)
    # classes from the label file; header-derived labels stay header-derived
    assert record.classes == {"sequence": "cine", "view": "sax"}
    assert (record.sequence, record.view) == ("unknown", "unknown")  # 4 phases, no description
    assert store.subject_labels("disease") == {record.subject: "DCM"}
    assert summary.labels["labeled_frames"] == 6 and summary.label_problems == {}


def test_enhanced_landmarks_use_frame_numbers(tmp_path):
    # Prepare
    truth = write_enhanced_series(tmp_path / "export" / "enh", slices=3, phases=4)
    write_label_folder(tmp_path / "labels", truth, labeled_phases=(1,), view="4ch",
                       landmarks={(2, 3): {"lv_apex": (5.0, 6.0)},
                                  (0, 1): {"mitral_hinge_1": (7.0, 8.0)}})

    # Execute
    ingest_dicom(tmp_path / "export", tmp_path / "store", labels=tmp_path / "labels")

    # Assert
    (record,) = LocalStore.open(tmp_path / "store").records()
    assert sorted(record.landmarks) == ["0,1", "2,3"]
    assert list(record.landmarks["2,3"]) == ["lv_apex"]
    assert record.classes["view"] == "4ch"


def test_mask_of_the_wrong_shape_costs_its_labels_not_the_images(tmp_path):
    # Prepare: label files of a 3x4 series applied to a 2x4 export of the same UIDs
    big = write_cine_series(tmp_path / "other", seed=1, slices=3, phases=4)
    write_cine_series(tmp_path / "export", seed=1, slices=2, phases=4)
    write_label_folder(tmp_path / "labels", big, labeled_phases=(0,))

    # Execute
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", labels=tmp_path / "labels")

    # Assert
    (record,) = LocalStore.open(tmp_path / "store").records()
    assert summary.label_problems == {"mask_shape_mismatch": 1}
    assert record.mask == "" and record.labeled_frames == []
    assert record.classes == {"sequence": "cine", "view": "sax"}


def test_label_csv_without_its_columns_is_a_user_error(tmp_path):
    # Prepare
    write_cine_series(tmp_path / "export", slices=2, phases=2, rows=16, cols=16)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "studies.csv").write_text("Study,Diagnosis\n1.2.3,DCM\n")

    # Execute
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "export"), "--out",
                                      str(tmp_path / "store"), "--labels", str(tmp_path / "labels")])

    # Assert
    assert result.exit_code == 2
    assert "studies.csv" in result.output and "StudyInstanceUID" in result.output


def test_store_lists_labelled_frames_landmarks_and_classes(tmp_path):
    # Prepare
    truth = write_cine_series(tmp_path / "export", seed=3, slices=2, phases=3, description="")
    write_label_folder(tmp_path / "labels", truth, labeled_phases=(1,), sequence="cine",
                       view="sax", disease="NOR",
                       landmarks={(0, 1): {"rv_insertion_anterior": (10.0, 10.0),
                                           "rv_insertion_inferior": (20.0, 12.0)}})
    ingest_dicom(tmp_path / "export", tmp_path / "store", labels=tmp_path / "labels")

    # Execute
    store = LocalStore.open(tmp_path / "store")
    frames = list(store.iter_labeled_frames())
    points = list(store.iter_landmark_frames(["rv_insertion_inferior"]))

    # Assert
    key = store.records()[0].key
    assert [(f.key, f.slice, f.phase, f.complete) for f in frames] == [(key, 0, 1, True), (key, 1, 1, True)]
    assert [(p.key, p.slice, p.phase, sorted(p.points)) for p in points] == [
        (key, 0, 1, ["rv_insertion_anterior", "rv_insertion_inferior"])]
    assert store.class_labels("view") == {key: "sax"}
    assert [r.key for r in store.records(sequence="cine", view="sax")] == [key]
    assert store.records(sequence="lge") == []
    assert list(store.subject_labels("disease").values()) == ["NOR"]
