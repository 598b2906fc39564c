"""The DICOM cohort keeps its contract: layout, headers, geometry, labels, PHI, determinism."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from shared_model.labels import DISEASES, LANDMARKS, MASK_VALUES, SEQUENCES, VIEWS
from sim.cli import app
from sim.cohort import CohortError, SubjectJob, write_cohort, write_subject
from sim.sites import site_profile, subjects_per_site
from sim.study import StudyOptions

SMALL = StudyOptions(cine_phases=5, perfusion_dynamics=4)
TINY = StudyOptions(cine_phases=3, max_sax_slices=3, perfusion_dynamics=2)
MR, ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"
CLASSIC_TAGS = ("Modality", "Manufacturer", "MagneticFieldStrength", "SeriesDescription",
                "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "SliceThickness", "SliceLocation", "TriggerTime", "CardiacNumberOfImages",
                "InstanceNumber", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                "FrameOfReferenceUID", "PatientName", "PatientID", "PatientBirthDate",
                "InstitutionName", "RequestAttributesSequence", "OtherPatientIDsSequence")
LV, MYO, RV = MASK_VALUES["lv_blood"], MASK_VALUES["lv_myo"], MASK_VALUES["rv_blood"]


@dataclass
class Frame:
    """One 2-D frame read back from the export, wherever it was stored."""

    sop_uid: str
    number: int | None  # 1-based frame of an Enhanced instance
    position: np.ndarray
    orientation: np.ndarray
    trigger_ms: float
    temporal: int
    pixels: np.ndarray  # real-world values (rescale applied)
    header: pydicom.Dataset


def _frames_of(ds: pydicom.Dataset) -> list[Frame]:
    pixels = ds.pixel_array.astype(np.float64)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        real = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        return [Frame(ds.SOPInstanceUID, None, np.array(ds.ImagePositionPatient, float),
                      np.array(ds.ImageOrientationPatient, float), float(ds.TriggerTime),
                      int(ds.get("TemporalPositionIdentifier", 0)), real, ds)]
    shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    frames = []
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frames.append(Frame(
            ds.SOPInstanceUID, i + 1,
            np.array(group.PlanePositionSequence[0].ImagePositionPatient, float),
            np.array(group.PlaneOrientationSequence[0].ImageOrientationPatient, float),
            float(group.CardiacSynchronizationSequence[0].NominalCardiacTriggerDelayTime),
            int(group.FrameContentSequence[0].TemporalPositionIndex),
            pixels[i] * float(shared.RescaleSlope) + float(shared.RescaleIntercept), ds))
    return frames


@dataclass
class Site:
    root: Path
    files: list[Path]
    series: dict[str, list[Frame]]  # SeriesInstanceUID -> frames
    rows: list[dict[str, str]]  # series.csv
    studies: dict[str, str]
    landmarks: list[dict[str, str]]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _read_site(root: Path) -> Site:
    files = sorted(p for p in (root / "dicom").rglob("*") if p.is_file())
    series: dict[str, list[Frame]] = defaultdict(list)
    for path in files:
        ds = pydicom.dcmread(path)
        series[ds.SeriesInstanceUID].extend(_frames_of(ds))
    studies = {r["StudyInstanceUID"]: r["disease"] for r in _csv(root / "labels/studies.csv")}
    return Site(root, files, dict(series), _csv(root / "labels/series.csv"), studies,
                _csv(root / "labels/landmarks.csv"))


def _normal(frame: Frame) -> np.ndarray:
    return np.cross(frame.orientation[:3], frame.orientation[3:])


def _grid(frames: list[Frame]) -> tuple[list[float], list[float], dict]:
    """Slice positions along the normal and trigger times (sorted), and frames by (k, t)."""
    n = _normal(frames[0])
    positions = sorted({round(float(f.position @ n), 3) for f in frames})
    triggers = sorted({f.trigger_ms for f in frames})
    grid = {(positions.index(round(float(f.position @ n), 3)), triggers.index(f.trigger_ms)): f
            for f in frames}
    return positions, triggers, grid


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[Site]]:
    out = tmp_path_factory.mktemp("cohort")
    summary = write_cohort(out, 3, 1, seed=7, options=SMALL)
    return out, summary, [_read_site(out / f"site-{i}") for i in range(3)]


def test_cohort_writes_the_documented_layout(cohort) -> None:
    out, summary, sites = cohort
    on_disk = json.loads((out / "cohort.json").read_text())
    assert on_disk == summary and on_disk["format"] == "fedcmr-cohort" and on_disk["version"] == 1
    assert on_disk["seed"] == 7 and [s["name"] for s in on_disk["sites"]] == ["site-0", "site-1",
                                                                            "site-2"]
    for entry, site in zip(on_disk["sites"], sites):
        keys = {"vendor", "field_strength_t", "pixel_spacing_mm", "subjects", "disease_mix"}
        assert keys <= set(entry)
        assert entry["subjects"] == len(site.studies) == 1
        assert set(site.studies.values()) <= set(DISEASES)
        assert all(re.fullmatch(r"[0-9a-fA-F]{8,}", p.name) for p in site.files)  # hex, no suffix
        masks = {p.name for p in (site.root / "labels/masks").iterdir()}
        for row in site.rows:
            assert row["sequence"] in SEQUENCES and row["view"] in VIEWS
            assert row["StudyInstanceUID"] in site.studies
            assert row["SeriesInstanceUID"] in site.series
            assert (f"{row['SeriesInstanceUID']}.nii.gz" in masks) == bool(row["labeled_phases"])
            assert (row["lge_pathology"] != "") == (row["sequence"] == "lge")
        # every sequence but the localizer (the phantom acquires no scout)
        assert {r["sequence"] for r in site.rows} == set(SEQUENCES) - {"localizer"}
        assert {r["view"] for r in site.rows if r["sequence"] == "cine"} == set(VIEWS)
        assert len(site.rows) == len(site.series)


def test_every_file_is_an_mr_image_with_the_listed_tags(cohort) -> None:
    _, _, sites = cohort
    enhanced = 0
    for site in sites:
        for path in site.files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.Modality == "MR" and ds.BurnedInAnnotation == "NO"
            assert ds.SOPClassUID in (MR, ENHANCED_MR)
            if ds.SOPClassUID == MR:
                missing = [tag for tag in CLASSIC_TAGS if tag not in ds]
                assert not missing, f"{path}: missing {missing}"
                if path == site.files[0]:  # the fast writer writes what pydicom itself would
                    again = io.BytesIO()
                    ds.save_as(again, enforce_file_format=True)
                    assert again.getvalue() == path.read_bytes()
            else:
                enhanced += 1
                assert int(ds.NumberOfFrames) == len(ds.PerFrameFunctionalGroupsSequence) > 1
                assert "PixelMeasuresSequence" in ds.SharedFunctionalGroupsSequence[0]
    assert enhanced > 0  # the multi-frame path of the intake gets exercised


def test_geometry_is_real_and_consistent_with_each_view(cohort) -> None:
    _, _, sites = cohort
    for site in sites:
        by_view = {(r["sequence"], r["view"]): site.series[r["SeriesInstanceUID"]]
                   for r in site.rows}
        normals = {view: _normal(by_view[("cine", view)][0]) for view in VIEWS}
        long_axis = np.cross(normals["4ch"], normals["2ch"])
        long_axis /= np.linalg.norm(long_axis)
        # SAX is perpendicular to the long axis shared by the long-axis views
        assert abs(abs(normals["sax"] @ long_axis) - 1) < 1e-3
        assert abs(normals["3ch"] @ long_axis) < 1e-3
        for row in site.rows:
            frames = site.series[row["SeriesInstanceUID"]]
            orientation = frames[0].orientation
            assert all(np.allclose(f.orientation, orientation, atol=1e-5) for f in frames)
            assert abs(orientation[:3] @ orientation[3:]) < 1e-5
            positions, _, _ = _grid(frames)
            header = frames[0].header
            if row["sequence"] in ("cine", "lge", "t2w") and row["view"] == "sax":
                spacing = float(header.get("SpacingBetweenSlices") or header.
                                SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].
                                SpacingBetweenSlices)
                assert np.allclose(np.diff(positions), spacing, atol=0.01)
                # in-plane offsets agree: slices are a straight stack along the normal
                n = _normal(frames[0])
                offsets = [f.position - (f.position @ n) * n for f in frames]
                assert np.allclose(offsets, offsets[0], atol=0.01)


def test_masks_align_with_the_images(cohort) -> None:
    _, _, sites = cohort
    for site in sites:
        for row in (r for r in site.rows if r["labeled_phases"]):
            frames = site.series[row["SeriesInstanceUID"]]
            positions, triggers, grid = _grid(frames)
            image = nib.load(site.root / "labels/masks" / f"{row['SeriesInstanceUID']}.nii.gz")
            data = np.asarray(image.dataobj)
            first = grid[(0, 0)]
            assert data.dtype == np.uint8
            assert data.shape == (first.pixels.shape[1], first.pixels.shape[0], len(positions),
                                  len(triggers))
            # the affine puts voxel (0, 0, k) at the k-th slice's ImagePositionPatient (RAS)
            for k in range(len(positions)):
                ras = image.affine @ np.array([0, 0, k, 1.0])
                assert np.allclose(ras[:3] * [-1, -1, 1], grid[(k, 0)].position, atol=0.01)
            labeled = [int(p) for p in row["labeled_phases"].split(";")]
            assert not data[..., [t for t in range(len(triggers)) if t not in labeled]].any()
            pixels = np.stack([np.stack([grid[(k, t)].pixels for k in range(len(positions))])
                               for t in labeled])  # (T, S, rows, cols)
            labels = np.transpose(data[..., labeled], (3, 2, 1, 0))
            blood, myo = pixels[labels == LV].mean(), pixels[labels == MYO].mean()
            if row["sequence"] in ("cine", "lge", "t1_map", "t2_map"):
                assert blood > 1.4 * myo, f"{row['sequence']} {row['view']}"


def test_map_pixels_are_realistic_milliseconds(cohort) -> None:
    _, summary, sites = cohort
    expected = {("t1_map", 1.5): ((900, 1100), (1450, 1750)),
                ("t1_map", 3.0): ((1100, 1300), (1750, 2050)),
                ("t2_map", 1.5): ((42, 53), (170, 270)), ("t2_map", 3.0): ((39, 50), (140, 230))}
    for entry, site in zip(summary["sites"], sites):
        for row in (r for r in site.rows if r["sequence"].endswith("_map")):
            frames = site.series[row["SeriesInstanceUID"]]
            positions, _, grid = _grid(frames)
            data = np.asarray(nib.load(site.root / "labels/masks" /
                                       f"{row['SeriesInstanceUID']}.nii.gz").dataobj)
            pixels = np.stack([grid[(k, 0)].pixels for k in range(len(positions))])
            labels = np.transpose(data[..., 0], (2, 1, 0))
            (myo_lo, myo_hi), (blood_lo, blood_hi) = expected[(row["sequence"],
                                                               entry["field_strength_t"])]
            assert myo_lo < np.median(pixels[labels == MYO]) < myo_hi
            assert blood_lo < np.median(pixels[labels == LV]) < blood_hi


def test_landmarks_point_at_their_structures(cohort) -> None:
    _, _, sites = cohort
    for site in sites:
        frames = {(f.sop_uid, "" if f.number is None else str(f.number)): (uid, f)
                  for uid, fs in site.series.items() for f in fs}
        masks = {}
        names = set()
        for mark in site.landmarks:
            uid, frame = frames[(mark["SOPInstanceUID"], mark["frame"])]
            names.add(mark["landmark"])
            if uid not in masks:
                path = site.root / "labels/masks" / f"{uid}.nii.gz"
                masks[uid] = (np.asarray(nib.load(path).dataobj), _grid(site.series[uid]))
            data, (positions, triggers, _) = masks[uid]
            k = positions.index(round(float(frame.position @ _normal(frame)), 3))
            labels = data[:, :, k, triggers.index(frame.trigger_ms)].T
            row, col = float(mark["row"]), float(mark["col"])
            rr, cc = np.mgrid[: labels.shape[0], : labels.shape[1]]
            near = set(np.unique(labels[(rr - row) ** 2 + (cc - col) ** 2 <= 4.0]).tolist())
            if mark["landmark"].startswith("rv_insertion"):
                assert {MYO, RV} <= near
            elif mark["landmark"].startswith("mitral_hinge"):
                assert {LV, MASK_VALUES["la_blood"]} <= near
            else:
                assert MYO in near
        assert names == set(LANDMARKS)


def test_planted_phi_is_really_in_the_headers(cohort) -> None:
    _, _, sites = cohort
    for index, site in enumerate(sites):
        planted = json.loads((site.root / "planted_phi.json").read_text())
        assert len(planted) >= 10 and all(len(v) >= 6 for v in planted)
        assert all(f"SITE{index}" in v for v in planted if not v.isdigit())
        blobs = [p.read_bytes() for p in site.files]
        for value in planted:
            assert all(value.encode() in blob for blob in blobs), value
        ds = pydicom.dcmread(site.files[0])
        assert str(ds.PatientName) in planted and ds.PatientBirthDate in planted
        assert ds.OtherPatientIDsSequence[0].PatientID in planted
        block = ds.private_block(0x0033, "FEDCMR SIM PHI")
        assert block[0x10].value in planted
        assert str(block[0x11].value[0].PatientName) in planted


def test_sites_differ_like_real_hospitals(cohort) -> None:
    _, summary, sites = cohort
    entries = summary["sites"]
    assert len({e["vendor"] for e in entries}) == 3
    assert {e["field_strength_t"] for e in entries} == {1.5, 3.0}
    assert len({e["pixel_spacing_mm"] for e in entries}) == 3
    assert len({json.dumps(e["disease_mix"], sort_keys=True) for e in entries}) == 3
    for entry, site in zip(entries, sites):
        ds = pydicom.dcmread(site.files[0])
        assert ds.Manufacturer == entry["vendor"]
        assert float(ds.MagneticFieldStrength) == entry["field_strength_t"]
    counts = subjects_per_site(4, 3, seed=0)
    assert sum(counts) == 12 and min(counts) >= 1 and len(set(counts)) > 1


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_cohort_other_seed_another(tmp_path: Path) -> None:
    # Prepare / Execute
    runs = [_snapshot(write_cohort(tmp_path / name, 1, 1, seed, TINY) and tmp_path / name)
            for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    # Assert: byte-identical files (pixels, UIDs, labels, names); another seed shares nothing
    assert runs[0] == runs[1]
    dicom = lambda run: {k: v for k, v in run.items() if "/dicom/" in k}  # noqa: E731
    assert not set(dicom(runs[0])) & set(dicom(runs[2]))
    assert runs[0]["site-0/labels/series.csv"] != runs[2]["site-0/labels/series.csv"]


def test_infarct_subject_has_scar_labels(tmp_path: Path) -> None:
    # Prepare / Execute
    result = write_subject(SubjectJob(tmp_path, 1, 0, 0, "MINF", TINY))
    # Assert
    lge = [r for r in result.series_rows if r["sequence"] == "lge"]
    assert len(lge) == 1 and lge[0]["lge_pathology"] == "scar" and lge[0]["labeled_phases"] == "0"
    data = np.asarray(nib.load(tmp_path / "site-0/labels/masks" /
                               f"{lge[0]['SeriesInstanceUID']}.nii.gz").dataobj)
    assert (data == MASK_VALUES["scar"]).any() and not (data == RV).any()
    cine = next(r for r in result.series_rows if r["sequence"] == "cine" and r["view"] == "sax")
    cine_data = nib.load(tmp_path / "site-0/labels/masks" / f"{cine['SeriesInstanceUID']}.nii.gz")
    assert not (np.asarray(cine_data.dataobj) == MASK_VALUES["scar"]).any()


def test_refuses_to_write_over_a_cohort(tmp_path: Path) -> None:
    write_cohort(tmp_path, 1, 1, 0, TINY)
    with pytest.raises(CohortError, match="already holds a cohort"):
        write_cohort(tmp_path, 1, 1, 0, TINY)
    write_cohort(tmp_path, 1, 1, 1, TINY, overwrite=True)
    assert json.loads((tmp_path / "cohort.json").read_text())["seed"] == 1


def test_cli_writes_a_cohort_and_reports_where(tmp_path: Path) -> None:
    # Execute
    runner = CliRunner()
    args = ["cohort", "--sites", "1", "--subjects-per-site", "1", "--out", str(tmp_path / "c"),
            "--seed", "2", "--phases", "3", "--workers", "1"]
    first = runner.invoke(app, args)
    again = runner.invoke(app, args)
    # Assert
    assert first.exit_code == 0, first.output
    assert str(tmp_path / "c") in first.output.replace("\n", "") and " s" in first.output
    assert (tmp_path / "c" / "cohort.json").exists()
    assert again.exit_code == 2 and "already holds a cohort" in again.output
    assert site_profile(0).vendor in first.output
