"""De-identification: no planted PHI value anywhere in the store's bytes, the summary or the logs."""

from __future__ import annotations

import logging
import stat

import pytest

from dicom_factory import (
    PHI,
    UID_ROOT,
    ingest_dicom,
    write_bad_file,
    write_cine_series,
    write_enhanced_series,
    write_label_folder,
)
from typer.testing import CliRunner

from client.cli import app
from client.intake.deid import Pseudonymiser, load_or_create_secret
from client.store import LocalStore


def _export_with_phi(root):
    """Cine + enhanced series, label files, and bad files (one quoting a name), under a PHI folder."""
    export = root / "export" / PHI["folder"]
    cine = write_cine_series(export / "cine", seed=11, slices=3, phases=4)
    enhanced = write_enhanced_series(export / "enhanced.dcm")
    labels = root / "labels"
    write_label_folder(labels, cine, labeled_phases=(0, 2),
                       landmarks={(1, 0): {"rv_insertion_anterior": (10.0, 12.5)}})
    write_bad_file("not_dicom_text", export / "notes.txt")
    write_bad_file("missing_geometry", export / "broken")
    write_bad_file("burned_in_annotation", export / "screenshot")
    return root / "export", labels, cine, enhanced


def _store_bytes(store):
    return {path: path.read_bytes().lower() for path in store.rglob("*") if path.is_file()}


@pytest.mark.reliability(16)
def test_planted_phi_never_reaches_store_summary_logs_or_console(tmp_path, caplog, recwarn):
    # Prepare
    export, labels, cine, enhanced = _export_with_phi(tmp_path)
    store = tmp_path / "store"
    caplog.set_level(logging.DEBUG)

    # Execute: through the command line, to capture what an operator sees
    result = CliRunner().invoke(app, ["ingest", str(export), "--out", str(store), "--labels",
                                      str(labels), "data.crop_px=32", "data.spacing_mm=1.0"])

    # Assert: the run worked and labels arrived ...
    assert result.exit_code == 0, result.output
    records = LocalStore.open(store).records()
    assert len(records) == 2 and any(r.mask and r.landmarks for r in records)
    # ... and no planted value, original UID or folder name is in any byte of the store
    needles = {name: value.lower().encode() for name, value in PHI.items()}
    needles["uid_root"] = UID_ROOT.encode()
    haystacks = _store_bytes(store)
    haystacks["console"] = result.output.lower().encode()
    haystacks["logs"] = caplog.text.lower().encode()
    haystacks["warnings"] = " ".join(str(w.message) for w in recwarn).lower().encode()
    leaks = [(str(where), name) for where, data in haystacks.items()
             for name, needle in needles.items() if needle in data]
    assert leaks == []
    assert (store / "ingest-summary.json") in haystacks
    # Positive control: the same search finds every planted value in the export itself
    export_bytes = b"".join(p.read_bytes().lower() for p in export.rglob("*") if p.is_file())
    export_bytes += str(sorted(export.rglob("*"))).lower().encode()
    assert [name for name, needle in needles.items() if needle not in export_bytes] == []


def test_secret_is_private_and_uid_mapping_is_consistent(tmp_path):
    # Prepare
    write_cine_series(tmp_path / "export", seed=2, slices=2, phases=2, rows=16, cols=16)
    summary = ingest_dicom(tmp_path / "export", tmp_path / "store", crop_px=16)

    # Execute: map the same hospital UIDs again from the persisted secret
    secret = load_or_create_secret(tmp_path / "store")
    first, second = Pseudonymiser(secret), Pseudonymiser(secret)

    # Assert
    mode = stat.S_IMODE((tmp_path / "store" / "intake" / "secret").stat().st_mode)
    assert mode == 0o600
    assert first.uid(UID_ROOT + ".1.1") == second.uid(UID_ROOT + ".1.1")
    assert first.uid(UID_ROOT + ".1.1") != first.uid(UID_ROOT + ".1.2")
    assert first.uid(UID_ROOT + ".1.1").startswith("2.")  # dicognito's UID root
    assert first.subject(PHI["PatientID"], "") == LocalStore.open(tmp_path / "store").records()[0].subject
    assert summary.subjects == 1


def test_skipped_list_stays_outside_the_store(tmp_path):
    # Prepare
    export, _, _, _ = _export_with_phi(tmp_path)
    store = tmp_path / "store"

    # Execute
    inside = CliRunner().invoke(app, ["ingest", str(export), "--out", str(store),
                                      "--skipped-list", str(store / "skipped.csv")])
    outside = CliRunner().invoke(app, ["ingest", str(export), "--out", str(store),
                                       "--skipped-list", str(tmp_path / "skipped.csv")])

    # Assert: refused inside the store (paths may name patients), written outside
    assert inside.exit_code == 2 and "outside the store" in inside.output
    assert outside.exit_code == 0
    listed = (tmp_path / "skipped.csv").read_text()
    assert "burned_in_annotation" in listed and "not_dicom" in listed
    assert not (store / "skipped.csv").exists()
