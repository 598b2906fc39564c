"""Integration: the synthetic cohort's export (sim.cohort) through the intake, labels included."""

from __future__ import annotations

import json

import pytest

from client.store import LocalStore

cohort = pytest.importorskip("sim.cohort")


@pytest.mark.timeout(300)
@pytest.mark.reliability(16)
def test_synthetic_site_export_is_ingested_with_labels_and_no_phi(tmp_path):
    # Prepare: one site, one subject, shrunk protocol
    from dicom_factory import ingest_dicom

    cohort.write_cohort(tmp_path / "cohort", sites=1, subjects_per_site_mean=1, seed=3,
                        options=cohort.StudyOptions(cine_phases=8, max_sax_slices=4,
                                                    perfusion_dynamics=4))
    site = tmp_path / "cohort" / "site-0"

    # Execute
    summary = ingest_dicom(site / "dicom", tmp_path / "store", labels=site / "labels",
                           crop_px=96, spacing_mm=2.0)  # 192 mm: the whole heart

    # Assert: every file in a stored series; labels in; header labels agree with the truth
    store = LocalStore.open(tmp_path / "store")
    truth_rows = (site / "labels" / "series.csv").read_text().strip().splitlines()[1:]
    assert summary.skipped == {} and summary.files_accepted == summary.files_seen
    assert summary.series == len(truth_rows) and summary.label_problems == {}
    records = store.records()
    assert all(r.classes.get("sequence") for r in records)
    told = [r for r in records if r.sequence != "unknown"]
    assert len(told) >= len(records) - 1 and all(r.sequence == r.classes["sequence"] for r in told)
    assert any(r.mask and r.labeled_frames for r in records)
    assert any(r.landmarks for r in records)
    assert list(store.subject_labels("disease").values())
    planted = json.loads((site / "planted_phi.json").read_text())
    data = b"".join(p.read_bytes().lower() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert planted and [v for v in planted if v.lower().encode() in data] == []
