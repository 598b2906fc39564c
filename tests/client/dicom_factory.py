"""Small DICOM series for intake tests: real geometry tags, planted PHI, shuffled files.

Every series is a function of its seed. Images hold a bright disc whose radius changes with the
cardiac phase and whose centre moves with the slice, so each frame differs from every other.
PHI is planted everywhere a hospital export has it (names, IDs, dates, institution, device,
descriptions, a private tag, nested sequences, the folder name) and listed in :data:`PHI`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498.7777"  # distinctive: searched for in the store's bytes

# Values a de-identified store must never contain (searched as bytes, case-insensitive).
PHI: dict[str, str] = {
    "PatientName": "PLANTEDSURNAME^PLANTEDGIVEN",
    "PatientID": "PLANTEDID4711",
    "PatientBirthDate": "19450317",
    "StudyDate": "20231105",
    "AccessionNumber": "PLANTEDACC99",
    "InstitutionName": "PLANTED INSTITUTE OF CARDIOLOGY",
    "InstitutionAddress": "PLANTED STREET 12 CITYVILLE",
    "ReferringPhysicianName": "PLANTEDREFERRER^DOC",
    "OperatorsName": "PLANTEDOPERATOR",
    "StationName": "PLANTEDSTATION",
    "DeviceSerialNumber": "PLANTEDSERIAL881",
    "StudyDescription": "PLANTED STUDY DESCRIPTION",
    "private": "PLANTED-PRIVATE-VALUE",
    "nested": "PLANTED-NESTED-PROCEDURE",
    "other_id": "PLANTEDOTHERID",
    "folder": "PLANTEDFOLDER_SURNAME",
}


@dataclass
class SeriesTruth:
    """What a written series really is: frames in (slice, phase) order and its identifiers."""

    study_uid: str
    series_uid: str
    sop_uids: list[list[str]]  # [slice][phase] (one entry per frame; equal within an instance)
    frames: list[list[np.ndarray]]  # raw stored values, [slice][phase] (rows, cols)
    spacing: tuple[float, float]
    orientation: tuple[float, ...]
    files: list[Path] = field(default_factory=list)
    frame_numbers: list[list[int]] = field(default_factory=list)  # 1-based in enhanced files
    trigger_ms: list[float] = field(default_factory=list)


def uid(*parts: int) -> str:
    return ".".join([UID_ROOT, *(str(p) for p in parts)])


def oblique_orientation(seed: int) -> tuple[float, ...]:
    """Orthonormal row/column cosines of a seeded oblique plane (like a real SAX)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return tuple(float(round(v, 6)) for v in (*q[:, 0], *q[:, 1]))


def disc_frame(rows: int, cols: int, s: int, t: int, phases: int, seed: int) -> np.ndarray:
    """int16 frame: noise floor + a disc (radius by phase, centre by slice)."""
    rng = np.random.default_rng([seed, s, t])
    rr, cc = np.mgrid[0:rows, 0:cols]
    radius = rows * (0.18 + 0.12 * np.cos(2 * np.pi * t / max(phases, 1)) ** 2)
    centre = (rows / 2 + (s - 1) * 1.5, cols / 2 - (s - 1))
    image = 40 + rng.normal(0, 6, size=(rows, cols))
    image[(rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2] += 600 + 30 * s
    return np.clip(image, 0, 4000).astype(np.int16)


def _phi(ds: Dataset) -> None:
    ds.PatientName = PHI["PatientName"]
    ds.PatientID = PHI["PatientID"]
    ds.PatientBirthDate = PHI["PatientBirthDate"]
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = PHI["StudyDate"]
    ds.StudyTime = "101502"
    ds.AccessionNumber = PHI["AccessionNumber"]
    ds.InstitutionName = PHI["InstitutionName"]
    ds.InstitutionAddress = PHI["InstitutionAddress"]
    ds.ReferringPhysicianName = PHI["ReferringPhysicianName"]
    ds.OperatorsName = PHI["OperatorsName"]
    ds.StationName = PHI["StationName"]
    ds.DeviceSerialNumber = PHI["DeviceSerialNumber"]
    ds.StudyDescription = PHI["StudyDescription"]
    block = ds.private_block(0x0011, "PLANTED CREATOR", create=True)
    block.add_new(0x01, "LO", PHI["private"])
    request = Dataset()
    request.RequestedProcedureDescription = PHI["nested"]
    other = Dataset()
    other.PatientID = PHI["other_id"]
    request.OtherPatientIDsSequence = Sequence([other])
    ds.RequestAttributesSequence = Sequence([request])


def _file_meta(sop_class: str, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    return meta


def _image_module(ds: Dataset, rows: int, cols: int) -> None:
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1


def _common(ds: Dataset, study_uid: str, series_uid: str, description: str) -> None:
    ds.Modality = "MR"
    ds.Manufacturer = "Siemens Healthineers"
    ds.MagneticFieldStrength = "1.5"
    ds.ScanningSequence = "GR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = series_uid + ".9"
    ds.SeriesDescription = description
    ds.SeriesNumber = 7
    _phi(ds)


def write_cine_series(folder: Path, *, seed: int = 0, slices: int = 4, phases: int = 5,
                      rows: int = 32, cols: int = 32, spacing: tuple[float, float] = (1.25, 1.25),
                      gap_mm: float = 8.0, study: int = 1, series: int = 1,
                      description: str = "cine_SAX PLANTEDSERIESDESC",
                      drop: tuple[tuple[int, int], ...] = (), burned_in: bool = False,
                      instance_base: int = 0) -> SeriesTruth:
    """Single-frame MR files with random names (no extension) in ``folder``; returns the truth.

    InstanceNumbers are shuffled too, so only geometry (position along the normal, TriggerTime)
    gives the order. ``drop`` leaves out some (slice, phase) frames (for QC tests);
    ``instance_base`` shifts the SOP instance UIDs (two writes into one series).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    orientation = oblique_orientation(seed)
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([-60.0, 20.0, 35.0])
    study_uid, series_uid = uid(study), uid(study, series)
    truth = SeriesTruth(study_uid=study_uid, series_uid=series_uid, sop_uids=[], frames=[],
                        spacing=spacing, orientation=orientation,
                        trigger_ms=[round(30.0 + 45.0 * t, 2) for t in range(phases)])
    instance_numbers = rng.permutation(slices * phases) + 1
    for s in range(slices):
        truth.sop_uids.append([])
        truth.frames.append([])
        for t in range(phases):
            sop = uid(study, series, instance_base + s + 1, t + 1)
            frame = disc_frame(rows, cols, s, t, phases, seed)
            truth.sop_uids[-1].append(sop)
            truth.frames[-1].append(frame)
            if (s, t) in drop:
                continue
            ds = Dataset()
            ds.file_meta = _file_meta(MR_IMAGE, sop)
            ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, sop
            _common(ds, study_uid, series_uid, description)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.InstanceNumber = int(instance_numbers[s * phases + t])
            position = origin + s * gap_mm * normal
            ds.ImagePositionPatient = [round(float(v), 4) for v in position]
            ds.ImageOrientationPatient = list(orientation)
            ds.PixelSpacing = [spacing[0], spacing[1]]
            ds.SliceThickness = gap_mm
            ds.TriggerTime = truth.trigger_ms[t]
            ds.CardiacNumberOfImages = phases
            if burned_in:
                ds.BurnedInAnnotation = "YES"
            _image_module(ds, rows, cols)
            ds.PixelData = frame.tobytes()
            path = folder / f"{rng.integers(16**10):010x}"
            ds.save_as(path, enforce_file_format=True)
            truth.files.append(path)
    return truth


def _frame_item(position: np.ndarray, trigger: float, temporal: int) -> Dataset:
    item = Dataset()
    plane = Dataset()
    plane.ImagePositionPatient = [round(float(v), 4) for v in position]
    item.PlanePositionSequence = Sequence([plane])
    cardiac = Dataset()
    cardiac.NominalCardiacTriggerDelayTime = trigger
    item.CardiacSynchronizationSequence = Sequence([cardiac])
    content = Dataset()
    content.TemporalPositionIndex = temporal
    item.FrameContentSequence = Sequence([content])
    return item


def write_enhanced_series(path: Path, *, seed: int = 1, slices: int = 3, phases: int = 4,
                          rows: int = 24, cols: int = 28, spacing: tuple[float, float] = (1.4, 1.2),
                          gap_mm: float = 10.0, study: int = 2, series: int = 1,
                          description: str = "cine 4ch PLANTEDSERIESDESC") -> SeriesTruth:
    """One Enhanced MR Image Storage file, frames in shuffled order, per-frame functional groups."""
    rng = np.random.default_rng(seed)
    orientation = oblique_orientation(seed)
    normal = np.cross(orientation[:3], orientation[3:])
    study_uid, series_uid, sop = uid(study), uid(study, series), uid(study, series, 1)
    truth = SeriesTruth(study_uid=study_uid, series_uid=series_uid, sop_uids=[], frames=[],
                        spacing=spacing, orientation=orientation,
                        trigger_ms=[round(20.0 + 60.0 * t, 2) for t in range(phases)])
    order = rng.permutation(slices * phases)  # file frame k holds grid frame order[k]
    truth.frames = [[disc_frame(rows, cols, s, t, phases, seed) for t in range(phases)]
                    for s in range(slices)]
    truth.sop_uids = [[sop] * phases for _ in range(slices)]
    truth.frame_numbers = [[0] * phases for _ in range(slices)]
    items, pixels = [], []
    for k, flat in enumerate(order):
        s, t = divmod(int(flat), phases)
        truth.frame_numbers[s][t] = k + 1
        items.append(_frame_item(np.array([10.0, -5.0, 3.0]) + s * gap_mm * normal,
                                 truth.trigger_ms[t], t + 1))
        pixels.append(truth.frames[s][t])
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_MR, sop)
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, sop
    _common(ds, study_uid, series_uid, description)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(items)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [spacing[0], spacing[1]]
    measures.SliceThickness = gap_mm
    orient = Dataset()
    orient.ImageOrientationPatient = list(orientation)
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    _image_module(ds, rows, cols)
    ds.PixelData = np.stack(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    truth.files.append(path)
    return truth


# ---------------------------------------------------------------- bad input

def _valid_dataset(seed: int, sop_suffix: int) -> Dataset:
    frame = disc_frame(16, 16, 0, 0, 1, seed)
    sop = uid(90, seed, sop_suffix)
    ds = Dataset()
    ds.file_meta = _file_meta(MR_IMAGE, sop)
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, sop
    _common(ds, uid(90, seed), uid(90, seed, 1), "cine sax")
    ds.ImagePositionPatient = [0.0, 0.0, float(sop_suffix)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.5, 1.5]
    ds.TriggerTime = 0.0
    _image_module(ds, 16, 16)
    ds.PixelData = frame.tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _nested_bytes(depth: int) -> bytes:
    """An undefined-length sequence nested ``depth`` deep (explicit VR little endian)."""
    tag = struct.pack("<HH", 0x0040, 0x0275) + b"SQ" + b"\0\0" + struct.pack("<I", 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (tag + item) * depth + (item_end + seq_end) * depth


def write_bad_file(kind: str, path: Path, seed: int = 0) -> Path:
    """One bad file of ``kind`` (a key of :data:`BAD_KINDS`) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _valid_dataset(seed, 1)
    if kind == "truncated_pixels":
        _save(ds, path)
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "truncated_header":
        _save(ds, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "not_dicom_text":
        path.write_text("PatientName,PLANTEDSURNAME\nnot an image\n")
    elif kind == "not_dicom_empty":
        path.write_bytes(b"")
    elif kind == "not_dicom_random":
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
    elif kind == "no_pixel_data":
        del ds.PixelData
        _save(ds, path)
    elif kind == "missing_geometry":
        del ds.ImagePositionPatient
        _save(ds, path)
    elif kind == "no_decoder":  # MPEG-2 video: no pixel decoder for pydicom exists
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([b"\xff\xd8garbage\xff\xd9"])
        _save(ds, path)
    elif kind == "undecodable_pixels":  # RLE has a built-in decoder; these bytes are not RLE
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([b"\x00" * 7])
        _save(ds, path)
    elif kind == "absurd_dimensions":
        ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 5000
        _save(ds, path)
    elif kind == "deeply_nested":
        _save(ds, path)
        path.write_bytes(path.read_bytes() + _nested_bytes(5000))
    elif kind == "not_mr":
        ds.Modality = "CT"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        _save(ds, path)
    elif kind == "unsupported_sop_class":  # MR spectroscopy
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.2"
        _save(ds, path)
    elif kind == "burned_in_annotation":
        ds.BurnedInAnnotation = "YES"
        _save(ds, path)
    elif kind == "colour":
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelData = np.zeros((16, 16, 3), dtype=np.int16).tobytes()
        _save(ds, path)
    elif kind == "missing_uid":
        del ds.SeriesInstanceUID
        _save(ds, path)
    else:
        raise KeyError(kind)
    return path


# kind -> the skip reason the intake must report
BAD_KINDS: dict[str, str] = {
    "truncated_pixels": "truncated",
    "truncated_header": "truncated",
    "not_dicom_text": "not_dicom",
    "not_dicom_empty": "not_dicom",
    "not_dicom_random": "not_dicom",
    "no_pixel_data": "no_pixel_data",
    "missing_geometry": "missing_geometry",
    "no_decoder": "no_decoder",
    "undecodable_pixels": "undecodable_pixels",
    "absurd_dimensions": "absurd_dimensions",
    "deeply_nested": "nested_too_deep",
    "not_mr": "not_mr",
    "unsupported_sop_class": "unsupported_sop_class",
    "burned_in_annotation": "burned_in_annotation",
    "colour": "unsupported_pixel_format",
    "missing_uid": "missing_uid",
}


# ---------------------------------------------------------------- label files

def write_label_folder(folder: Path, truth: SeriesTruth, *, labeled_phases: tuple[int, ...],
                       sequence: str = "cine", view: str = "sax", disease: str = "DCM",
                       landmarks: dict[tuple[int, int], dict[str, tuple[float, float]]] | None = None,
                       ) -> np.ndarray:
    """Label files for one series keyed by its original UIDs; returns the hospital-grid mask.

    The mask marks the disc of each labelled frame as lv_blood (1) and a ring around it as
    lv_myo (2); ``landmarks`` maps (slice, phase) to {name: (row, col)} in original pixels.
    """
    import nibabel

    folder.mkdir(parents=True, exist_ok=True)
    S, T = len(truth.frames), len(truth.frames[0])
    rows, cols = truth.frames[0][0].shape
    mask = np.zeros((S, T, rows, cols), dtype=np.uint8)
    for s in range(S):
        for t in labeled_phases:
            bright = truth.frames[s][t] > 300
            grown = bright.copy()
            for axis in (0, 1):
                for step in (-2, 2):
                    grown |= np.roll(bright, step, axis=axis)
            mask[s, t][grown & ~bright] = 2
            mask[s, t][bright] = 1
    (folder / "masks").mkdir(exist_ok=True)
    data = np.transpose(mask, (3, 2, 0, 1))  # (cols, rows, S, T)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(folder / "masks" / f"{truth.series_uid}.nii.gz"))
    phases = ";".join(str(t) for t in labeled_phases)
    (folder / "series.csv").write_text(
        "SeriesInstanceUID,StudyInstanceUID,sequence,view,lge_pathology,labeled_phases\n"
        f"{truth.series_uid},{truth.study_uid},{sequence},{view},,{phases}\n")
    (folder / "studies.csv").write_text(f"StudyInstanceUID,disease\n{truth.study_uid},{disease}\n")
    lines = ["SOPInstanceUID,frame,landmark,row,col"]
    for (s, t), points in (landmarks or {}).items():
        frame = truth.frame_numbers[s][t] if truth.frame_numbers else ""
        for name, (r, c) in points.items():
            lines.append(f"{truth.sop_uids[s][t]},{frame},{name},{r},{c}")
    (folder / "landmarks.csv").write_text("\n".join(lines) + "\n")
    return mask


# ---------------------------------------------------------------- running the intake

def plant_secret(store: Path, secret: str = "ab" * 32) -> None:
    """Give a new store a known de-identification secret (two stores then map alike)."""
    import os

    (store / "intake").mkdir(parents=True, exist_ok=True)
    fd = os.open(store / "intake" / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)


def ingest_dicom(src: Path, store: Path, *, labels: Path | None = None, crop_px: int = 32,
                 spacing_mm: float = 1.0, workers: int = 1, fmt: str = "dicom"):
    """Run the intake the way the CLI does, small and in-process by default."""
    from client.intake.pipeline import IngestOptions, ingest

    return ingest(IngestOptions(src=src, store=store, spacing_mm=spacing_mm, crop_px=crop_px,
                                labels=labels, workers=workers, progress=False), fmt)


def expected_stack(truth: SeriesTruth, crop_px: int = 32, spacing_mm: float = 1.0) -> np.ndarray:
    """The store array a correct intake makes of ``truth``: frames in (slice, phase) order."""
    from client.intake.geometry import resample_image
    from client.store import normalise_intensity

    return np.stack([
        np.stack([normalise_intensity(resample_image(f.astype(np.float32), truth.spacing,
                                                     crop_px, spacing_mm)) for f in row])
        for row in truth.frames]).astype(np.float16)
