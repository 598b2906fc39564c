"""Read one file: checks, pixels, geometry and pseudonymised identifiers, or a skip reason.

Each file is read once (whole, by :mod:`client.intake.plain_dicom`, when it is laid out the
plain way; else by ``dcmread`` with large elements deferred), checked before anything is
decoded (modality, SOP class, burned-in annotation, declared pixel size against a limit and the
file size, decoder availability), decoded, and each frame is resampled into the store grid and
normalised here, so the series step only orders and stacks. What leaves this module is numbers,
vocabulary labels and pseudonymised identifiers (see :mod:`client.intake.deid`); header text and
original UIDs never do, and exception text is reduced to a reason code.

Runs in worker processes (:func:`init_worker`, :func:`read_chunk`) or in-process.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import cast

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from client.intake.bookkeeping import stat_fingerprint
from client.intake.classify import text_hints, vendor_label
from client.intake.deid import Pseudonymiser, quiet_pydicom, series_key
from client.intake.geometry import resample_image
from client.intake.plain_dicom import read_plain
from client.intake.reasons import SkipFile
from client.store import intensity_window

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.4"
SUPPORTED_SOP_CLASSES = frozenset({MR_IMAGE, ENHANCED_MR_IMAGE, LEGACY_ENHANCED_MR_IMAGE})
NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                  "1.2.840.10008.1.2.1.99"})
DEFER_SIZE = 16 * 1024 * 1024  # elements larger than this are read only after the size checks
PLAIN_READ_MAX_BYTES = 64 * 1024 * 1024  # files up to this size are read whole (plain_dicom)
# Read in the ingesting process (a small export) only up to this size, natively encoded: larger
# files, and every file a decoder must expand, go to a reading process bounded in memory and
# time (client.intake.workers), so no file can take the node's memory or hang its intake.
IN_PROCESS_MAX_BYTES = PLAIN_READ_MAX_BYTES

# Tags read as raw bytes (fast, no value conversion); BaseTag keys skip pydicom's Tag() parsing.
_T = {name: Tag(name) for name in (
    "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID",
    "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "TriggerTime", "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "SeriesDescription",
    "ProtocolName", "ImageType", "SequenceName", "MagneticFieldStrength", "Manufacturer",
    "BurnedInAnnotation", "InstanceNumber", "TemporalPositionIdentifier", "FrameTime",
    "PhotometricInterpretation", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
    "PerFrameFunctionalGroupsSequence", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "SamplesPerPixel", "TransferSyntaxUID")}


class NeedsWorker(Exception):
    """A file an in-process reader leaves to a bounded reading process."""


@dataclass(frozen=True)
class ReadSettings:
    """What a reader needs; picklable, handed to each worker once."""

    spacing_mm: float
    crop_px: int
    secret: str
    landmark_sops: frozenset[str] = frozenset()  # hospital SOP UIDs that label files refer to
    scan_root: str = ""  # the export folder: file fingerprints hold paths relative to it
    max_file_bytes: int = 2 * 1024**3
    max_pixel_bytes: int = 1024**3  # decoded size limit (Rows*Columns*Frames*BitsAllocated/8)
    max_side_px: int = 4096
    max_frames: int = 4096
    recursion_budget: int = 400  # Python frames pydicom may use below the caller (~4 per nesting)
    # address space a reading process may take beyond what it started with (a decoder asked
    # for more fails with MemoryError, and the file is skipped); 0: no bound
    worker_memory_bytes: int = 4 * 1024**3


@dataclass
class Frame:
    """One 2-D image, already in the store grid; geometry in mm/ms, no identifying value."""

    position: tuple[float, float, float]  # ImagePositionPatient, mm (kept in memory only)
    orientation: tuple[float, ...]  # ImageOrientationPatient, 6 direction cosines
    spacing: tuple[float, float]  # original (row, col) pixel spacing, mm
    matrix: tuple[int, int]  # original (rows, cols)
    trigger_ms: float  # TriggerTime / NominalCardiacTriggerDelayTime; NaN when absent
    order: float  # tie-break for time: temporal position index, else instance number
    frame_number: int  # 1-based in a multi-frame instance, 0 for single-frame
    sop_ref: str  # store SOP UID when a label file names this instance, else ""
    image: np.ndarray  # (crop, crop) float16, normalised to the store's intensity scale
    window: tuple[float, float]  # raw 1st/99th percentiles (physical units for maps)


@dataclass
class SeriesHints:
    """Per-file, header-derived series facts, as vocabulary labels and numbers."""

    sequence: str
    view: str
    vendor: str
    field_strength_t: float | None
    enhanced: bool


@dataclass
class InstanceResult:
    """What reading one file produced: frames and identifiers, or a skip reason."""

    index: int
    reason: str = ""
    key: str = ""
    subject: str = ""
    study_uid: str = ""  # store UIDs (dicognito-remapped)
    series_uid: str = ""
    instance: str = ""  # keyed digest of the hospital SOP instance UID (duplicate detection)
    fingerprint: str = ""  # the file as read (see bookkeeping.file_fingerprint); "" if skipped
    frames: list[Frame] = field(default_factory=list)
    hints: SeriesHints | None = None


# ---------------------------------------------------------------- raw header values

def _raw_bytes(ds: pydicom.Dataset, tag: int) -> bytes | None:
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if value is None:
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value).encode("latin-1", "replace")
    return str(value).encode("latin-1", "replace")


def _text(ds: pydicom.Dataset, tag: int) -> str:
    raw = _raw_bytes(ds, tag)
    return "" if raw is None else raw.decode("latin-1").strip(" \x00")


def _floats(ds: pydicom.Dataset, tag: int, count: int) -> tuple[float, ...] | None:
    """A DS/FD value of exactly ``count`` finite numbers, or None."""
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None or elem.value is None:
        return None
    try:
        if isinstance(elem.value, bytes | bytearray) and elem.VR in ("DS", "IS"):
            # Fast path: decimal strings parsed straight from the raw bytes.
            numbers = [float(x) for x in elem.value.decode("latin-1").strip(" \x00").split("\\")]
        else:
            # Binary VRs, implicit-VR files (VR unknown until looked up): let pydicom convert.
            value = ds[tag].value
            if value is None or value == "":
                return None
            if isinstance(value, list | tuple | pydicom.multival.MultiValue):
                numbers = [float(x) for x in value]
            else:
                numbers = [float(value)]
    except (ValueError, TypeError, struct.error, OverflowError):
        return None
    if len(numbers) != count or not all(math.isfinite(x) for x in numbers):
        return None
    return tuple(numbers)


def _us(ds: pydicom.Dataset, tag: int, default: int) -> int:
    """An unsigned short (Rows, BitsAllocated, ...) from its two raw bytes."""
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return default
    value = elem.value
    if isinstance(value, bytes | bytearray):
        if len(value) < 2:
            return default
        raw = cast(RawDataElement, elem)  # only a deferred raw element still holds bytes here
        return int.from_bytes(value[:2], "little" if raw.is_little_endian else "big")
    try:
        return int(value[0] if isinstance(value, list | tuple | pydicom.multival.MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return default


def _float(ds: pydicom.Dataset, tag: int, default: float = math.nan) -> float:
    value = _floats(ds, tag, 1)
    return default if value is None else value[0]


def _attr(dataset: pydicom.Dataset | None, keyword: str, count: int) -> tuple[float, ...] | None:
    if dataset is None or keyword not in dataset:
        return None
    return _floats(dataset, int(Tag(keyword)), count)


# ---------------------------------------------------------------- guards

def _stack_depth() -> int:
    depth, frame = 0, cast(FrameType | None, sys._getframe())
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


@contextlib.contextmanager
def bounded_recursion(budget: int) -> Iterator[None]:
    """Let the code inside recurse at most ``budget`` Python frames deeper than here.

    pydicom parses undefined-length sequences recursively; a file nested thousands deep would
    otherwise run to the interpreter's limit (or beyond, with a raised one). Past the budget
    Python raises RecursionError, which the reader turns into ``nested_too_deep``.
    """
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(min(old, _stack_depth() + budget))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _check_truncation(ds: pydicom.Dataset, file_size: int) -> None:
    if len(ds) == 0:
        raise SkipFile("truncated")
    last = ds.get_item(max(map(int, ds.keys())), keep_deferred=True)
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is not None and length not in (None, 0xFFFFFFFF) and tell + length > file_size:
        raise SkipFile("truncated")


def _check_class(ds: pydicom.Dataset) -> str:
    """The SOP class UID, after the modality, SOP class and burned-in checks."""
    sop_class = _text(ds, _T["SOPClassUID"])
    if not sop_class and hasattr(ds, "file_meta"):
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    modality = _text(ds, _T["Modality"]).upper()
    if modality and modality != "MR":
        raise SkipFile("not_mr")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        raise SkipFile("unsupported_sop_class")
    if _text(ds, _T["BurnedInAnnotation"]).upper() == "YES":
        raise SkipFile("burned_in_annotation")
    return sop_class


@dataclass(frozen=True)
class PixelLayout:
    """What the header says about the pixel data, read once per file."""

    frames: int
    rows: int
    cols: int
    bits: int  # BitsAllocated
    stored: int  # BitsStored
    signed: bool  # PixelRepresentation 1
    inverted: bool  # MONOCHROME1: low values are bright
    syntax: str  # transfer syntax UID


def _pixel_layout(ds: pydicom.Dataset, settings: ReadSettings) -> PixelLayout:
    """The pixel layout, after the pixel-format and size checks."""
    if ds.get_item(_T["PixelData"], keep_deferred=True) is None:
        if (ds.get_item(_T["FloatPixelData"], keep_deferred=True) is not None
                or ds.get_item(_T["DoubleFloatPixelData"], keep_deferred=True) is not None):
            raise SkipFile("unsupported_pixel_format")
        raise SkipFile("no_pixel_data")
    rows, cols = _us(ds, _T["Rows"], 0), _us(ds, _T["Columns"], 0)
    bits, samples = _us(ds, _T["BitsAllocated"], 0), _us(ds, _T["SamplesPerPixel"], 1)
    try:
        frames_text = _text(ds, _T["NumberOfFrames"])
        frames = int(float(frames_text)) if frames_text else 1
    except (TypeError, ValueError, OverflowError):
        raise SkipFile("absurd_dimensions") from None
    photometric = _text(ds, _T["PhotometricInterpretation"]).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2", "") or bits not in (8, 16, 32):
        raise SkipFile("unsupported_pixel_format")
    if (min(rows, cols, frames) < 1 or max(rows, cols) > settings.max_side_px
            or frames > settings.max_frames
            or rows * cols * frames * bits // 8 > settings.max_pixel_bytes):
        raise SkipFile("absurd_dimensions")
    meta = getattr(ds, "file_meta", None)
    return PixelLayout(frames=frames, rows=rows, cols=cols, bits=bits,
                       stored=_us(ds, _T["BitsStored"], bits) or bits,
                       signed=_us(ds, _T["PixelRepresentation"], 0) == 1,
                       inverted=photometric == "MONOCHROME1",
                       syntax=_text(meta, _T["TransferSyntaxUID"]) if meta is not None else "")


# ---------------------------------------------------------------- pixels

def _native_pixels(ds: pydicom.Dataset, layout: PixelLayout) -> np.ndarray:
    """Uncompressed little-endian pixel data straight from the element's bytes.

    The same stored values as ``ds.pixel_array`` (tests/client/test_intake_pixels.py), without
    converting the element or copying the buffer.
    """
    # pydicom keeps PixelData as read (a RawDataElement, with its length) until it is accessed
    elem = cast(RawDataElement, ds.get_item(_T["PixelData"], keep_deferred=True))
    count = layout.frames * layout.rows * layout.cols
    expected = count * layout.bits // 8
    if elem.length != 0xFFFFFFFF and elem.length < expected:
        raise SkipFile("truncated")
    data = elem.value
    if not isinstance(data, bytes | bytearray):  # deferred (very large) or already converted
        data = ds.PixelData
    if data is None or len(data) < expected:
        raise SkipFile("truncated")
    bits, stored = layout.bits, layout.stored
    dtype = np.dtype(f"<{'i' if layout.signed else 'u'}{bits // 8}")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(layout.frames, layout.rows,
                                                                 layout.cols)
    if 0 < stored < bits:
        shift = bits - stored
        if layout.signed:
            array = (array << shift) >> shift
        else:
            array = array & dtype.type((1 << stored) - 1)
    return array


def _decoded_pixels(ds: pydicom.Dataset, layout: PixelLayout) -> np.ndarray:
    try:
        decoder = pydicom.pixels.get_decoder(layout.syntax)
    except (NotImplementedError, ValueError):
        raise SkipFile("no_decoder") from None
    if not decoder.is_available:
        raise SkipFile("no_decoder")
    try:
        array = ds.pixel_array
    except (MemoryError, RecursionError):
        raise
    except Exception:  # noqa: BLE001 - any decoder failure costs this file only
        raise SkipFile("undecodable_pixels") from None
    if array.size != layout.frames * layout.rows * layout.cols:
        raise SkipFile("undecodable_pixels")
    return array.reshape(layout.frames, layout.rows, layout.cols)


def _pixels(ds: pydicom.Dataset, layout: PixelLayout) -> np.ndarray:
    """(frames, rows, cols) stored values; MONOCHROME1 inverted so that bright means signal."""
    if layout.syntax in NATIVE_LITTLE_ENDIAN:
        array = _native_pixels(ds, layout)
    else:
        array = _decoded_pixels(ds, layout)
    if layout.inverted:
        array = array.max() - array.astype(np.float32)
    return array


# ---------------------------------------------------------------- per-frame geometry

@dataclass
class FrameGeometry:
    """Where and when one frame was acquired (mm, ms), and its stored-value rescale."""

    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, ...] | None
    trigger_ms: float
    order: float
    slope: float
    intercept: float


def _item(container: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    if container is None or keyword not in container:
        return None
    sequence = container[keyword].value
    return sequence[0] if sequence else None


def _functional(per_frame: pydicom.Dataset | None, shared: pydicom.Dataset | None,
                keyword: str) -> pydicom.Dataset | None:
    """A functional-group macro for one frame: its own, else the shared one."""
    return _item(per_frame, keyword) or _item(shared, keyword)


def _enhanced_geometry(ds: pydicom.Dataset, frames: int) -> list[FrameGeometry]:
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise SkipFile("missing_geometry")
    out = []
    for index, item in enumerate(per_frame):
        transform = _functional(item, shared, "PixelValueTransformationSequence")
        cardiac = _functional(item, shared, "CardiacSynchronizationSequence")
        content = _functional(item, shared, "FrameContentSequence")
        trigger = _attr(cardiac, "NominalCardiacTriggerDelayTime", 1)
        temporal = _attr(content, "TemporalPositionIndex", 1)
        out.append(FrameGeometry(
            position=_attr(_functional(item, shared, "PlanePositionSequence"),
                           "ImagePositionPatient", 3),
            orientation=_attr(_functional(item, shared, "PlaneOrientationSequence"),
                              "ImageOrientationPatient", 6),
            spacing=_attr(_functional(item, shared, "PixelMeasuresSequence"), "PixelSpacing", 2),
            trigger_ms=math.nan if trigger is None else trigger[0],
            order=float(index) if temporal is None else temporal[0],
            slope=(_attr(transform, "RescaleSlope", 1) or (1.0,))[0],
            intercept=(_attr(transform, "RescaleIntercept", 1) or (0.0,))[0]))
    return out


def _classic_geometry(ds: pydicom.Dataset, frames: int) -> list[FrameGeometry]:
    """Single-frame MR (or a classic multi-frame one: frames in time at one position)."""
    trigger = _float(ds, _T["TriggerTime"])
    frame_time = _float(ds, _T["FrameTime"])
    temporal = _float(ds, _T["TemporalPositionIdentifier"])
    instance = _float(ds, _T["InstanceNumber"], 0.0)
    base_order = temporal if math.isfinite(temporal) else instance
    position = _floats(ds, _T["ImagePositionPatient"], 3)
    orientation = _floats(ds, _T["ImageOrientationPatient"], 6)
    spacing = _floats(ds, _T["PixelSpacing"], 2)
    slope, intercept = _float(ds, _T["RescaleSlope"], 1.0), _float(ds, _T["RescaleIntercept"], 0.0)
    out = []
    for index in range(frames):
        t = trigger
        if frames > 1:
            step = frame_time if math.isfinite(frame_time) else math.nan
            t = (0.0 if math.isnan(trigger) else trigger) + index * step
        out.append(FrameGeometry(position, orientation, spacing, trigger_ms=t, order=base_order + index,
                                 slope=slope, intercept=intercept))
    return out


def instance_geometry(ds: pydicom.Dataset) -> list[FrameGeometry]:
    """Per-frame geometry of an MR instance, the way the intake orders frames.

    For adapters that must place labels frame by frame exactly where the intake puts images.
    """
    frames_text = _text(ds, _T["NumberOfFrames"])
    frames = int(float(frames_text)) if frames_text else 1
    if _text(ds, _T["SOPClassUID"]) in (ENHANCED_MR_IMAGE, LEGACY_ENHANCED_MR_IMAGE):
        return _enhanced_geometry(ds, frames)
    return _classic_geometry(ds, frames)


def _valid(geometry: FrameGeometry) -> bool:
    """Position, orientation (two unit direction cosines) and positive spacing are all there."""
    if geometry.position is None or geometry.orientation is None or geometry.spacing is None:
        return False
    if min(geometry.spacing) <= 0:
        return False
    iop = geometry.orientation
    return (abs(math.hypot(*iop[:3]) - 1) < 0.05 and abs(math.hypot(*iop[3:]) - 1) < 0.05)


# ---------------------------------------------------------------- the reader

class InstanceReader:
    """Reads files into :class:`InstanceResult` with one pseudonymiser (and its caches)."""

    def __init__(self, settings: ReadSettings, in_process: bool = False) -> None:
        self.settings = settings
        self.in_process = in_process  # defer what only a bounded reading process may read
        self.pseudonymiser = Pseudonymiser(settings.secret)
        self._hints: dict[str, SeriesHints] = {}  # store series UID -> hints (first file's)

    def read(self, index: int, path: str | Path) -> InstanceResult:
        """Never raises for bad input: every failure is a reason code on the result."""
        result = self.read_or_defer(index, path)
        assert result is not None, "only an in-process reader defers a file"
        return result

    def read_or_defer(self, index: int, path: str | Path) -> InstanceResult | None:
        """As :meth:`read`; None for a file an in-process reader leaves to a reading process
        (larger than IN_PROCESS_MAX_BYTES, or pixels a decoder must expand)."""
        try:
            with bounded_recursion(self.settings.recursion_budget):
                return self._read(index, Path(path))
        except NeedsWorker:
            return None
        except SkipFile as skip:
            return InstanceResult(index=index, reason=skip.reason)
        except RecursionError:
            return InstanceResult(index=index, reason="nested_too_deep")
        except MemoryError:
            return InstanceResult(index=index, reason="absurd_dimensions")
        except Exception:  # noqa: BLE001 - one bad file must never stop an ingest
            return InstanceResult(index=index, reason="unexpected_error")

    def _open(self, path: Path) -> tuple[pydicom.Dataset, os.stat_result]:
        try:
            stat = os.stat(path)
        except OSError:
            raise SkipFile("unreadable_file") from None
        size = stat.st_size
        if size > self.settings.max_file_bytes:
            raise SkipFile("file_too_large")
        if self.in_process and size > IN_PROCESS_MAX_BYTES:
            raise NeedsWorker
        if size <= PLAIN_READ_MAX_BYTES:
            try:
                with open(path, "rb") as handle:
                    head = handle.read(132)
                    ds = None
                    if head[128:] == b"DICM":  # read it whole (again from 0: no copy to join)
                        handle.seek(0)
                        ds = read_plain(handle.read())
            except OSError:
                raise SkipFile("unreadable_file") from None
            if ds is not None:
                return ds, stat
        try:
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        except InvalidDicomError:
            raise SkipFile("not_dicom") from None
        except (EOFError, struct.error):
            raise SkipFile("truncated") from None
        except (OSError, PermissionError):
            raise SkipFile("unreadable_file") from None
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - whatever pydicom raises on a broken header skips the file
            raise SkipFile("unreadable_header") from None
        _check_truncation(ds, size)
        return ds, stat

    def _read(self, index: int, path: Path) -> InstanceResult:
        ds, stat = self._open(path)
        sop_class = _check_class(ds)
        study = _text(ds, _T["StudyInstanceUID"])
        series = _text(ds, _T["SeriesInstanceUID"])
        if not study or not series:
            raise SkipFile("missing_uid")
        layout = _pixel_layout(ds, self.settings)
        if self.in_process and layout.syntax not in NATIVE_LITTLE_ENDIAN:
            raise NeedsWorker
        enhanced = sop_class != MR_IMAGE
        frames = layout.frames
        geometry = _enhanced_geometry(ds, frames) if enhanced else _classic_geometry(ds, frames)
        if not all(_valid(g) for g in geometry):
            raise SkipFile("missing_geometry")
        pixels = _pixels(ds, layout)
        result = self._result(index, ds, study, series, geometry, pixels, enhanced)
        if self.settings.scan_root:
            result.fingerprint = stat_fingerprint(self.pseudonymiser, self.settings.scan_root,
                                                  path, stat)
        return result

    def _result(self, index: int, ds: pydicom.Dataset, study: str, series: str,
                geometry: list[FrameGeometry], pixels: np.ndarray, enhanced: bool) -> InstanceResult:
        pseudo = self.pseudonymiser
        sop = _text(ds, _T["SOPInstanceUID"])
        store_study, store_series = pseudo.uid(study), pseudo.uid(series)
        subject = pseudo.subject(_text(ds, _T["PatientID"]), study)
        sop_ref = pseudo.uid(sop) if sop and sop in self.settings.landmark_sops else ""
        numbered = enhanced or len(geometry) > 1  # landmarks.csv names frames of such instances
        frames = [self._frame(pixels[i], g, i + 1 if numbered else 0, sop_ref)
                  for i, g in enumerate(geometry)]
        return InstanceResult(
            index=index, key=series_key(subject, store_series), subject=subject,
            study_uid=store_study, series_uid=store_series,
            instance=pseudo.fingerprint(sop or f"{series}/{index}"), frames=frames,
            hints=self._series_hints(ds, store_series, enhanced))

    def _series_hints(self, ds: pydicom.Dataset, store_series: str, enhanced: bool) -> SeriesHints:
        if store_series not in self._hints:
            if len(self._hints) > 10_000:
                self._hints.clear()
            self._hints[store_series] = _hints(ds, enhanced)
        return self._hints[store_series]

    def _frame(self, raw: np.ndarray, g: FrameGeometry, frame_number: int, sop_ref: str) -> Frame:
        # frames without position, orientation or spacing were skipped as missing_geometry
        assert g.position is not None and g.orientation is not None and g.spacing is not None
        position = cast(tuple[float, float, float], g.position)
        spacing = cast(tuple[float, float], g.spacing)
        settings = self.settings
        image = raw.astype(np.float32)
        if g.slope != 1.0 or g.intercept != 0.0:
            image = image * np.float32(g.slope) + np.float32(g.intercept)
        resampled = resample_image(image, spacing, settings.crop_px, settings.spacing_mm)
        lo, hi = intensity_window(resampled)
        # normalise_intensity's arithmetic, written C-ordered so the series stack is a plain copy
        normalised = np.subtract(resampled, lo, out=np.empty(resampled.shape, np.float32))
        normalised /= max(hi - lo, 1e-6)
        return Frame(position=position, orientation=g.orientation, spacing=spacing,
                     matrix=(int(raw.shape[0]), int(raw.shape[1])), trigger_ms=g.trigger_ms,
                     order=g.order, frame_number=frame_number, sop_ref=sop_ref,
                     image=normalised.astype(np.float16), window=(lo, hi))


def _hints(ds: pydicom.Dataset, enhanced: bool) -> SeriesHints:
    parts = [_text(ds, _T[name]) for name in
             ("SeriesDescription", "ProtocolName", "SequenceName", "ImageType")]
    sequence, view = text_hints(parts)
    strength = _float(ds, _T["MagneticFieldStrength"])
    valid = math.isfinite(strength) and strength > 0
    return SeriesHints(sequence=sequence, view=view,
                       vendor=vendor_label(_text(ds, _T["Manufacturer"])),
                       field_strength_t=round(strength, 2) if valid else None, enhanced=enhanced)


# ---------------------------------------------------------------- worker processes

_WORKER: InstanceReader | None = None
_WORKER_STACK = contextlib.ExitStack()


def limit_address_space(extra_bytes: int) -> bool:
    """Bound this process's address space to what it holds now plus ``extra_bytes`` (Linux:
    RLIMIT_AS from /proc/self/statm); False where it cannot be bounded."""
    if extra_bytes <= 0:
        return False
    try:
        import resource

        pages = int(Path("/proc/self/statm").read_text().split()[0])
        now = pages * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = now + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, now + extra_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        return False
    return True


def init_worker(settings: ReadSettings) -> None:
    """Process initializer: one reader per process, pydicom silenced for its lifetime, its
    address space bounded (``settings.worker_memory_bytes``)."""
    global _WORKER
    limit_address_space(settings.worker_memory_bytes)
    _WORKER_STACK.enter_context(quiet_pydicom())
    _WORKER = InstanceReader(settings)


def read_chunk(items: list[tuple[int, str]]) -> list[InstanceResult]:
    """Read a few files in a worker (fewer round trips than one task per file)."""
    assert _WORKER is not None, "init_worker was not called"
    return [_WORKER.read(index, path) for index, path in items]
