"""The intake's raw pixel reader gives pydicom's stored values, and its numbers pydicom's too."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from client.intake import reading
from client.intake.deid import quiet_pydicom
from client.store import _tail_statistics, intensity_window

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def _write(path, *, bits, stored, signed, frames=1, syntax=ExplicitVRLittleEndian,
           photometric="MONOCHROME2", slope=None, intercept=None, seed=0):
    """An MR file whose stored values fill the declared bits, with junk above the high bit."""
    rng = np.random.default_rng(seed)
    rows, cols = 7, 5
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    values = rng.integers(lo, hi, size=(frames, rows, cols), endpoint=True, dtype=np.int64)
    container = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    words = values.astype(container).view(f"<u{bits // 8}")
    if stored < bits:  # a real scanner may leave anything above BitsStored
        junk = rng.integers(0, 1 << (bits - stored), size=words.shape).astype(words.dtype)
        words = (words & ((1 << stored) - 1)) | (junk << stored).astype(words.dtype)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MR_IMAGE, "1.2.3.4", "MR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = words.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


CASES = [  # bits allocated, bits stored, signed, frames, transfer syntax
    (8, 8, False, 1, ExplicitVRLittleEndian),
    (8, 8, True, 1, ExplicitVRLittleEndian),
    (8, 6, False, 2, ExplicitVRLittleEndian),
    (16, 16, False, 1, ExplicitVRLittleEndian),
    (16, 16, True, 1, ExplicitVRLittleEndian),
    (16, 12, False, 3, ExplicitVRLittleEndian),
    (16, 12, True, 3, ExplicitVRLittleEndian),
    (16, 12, True, 1, ImplicitVRLittleEndian),
    (32, 32, False, 1, ExplicitVRLittleEndian),
    (32, 24, True, 2, ExplicitVRLittleEndian),
]


@pytest.mark.parametrize(("bits", "stored", "signed", "frames", "syntax"), CASES)
def test_raw_pixel_bytes_give_pydicoms_stored_values(tmp_path, bits, stored, signed, frames, syntax):
    # Prepare
    path = _write(tmp_path / "image.dcm", bits=bits, stored=stored, signed=signed, frames=frames,
                  syntax=syntax)
    settings = reading.ReadSettings(spacing_mm=1.0, crop_px=16, secret="0" * 64)

    # Execute: the intake's reader on a deferred-read dataset, pydicom on a plain one
    with quiet_pydicom():
        ds = pydicom.dcmread(path, defer_size=reading.DEFER_SIZE)
        ours = reading._pixels(ds, reading._pixel_layout(ds, settings))
        reference = pydicom.dcmread(path).pixel_array.reshape(frames, 7, 5)

    # Assert: the same numbers, whatever lies above the high bit
    np.testing.assert_array_equal(ours, reference)
    assert ours.dtype == reference.dtype


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, 0.0), (2.5, -1024.0), (0.0125, 3.5)])
def test_rescaled_frames_match_pydicoms_modality_lut(tmp_path, slope, intercept):
    # Prepare: 12-bit signed values with a rescale, read the way the intake reads a frame
    path = _write(tmp_path / "image.dcm", bits=16, stored=12, signed=True, slope=slope,
                  intercept=intercept)
    settings = reading.ReadSettings(spacing_mm=1.0, crop_px=16, secret="0" * 64)

    # Execute
    with quiet_pydicom():
        ds = pydicom.dcmread(path, defer_size=reading.DEFER_SIZE)
        raw = reading._pixels(ds, reading._pixel_layout(ds, settings))[0]
        (geometry,) = reading._classic_geometry(ds, 1)
        plain = pydicom.dcmread(path)
        reference = apply_modality_lut(plain.pixel_array, plain)

    # Assert: float32 arithmetic of the intake within float32 rounding of pydicom's float64
    ours = raw.astype(np.float32) * np.float32(geometry.slope) + np.float32(geometry.intercept)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-3)


def test_monochrome1_is_inverted_against_pydicoms_values(tmp_path):
    # Prepare
    path = _write(tmp_path / "image.dcm", bits=16, stored=12, signed=False,
                  photometric="MONOCHROME1")
    settings = reading.ReadSettings(spacing_mm=1.0, crop_px=16, secret="0" * 64)

    # Execute
    with quiet_pydicom():
        ds = pydicom.dcmread(path, defer_size=reading.DEFER_SIZE)
        ours = reading._pixels(ds, reading._pixel_layout(ds, settings))
        stored = pydicom.dcmread(path).pixel_array

    # Assert: bright means signal
    np.testing.assert_array_equal(ours[0], stored.max() - stored.astype(np.float32))


@pytest.mark.parametrize("size", [1, 2, 63, 64, 65, 1000, 16384, 300_001])
def test_intensity_window_equals_a_full_sort(size):
    # Prepare: ties, negative values and an infinity among ordinary values
    rng = np.random.default_rng(size)
    image = rng.integers(-50, 50, size=size).astype(np.float32) * 0.37
    if size > 100:
        image[rng.integers(0, size, 3)] = np.inf

    # Execute
    lo, hi = intensity_window(image)

    # Assert: exactly the linear-rule percentiles of the sorted values (the old implementation)
    ordered = np.sort(image)
    position = np.array([0.01, 0.99]) * (size - 1)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, size - 1)
    expected = ordered[below] + (ordered[above] - ordered[below]) * (position - below)
    assert (lo, hi) == (float(expected[0]), float(expected[1]))


@pytest.mark.parametrize("misleading", [False, True])
def test_intensity_window_from_the_tails_is_exact_and_falls_back_when_the_sample_misleads(misleading):
    # Prepare: a 128 x 128 frame; misleading: 40 of the values the strided sample sees are the
    # frame's only dark ones, so the sample's low threshold leaves fewer than 1 % below it
    rng = np.random.default_rng(1)
    image = (rng.normal(100, 30, size=128 * 128)).astype(np.float32)
    if misleading:
        image[:40 * 16:16] = -1e4
    ranks = (163, 164, 16218, 16219)  # 1st and 99th percentile ranks of 16384 values

    # Execute
    tails = _tail_statistics(image, ranks)
    lo, hi = intensity_window(image)

    # Assert: the tails alone give the sort's values, or None (and the fallback those values)
    ordered = np.sort(image)
    assert (tails is None) == misleading
    if tails is not None:
        assert [float(v) for v in tails] == [float(ordered[r]) for r in ranks]
    expected = np.percentile(image, [1, 99])
    assert (lo, hi) == pytest.approx(tuple(expected), rel=1e-6)
