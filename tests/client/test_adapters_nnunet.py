"""nnU-Net v2 raw datasets (generated here in that layout) -> store series with partial labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest

from client.adapters.nnunet import parse_label_map, read_dataset
from client.intake.pipeline import IngestOptions, IntakeError, ingest
from client.store import LocalStore
from shared_model.labels import MASK_VALUES

ZOOMS = (1.25, 1.25, 10.0)


def _save(path: Path, data: np.ndarray, zooms=ZOOMS) -> None:
    image = nibabel.Nifti1Image(data, np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms[:data.ndim])
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, str(path))


def _frame(seed: int, shape=(40, 40, 1)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=shape).astype(np.uint8)
    label = np.zeros(shape, dtype=np.uint8)
    label[10:18, 22:30] = 1  # off-centre and not symmetric: a transposed read would show
    image[label == 1] = 220
    return image, label


def _dataset(root: Path, labels: dict[str, int] | None = None, cases_csv: bool = True) -> None:
    meta = {"channel_names": {"0": "cine SSFP"}, "labels": labels or {"background": 0,
            "lv_blood_pool": 1}, "numTraining": 4, "file_ending": ".nii.gz"}
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i, case in enumerate(("MRN123456_0010", "MRN123456_0020", "MRN777_0005")):
        image, label = _frame(i)
        _save(root / "imagesTr" / f"{case}_0000.nii.gz", image)
        _save(root / "labelsTr" / f"{case}.nii.gz", label)
    volume, labels3d = _frame(9, shape=(40, 40, 3))  # a 3-D case: three slices
    _save(root / "imagesTr" / "VOL1_0000.nii.gz", volume)
    _save(root / "labelsTr" / "VOL1.nii.gz", labels3d)
    if cases_csv:
        (root / "cases.csv").write_text("case,patient,group\nMRN123456_0010,MRN123456,hypertrophy\n"
                                        "MRN123456_0020,MRN123456,hypertrophy\n"
                                        "MRN777_0005,MRN777,normal\nVOL1,VOL1,normal\n")


def _run(src: Path, store: Path, **kw):
    return ingest(IngestOptions(src=src, store=store, spacing_mm=1.0, crop_px=48, progress=False,
                                **kw), "nnunet")


def test_frames_become_partially_labelled_series_with_patients_from_cases_csv(tmp_path: Path) -> None:
    # Prepare
    _dataset(tmp_path / "ds")

    # Execute
    summary = _run(tmp_path / "ds", tmp_path / "store")

    # Assert
    store = LocalStore.open(tmp_path / "store")
    assert summary.series == 4 and summary.subjects == 3
    assert summary.files_seen == summary.files_accepted + sum(summary.skipped.values())
    records = store.records()
    assert sorted(r.shape[0] for r in records) == [1, 1, 1, 3]
    for record in records:
        assert record.labeled_frames == []  # blood pool only: never a complete SAX label
        assert len(record.partial_labels) == record.shape[0]
        assert all(v == ["lv_blood"] for v in record.partial_labels.values())
        assert (record.sequence, record.view) == ("cine", "sax")
        mask = store.load_mask(record.key)
        assert set(np.unique(mask)) == {0, MASK_VALUES["lv_blood"]}
    # the blood pool sits where the file put it: columns 22..30 of axis 1 -> rows of the frame
    one = next(r for r in records if r.shape[0] == 1)
    mask = store.load_mask(one.key)[0, 0]
    rows, cols = np.nonzero(mask)
    assert rows.mean() > cols.mean()
    assert {v["disease"] for v in store.manifest.subjects.values()} == {"HCM", "NOR"}


def test_no_case_id_reaches_the_store(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds")
    _run(tmp_path / "ds", tmp_path / "store")
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"MRN123456" not in data and b"MRN777" not in data, path


def test_bad_pairs_are_skipped_with_a_reason_and_the_rest_ingested(tmp_path: Path) -> None:
    # Prepare: a label of the wrong shape, a label value dataset.json does not name, a broken file
    root = tmp_path / "ds"
    _dataset(root)
    _save(root / "labelsTr" / "MRN777_0005.nii.gz", np.zeros((30, 40, 1), dtype=np.uint8))
    bad_values = np.zeros((40, 40, 1), dtype=np.uint8)
    bad_values[5:9, 5:9] = 7
    _save(root / "labelsTr" / "MRN123456_0020.nii.gz", bad_values)
    (root / "imagesTr" / "BROKEN_0000.nii.gz").write_bytes(b"not a nifti file")

    # Execute
    summary = _run(root, tmp_path / "store")

    # Assert
    assert summary.series == 2
    assert summary.skipped == {"inconsistent_labels": 2, "unknown_label_values": 2,
                               "unreadable_nifti": 1}
    assert summary.files_seen == summary.files_accepted + sum(summary.skipped.values())


def test_rerun_writes_nothing(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds")
    _run(tmp_path / "ds", tmp_path / "store")
    again = _run(tmp_path / "ds", tmp_path / "store")
    assert again.series_written == 0 and again.series == 4


def test_acdc_label_names_give_complete_sax_labels(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds", labels={"background": 0, "RV": 1, "MYO": 2, "LV": 3}, cases_csv=False)
    summary = _run(tmp_path / "ds", tmp_path / "store")
    store = LocalStore.open(tmp_path / "store")
    assert summary.subjects == 4  # no cases.csv: one subject per case
    assert all(r.labeled_frames and not r.partial_labels for r in store.records())
    mask = store.load_mask(store.records()[0].key)
    assert MASK_VALUES["rv_blood"] in np.unique(mask)  # file value 1 is the RV in ACDC naming


def test_unknown_label_name_names_the_fix(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds", labels={"background": 0, "cavity": 1})
    with pytest.raises(IntakeError, match="--label-map 'cavity=<structure>'"):
        read_dataset(tmp_path / "ds")
    dataset = read_dataset(tmp_path / "ds", parse_label_map(["cavity=lv_blood"]))
    assert dataset.values == {1: "lv_blood"}


def test_label_map_rejects_unknown_structures() -> None:
    with pytest.raises(IntakeError, match="NAME=structure"):
        parse_label_map(["LV=left_ventricle"])


def test_patients_and_groups_can_be_selected(tmp_path: Path) -> None:
    _dataset(tmp_path / "ds")
    only_normal = _run(tmp_path / "ds", tmp_path / "a", groups=frozenset({"normal"}))
    assert only_normal.subjects == 2 and only_normal.series == 2
    assert only_normal.skipped == {"patient_not_selected": 4}
    without = _run(tmp_path / "ds", tmp_path / "b", exclude_patients=frozenset({"MRN123456"}))
    assert without.subjects == 2 and without.series == 2
