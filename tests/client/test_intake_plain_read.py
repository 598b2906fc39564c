"""The fast header parse (plain_dicom) reads exactly what dcmread reads, or leaves the file to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import BAD_KINDS, write_bad_file, write_cine_series, write_enhanced_series
from pydicom.dataelem import RawDataElement
from pydicom.uid import ImplicitVRLittleEndian

from client.intake import plain_dicom, reading
from client.intake.deid import quiet_pydicom
from client.intake.plain_dicom import read_plain

SUNNYBROOK = Path(__file__).resolve().parents[3] / "shared" / "data" / "sunnybrook" / "dicoms"
SECRET = "cd" * 32


def _read_all(paths: list[Path], root: Path, plain: bool, monkeypatch) -> list:
    """InstanceResults of ``paths``, with or without the fast parse."""
    settings = reading.ReadSettings(spacing_mm=1.0, crop_px=24, secret=SECRET, scan_root=str(root))
    with monkeypatch.context() as patch:
        if not plain:
            patch.setattr(reading, "read_plain", lambda data: None)
        reader = reading.InstanceReader(settings)
        with quiet_pydicom():
            return [reader.read(i, path) for i, path in enumerate(paths)]


def _same(a: reading.InstanceResult, b: reading.InstanceResult) -> None:
    frames_a, frames_b = a.frames, b.frames
    assert dataclasses.replace(a, frames=[]) == dataclasses.replace(b, frames=[])
    assert len(frames_a) == len(frames_b)
    for fa, fb in zip(frames_a, frames_b):
        np.testing.assert_array_equal(fa.image, fb.image)
        assert dataclasses.replace(fa, image=None) == dataclasses.replace(fb, image=None)


def _odd_files(folder: Path) -> list[Path]:
    """Readable files that are not plain: dcmread must take them."""
    truth = write_cine_series(folder / "implicit", seed=4, slices=1, phases=2, rows=12, cols=12)
    implicit = truth.files[0]
    ds = pydicom.dcmread(implicit)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(implicit, enforce_file_format=True)
    trailing = truth.files[1]
    trailing.write_bytes(trailing.read_bytes() + b"\x00\x01\x02")  # a few stray bytes at the end
    return [implicit, trailing]


def test_plain_and_dcmread_give_identical_results(tmp_path, monkeypatch):
    # Prepare: single-frame and enhanced series, every bad kind, files only dcmread can take
    export = tmp_path / "export"
    cine = write_cine_series(export / "cine", seed=2, slices=2, phases=3, rows=20, cols=18)
    enhanced = write_enhanced_series(export / "enhanced" / "file", slices=2, phases=2)
    bad = [write_bad_file(kind, export / "bad" / kind) for kind in BAD_KINDS]
    odd = _odd_files(export / "odd")
    paths = [*cine.files, *enhanced.files, *bad, *odd]

    # Execute
    fast = _read_all(paths, export, True, monkeypatch)
    slow = _read_all(paths, export, False, monkeypatch)

    # Assert: the same result for every file, and the fast parse did take the plain ones
    for a, b in zip(fast, slow):
        _same(a, b)
    assert [r.reason for r in fast[:len(cine.files) + 1]] == [""] * (len(cine.files) + 1)
    assert {r.reason for r in fast[len(cine.files) + 1:-2]} == set(BAD_KINDS.values())
    for path in [*cine.files, *enhanced.files]:
        assert read_plain(path.read_bytes()) is not None
    for path in [*odd, export / "bad" / "truncated_pixels", export / "bad" / "deeply_nested"]:
        assert read_plain(path.read_bytes()) is None


def test_plain_parse_keeps_every_element_as_dcmread_reads_it(tmp_path):
    # Prepare
    truth = write_cine_series(tmp_path, seed=5, slices=1, phases=1, rows=8, cols=8)
    data = truth.files[0].read_bytes()

    # Execute
    with quiet_pydicom():
        plain = read_plain(data)
        reference = pydicom.dcmread(truth.files[0])

    # Assert: the same elements, raw as read (body) and converted (body and file meta)
    assert list(plain.keys()) == list(reference.keys())
    for tag in reference.keys():
        ours, theirs = plain.get_item(tag), reference.get_item(tag)
        assert (ours.VR, ours.length, ours.value, ours.value_tell) == \
            (theirs.VR, theirs.length, theirs.value, theirs.value_tell), tag
    for ours, theirs in ((plain, reference), (plain.file_meta, reference.file_meta)):
        assert list(ours.keys()) == list(theirs.keys())
        assert all(ours[tag].value == theirs[tag].value for tag in theirs.keys())


@pytest.mark.skipif(not SUNNYBROOK.is_dir(), reason="Sunnybrook data folder not present")
def test_plain_and_dcmread_agree_on_real_scanner_files(tmp_path, monkeypatch):
    # Prepare: a few real GE files
    paths = sorted(SUNNYBROOK.rglob("*.dcm"))[::70]

    # Execute
    fast = _read_all(paths, SUNNYBROOK, True, monkeypatch)
    slow = _read_all(paths, SUNNYBROOK, False, monkeypatch)

    # Assert
    assert all(read_plain(p.read_bytes()) is not None for p in paths)
    for a, b in zip(fast, slow):
        assert a.reason == ""
        _same(a, b)


def test_fast_records_are_the_ones_pydicom_builds(tmp_path, monkeypatch):
    # Prepare: a file parsed with the tuple-built records and with RawDataElement's constructor
    truth = write_cine_series(tmp_path, seed=6, slices=1, phases=1, rows=8, cols=8)
    data = truth.files[0].read_bytes()
    fast = read_plain(data)
    monkeypatch.setattr(plain_dicom, "_record", plain_dicom._record_any)

    # Execute
    built = read_plain(data)

    # Assert: this pydicom's record has the fields the fast path fills, and every field agrees
    assert plain_dicom._record_fast is not plain_dicom._record_any
    assert RawDataElement._fields == plain_dicom._FIELDS
    for ours, theirs in ((fast, built), (fast.file_meta, built.file_meta)):
        assert list(ours.keys()) == list(theirs.keys())
        for tag in theirs.keys():
            a, b = ours.get_item(tag), theirs.get_item(tag)
            assert type(a) is type(b), tag
            if isinstance(b, RawDataElement):  # the meta's first element is converted on reading
                assert a._asdict() == b._asdict(), tag
            else:
                assert (a.VR, a.value) == (b.VR, b.value), tag
