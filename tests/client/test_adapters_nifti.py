"""ACDC / M&Ms-style NIfTI folders (generated here in those layouts) -> store with labels."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest

from client.intake.geometry import resample_image, resample_mask
from client.intake.pipeline import IngestOptions, ingest
from client.store import LocalStore, normalise_intensity
from shared_model.labels import MASK_VALUES

SHAPE = (20, 24, 3, 5)  # X (columns), Y (rows), Z, T
ZOOMS = (1.5, 1.25, 8.0, 1.0)  # column mm, row mm, slice mm, frame


def _volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 10, size=SHAPE).astype(np.float32)
    data[3:9, 14:20] += 500  # off-centre and not symmetric: a transposed read would show
    return data


def _labels_3d(z_phase_shift: int) -> np.ndarray:
    gt = np.zeros(SHAPE[:3], dtype=np.uint8)
    gt[3:9, 14:20] = 1
    gt[10:14, 4:8] = 2
    gt[15:18, 2 + z_phase_shift:6 + z_phase_shift] = 3
    return gt


def _save(path: Path, data: np.ndarray, zooms) -> None:
    image = nibabel.Nifti1Image(data, np.eye(4))
    image.header.set_zooms(zooms[:data.ndim])
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, str(path))


def _acdc(root: Path) -> dict[str, np.ndarray]:
    volumes = {}
    for i, group in ((1, "DCM"), (2, "RV")):
        code = f"patient{i:03d}"
        folder = root / "training" / code
        volumes[code] = _volume(i)
        _save(folder / f"{code}_4d.nii.gz", volumes[code], ZOOMS)
        _save(folder / f"{code}_frame01.nii.gz", volumes[code][..., 0], ZOOMS)
        _save(folder / f"{code}_frame03.nii.gz", volumes[code][..., 2], ZOOMS)
        _save(folder / f"{code}_frame01_gt.nii.gz", _labels_3d(0), ZOOMS)
        _save(folder / f"{code}_frame03_gt.nii.gz", _labels_3d(1), ZOOMS)
        (folder / "Info.cfg").write_text(f"ED: 1\nES: 3\nGroup: {group}\nHeight: 180\nNbFrame: 5\nWeight: 80\n")
    (root / "training" / "MANDATORY_CITATION.md").write_text("cite ACDC\n")
    return volumes


def _mnms(root: Path) -> dict[str, np.ndarray]:
    volumes = {}
    rows = ["External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight"]
    for i, (code, pathology) in enumerate((("A1B2C3", "HCM"), ("D4E5F6", "HHD"))):
        volumes[code] = _volume(10 + i)
        gt = np.zeros(SHAPE, dtype=np.uint8)
        gt[..., 0] = _labels_3d(0)
        gt[..., 3] = _labels_3d(1)
        _save(root / "Training" / code / f"{code}_sa.nii.gz", volumes[code], ZOOMS)
        _save(root / "Training" / code / f"{code}_sa_gt.nii.gz", gt, ZOOMS)
        rows.append(f"{code},Siemens,A,1,0,3,57,{pathology},M,170,70")
    (root / "mnms_info.csv").write_text("\n".join(rows) + "\n")
    return volumes


def _run(src: Path, store: Path, fmt: str):
    return ingest(IngestOptions(src=src, store=store, spacing_mm=1.0, crop_px=32,
                                progress=False), fmt)


def _expected_images(volume: np.ndarray) -> np.ndarray:
    return np.stack([[normalise_intensity(resample_image(volume[:, :, z, t].T, (1.25, 1.5), 32, 1.0))
                      for t in range(SHAPE[3])] for z in range(SHAPE[2])]).astype(np.float16)


def test_acdc_folder(tmp_path):
    # Prepare
    volumes = _acdc(tmp_path / "acdc")

    # Execute
    summary = _run(tmp_path / "acdc", tmp_path / "store", "acdc")

    # Assert: images oriented as data[col, row], labels mapped 1 RV / 2 MYO / 3 LV
    store = LocalStore.open(tmp_path / "store")
    assert (summary.series, summary.files_accepted, summary.skipped) == (2, 12, {"unused_file": 1})
    diseases = sorted(store.subject_labels("disease").values())
    assert diseases == ["ARV", "DCM"]
    for record in store.records():
        assert (record.info["ed_phase"], record.info["es_phase"]) == (0, 2)
        assert record.labeled_frames == [[s, t] for s in range(3) for t in (0, 2)]
        assert record.classes == {"sequence": "cine", "view": "sax"}
        mask = store.load_mask(record.key)
        lut = np.array([0, MASK_VALUES["rv_blood"], MASK_VALUES["lv_myo"], MASK_VALUES["lv_blood"]], np.uint8)
        expected = resample_mask(lut[_labels_3d(1)[:, :, 1].T], (1.25, 1.5), 32, 1.0)
        np.testing.assert_array_equal(mask[1, 2], expected)
        assert not mask[:, 1].any()
    stored = sorted(store.load(r.key).tobytes() for r in store.records())
    assert stored == sorted(_expected_images(v).tobytes() for v in volumes.values())


def test_mnms_folder_and_idempotent_rerun(tmp_path):
    # Prepare
    _mnms(tmp_path / "mnms")
    first = _run(tmp_path / "mnms", tmp_path / "store", "mnms")
    manifest = (tmp_path / "store" / "manifest.json").read_bytes()

    # Execute
    second = _run(tmp_path / "mnms", tmp_path / "store", "mnms")

    # Assert: 1 LV / 2 MYO / 3 RV; vendor kept as a vocabulary label; HHD is not an ACDC class
    store = LocalStore.open(tmp_path / "store")
    assert (first.series, first.files_accepted, first.skipped) == (2, 5, {})
    assert (second.series_written, second.files_read) == (0, 0)
    assert (tmp_path / "store" / "manifest.json").read_bytes() == manifest
    assert list(store.subject_labels("disease").values()) == ["HCM"]
    record = store.records()[0]
    assert record.info["vendor"] == "siemens" and (record.info["ed_phase"], record.info["es_phase"]) == (0, 3)
    mask = store.load_mask(record.key)
    lut = np.array([0, MASK_VALUES["lv_blood"], MASK_VALUES["lv_myo"], MASK_VALUES["rv_blood"]], np.uint8)
    np.testing.assert_array_equal(mask[0, 0], resample_mask(lut[_labels_3d(0)[:, :, 0].T], (1.25, 1.5), 32, 1.0))


@pytest.mark.parametrize("fmt", ["acdc", "mnms"])
def test_unreadable_volume_is_skipped_and_others_stored(tmp_path, fmt):
    # Prepare: one case's image replaced by garbage
    if fmt == "acdc":
        _acdc(tmp_path / "src")
        broken = tmp_path / "src" / "training" / "patient002" / "patient002_4d.nii.gz"
    else:
        _mnms(tmp_path / "src")
        broken = tmp_path / "src" / "Training" / "D4E5F6" / "D4E5F6_sa.nii.gz"
    broken.write_bytes(b"not a nifti volume")

    # Execute
    summary = _run(tmp_path / "src", tmp_path / "store", fmt)

    # Assert
    assert summary.series == 1
    assert summary.skipped.get("unreadable_nifti", 0) >= 1
