"""The real Sunnybrook studies: contours become LV blood-pool / myocardium masks in the store."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from client.adapters.sunnybrook import _series_labels, polygon_area, read_contour
from client.intake.deid import Pseudonymiser, load_or_create_secret, quiet_pydicom, series_key
from client.intake.label_files import LabelFileError
from client.intake.pipeline import IngestOptions, IntakeError, ingest
from client.store import LocalStore
from shared_model.labels import MASK_VALUES

SUNNYBROOK = Path(__file__).resolve().parents[3] / "shared" / "data" / "sunnybrook"
needs_data = pytest.mark.skipif(not (SUNNYBROOK / "link.csv").is_file(),
                                reason="Sunnybrook data folder not present")


@pytest.fixture(scope="module")
def sunnybrook_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("sunnybrook") / "store"
    summary = ingest(IngestOptions(src=SUNNYBROOK, store=store, spacing_mm=1.5, crop_px=128,
                                   progress=False), "sunnybrook")
    return LocalStore.open(store), summary


def _patients(store: LocalStore) -> dict[str, tuple[str, str, float]]:
    """patient folder -> (store key, contour folder, pixel spacing mm), via the store's secret."""
    pseudonymiser = Pseudonymiser(load_or_create_secret(store.root))
    out = {}
    with open(SUNNYBROOK / "link.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            first = next((SUNNYBROOK / "dicoms" / row["patient_id"]).iterdir())
            with quiet_pydicom():  # SCD's UIDs have leading zeros; pydicom warns, quoting them
                ds = pydicom.dcmread(first, stop_before_pixels=True)
                patient, series = str(ds.PatientID), str(ds.SeriesInstanceUID)
                spacing = float(ds.PixelSpacing[0])
            key = series_key(pseudonymiser.subject(patient, ""), pseudonymiser.uid(series))
            out[row["patient_id"]] = (key, row["original_id"], spacing)
    return out


@needs_data
def test_all_files_become_three_labelled_cine_sax_series(sunnybrook_store):
    # Prepare / Execute: the module fixture ingested the folder
    store, summary = sunnybrook_store

    # Assert
    assert (summary.files_seen, summary.files_accepted, summary.series, summary.skipped) == (700, 700, 3, {})
    for record in store.records():
        assert (record.sequence, record.view) == ("cine", "sax")  # from the headers' structure
        assert record.mask and record.labeled_frames and record.partial_labels
        assert set(record.info) >= {"ed_phase", "es_phase", "pixel_spacing_mm"}
    assert sorted(store.subject_labels("disease").values()) == ["MINF"] * 3


@needs_data
def test_lv_areas_are_plausible_and_larger_at_end_diastole(sunnybrook_store):
    # Prepare
    store, _ = sunnybrook_store
    pixel_mm2 = store.manifest.spacing_mm ** 2

    for record in store.records():
        # Execute: LV blood-pool area per slice at ED and ES, in mm²
        mask = store.load_mask(record.key)
        ed, es = record.info["ed_phase"], record.info["es_phase"]
        areas = [((mask[s, ed] == MASK_VALUES["lv_blood"]).sum() * pixel_mm2,
                  (mask[s, es] == MASK_VALUES["lv_blood"]).sum() * pixel_mm2)
                 for s in range(record.shape[0])]
        contoured = [(a_ed, a_es) for a_ed, a_es in areas if a_ed and a_es]

        # Assert: 50..6000 mm² (a 8..87 mm wide cavity), mid-ventricle 1000..4500 mm², ED > ES
        assert len(contoured) >= 9
        assert all(50 < a < 6000 for pair in contoured for a in pair)
        assert 1000 < float(np.median([a for a, _ in contoured])) < 4500
        assert all(a_ed > a_es for a_ed, a_es in contoured)
        # the myocardium is drawn on the ED frames only (complete), ES frames are partial
        assert all((mask[s, ed] == MASK_VALUES["lv_myo"]).any() for s, t in record.labeled_frames)
        assert all(names == ["lv_blood"] for names in record.partial_labels.values())


@needs_data
def test_store_areas_match_the_contour_polygons(sunnybrook_store):
    # Prepare: polygon areas straight from the contour files, in mm² with each study's spacing
    store, _ = sunnybrook_store
    for patient, (key, original, spacing) in _patients(store).items():
        contours = sorted((SUNNYBROOK / "contours" / original / "i-contours").glob("*.txt"))
        polygon_mm2 = sum(polygon_area(read_contour(p)) for p in contours) * spacing ** 2

        # Execute
        mask = store.load_mask(key)
        stored_mm2 = (mask == MASK_VALUES["lv_blood"]).sum() * store.manifest.spacing_mm ** 2

        # Assert: within 5 % (pixel-centre rasterisation and resampling to 1.5 mm)
        assert abs(stored_mm2 - polygon_mm2) / polygon_mm2 < 0.05, patient
    assert store.manifest.series[_patients(store)["SCD0000301"][0]].info["pixel_spacing_mm"] == [1.2891, 1.2891]


# ---------------------------------------------------------------- damaged input (no data needed)

def _sunnybrook_folder(root: Path, link_csv: str) -> Path:
    for name in ("dicoms", "contours"):
        (root / name).mkdir(parents=True)
    (root / "link.csv").write_text(link_csv)
    return root


@pytest.mark.parametrize("link_csv, fragment", [
    ("patient,original_id\nSCD0000101,SC-HF-I-10\n", "missing column.*patient_id"),
    ("patient_id,original_id\nSCD0000101\n", "line 2: no original_id"),
])
def test_damaged_link_csv_is_an_intake_error_naming_file_and_column(tmp_path, link_csv, fragment):
    # Prepare
    src = _sunnybrook_folder(tmp_path / "scd", link_csv)

    # Execute / Assert: the intake's own error (one line from the CLI), never KeyError
    with pytest.raises(IntakeError, match=fragment) as caught:
        ingest(IngestOptions(src=src, store=tmp_path / "store", spacing_mm=1.5, crop_px=32,
                             progress=False), "sunnybrook")
    assert str(src / "link.csv") in str(caught.value)


@pytest.mark.parametrize("text", ["12.5 abc\n1 2\n3 4\n", "1 2\n", ""])
def test_damaged_contour_file_is_a_label_file_error_naming_it(tmp_path, text):
    # Prepare
    path = tmp_path / "IM-0001-0048-icontour-manual.txt"
    path.write_text(text)

    # Execute / Assert
    with pytest.raises(LabelFileError, match="x y") as caught:
        read_contour(path)
    assert str(path) in str(caught.value)


def test_damaged_contour_costs_its_frame_and_is_counted(tmp_path):
    # Prepare: one slice, two phases; a good endocardium on phase 0, a damaged one on phase 1
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("2 2\n6 2\n6 6\n2 6\n")
    bad.write_text("2 2\nnot numbers\n")
    headers = {i: {"matrix": (8, 8), "geometry": SimpleNamespace(
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), position=np.zeros(3), trigger_ms=t, order=i)}
        for i, t in ((1, 0.0), (2, 40.0))}
    problems = Counter()

    # Execute
    labels = _series_labels(headers, {"i": {1: good, 2: bad}, "o": {}}, problems)

    # Assert: the good frame is labelled, the damaged one counted, the intake goes on
    assert problems["unreadable_contour"] == 1
    assert list(labels.partial) == [(0, 0)]
    assert (labels.mask_loader()[0, 1] == 0).all() and labels.mask_loader()[0, 0].any()


@needs_data
def test_sunnybrook_patients_can_be_left_out(tmp_path):
    options = IngestOptions(src=SUNNYBROOK, store=tmp_path / "store", spacing_mm=3.0, crop_px=32,
                            progress=False, exclude_patients=frozenset({"SCD0000301"}))
    summary = ingest(options, "sunnybrook")
    assert summary.subjects == 2 and summary.files_seen == 500
