"""Why a file or a series stayed out of the store: fixed codes, never text from a header.

Every skip in an ingest is counted under one of these codes (per file; a series that fails
quality control counts each of its files). Exception messages are never shown or logged: pydicom
quotes header values in them.
"""

from __future__ import annotations

# File-level reasons (decided while reading one file).
FILE_REASONS: dict[str, str] = {
    "unreadable_file": "the file could not be opened or read (permissions, I/O error)",
    "file_too_large": "the file is larger than the intake's per-file limit",
    "not_dicom": "no DICOM Part 10 header (no 'DICM' at byte 128)",
    "truncated": "the file ends before the content its header declares",
    "unreadable_header": "the header does not parse as DICOM",
    "nested_too_deep": "sequences nested deeper than the intake follows",
    "not_mr": "Modality is not MR",
    "unsupported_sop_class": "not an MR image SOP class (MR, Enhanced MR, Legacy Converted)",
    "burned_in_annotation": "BurnedInAnnotation is YES: text may be burned into the pixels",
    "no_pixel_data": "the instance holds no pixel data",
    "missing_uid": "StudyInstanceUID or SeriesInstanceUID is missing",
    "missing_geometry": "ImagePositionPatient, ImageOrientationPatient or PixelSpacing "
                        "missing or invalid",
    "unsupported_pixel_format": "not one grey sample per pixel (colour, float or odd bit depth)",
    "absurd_dimensions": "Rows x Columns x NumberOfFrames x BitsAllocated is zero or over the limit",
    "no_decoder": "no decoder exists for the transfer syntax (e.g. JPEG XL, MPEG video)",
    "undecodable_pixels": "the pixel data could not be decoded",
    "duplicate_instance": "the same SOP instance appears more than once in the export",
    "worker_crashed": "the reading process died on this file",
    "read_timeout": "reading this file took longer than the limit (a decoder stuck on it)",
    "unexpected_error": "an error the intake did not anticipate (please report the count)",
}

# Series-level reasons (quality control of a whole series; every file of it is counted).
SERIES_REASONS: dict[str, str] = {
    "inconsistent_orientation": "frames of the series do not share one ImageOrientationPatient",
    "inconsistent_spacing": "frames of the series differ in PixelSpacing or matrix size",
    "inconsistent_slice_spacing": "slice positions are unevenly spaced",
    "missing_slices": "a gap in the slice positions (a slice is missing)",
    "missing_phases": "slices have different numbers of cardiac phases",
    "ambiguous_frames": "two different images share one slice position and trigger time",
    "series_too_large": "more frames than the intake holds for one series",
}

REASONS: dict[str, str] = {**FILE_REASONS, **SERIES_REASONS}


class SkipFile(Exception):
    """A file the intake leaves out; ``reason`` is a code from :data:`FILE_REASONS`."""

    def __init__(self, reason: str) -> None:
        assert reason in FILE_REASONS, reason
        super().__init__(reason)
        self.reason = reason


class SkipSeries(Exception):
    """A series that fails quality control; ``reason`` is a code from :data:`SERIES_REASONS`."""

    def __init__(self, reason: str) -> None:
        assert reason in SERIES_REASONS, reason
        super().__init__(reason)
        self.reason = reason


# Reasons of the NIfTI dataset adapters (ACDC, M&Ms), per file.
ADAPTER_REASONS: dict[str, str] = {
    "unreadable_nifti": "the NIfTI file could not be read",
    "missing_image": "a case folder without its image volume",
    "unused_file": "a file the dataset layout does not use",
    "inconsistent_labels": "a ground-truth volume whose shape differs from its image",
    "unknown_label_values": "a label map holding values that dataset.json does not name",
    "patient_not_selected": "a case of a patient (or group) the ingest was told to leave out",
}
REASONS.update(ADAPTER_REASONS)
