"""Prediction on a hospital's raw inputs, with results in the input's own geometry.

- an nnU-Net images folder (``<case>_0000.nii.gz``, or a dataset folder with ``imagesTs/``):
  ``OUT/<case>.nii.gz`` with the image's shape and affine, as ``nnUNetv2_predict`` writes it
  (label values from the dataset's ``dataset.json`` when it is beside the images, else
  ``shared_model.labels.MASK_VALUES``);
- a DICOM folder (one or more studies): per segmented series ``OUT/<SeriesInstanceUID>.nii.gz``
  (``data[column, row, slice, phase]``, slices along the normal, phases by TriggerTime, the
  affine nibabel and dcm2niix derive from ImagePositionPatient, ImageOrientationPatient and
  PixelSpacing, LPS turned to RAS) and ``OUT/<SeriesInstanceUID>.seg.dcm``, a DICOM
  Segmentation object referencing the source series and instances (a cine gets one SEG
  instance per phase, ``.seg-tNN.dcm``, all in one segmentation series: a SEG is organised
  by plane position, and the frames of a cine share theirs).

These outputs stay at the node and carry the hospital's own UIDs: that is what they are for.
Nothing of them reaches the federation.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from client.inference import ModelGrid, Segmenter, segment_stack

NNUNET_SUFFIX = "_0000.nii.gz"
ORIENTATION_DECIMALS = 3  # frames whose orientation cosines agree to this are one stack


def model_grid(cfg: object) -> ModelGrid:
    """The grid a bundle's model was trained on: the store grid resized to the input size."""
    from shared_model.encoders import get_preset

    size = get_preset(cfg.model.preset).image_size  # type: ignore[attr-defined]
    data = cfg.data  # type: ignore[attr-defined]
    return ModelGrid(size=size, spacing_mm=data.spacing_mm * data.crop_px / size)


def class_values(task: object, dataset_labels: dict[str, int] | None = None) -> np.ndarray:
    """Class index -> output label value (MASK_VALUES, or the nnU-Net dataset's own values)."""
    classes = task.classes  # type: ignore[attr-defined]
    values = np.zeros(len(classes) + 1, dtype=np.uint8)
    for i, (name, mask_values) in enumerate(classes, start=1):
        values[i] = mask_values[0]
        if dataset_labels is not None:
            values[i] = _dataset_value(name, dataset_labels, values[i])
    return values


def _dataset_value(structure: str, labels: dict[str, int], default: int) -> int:
    from client.adapters.nnunet import DEFAULT_LABEL_NAMES, normalise_label_name

    for name, value in labels.items():
        if DEFAULT_LABEL_NAMES.get(normalise_label_name(name)) == structure and isinstance(value, int):
            return value
    return int(default)


# ---------------------------------------------------------------------------- nnU-Net


def nnunet_images(src: Path) -> list[Path]:
    """Channel-0 images of an nnU-Net folder: the folder itself, else its imagesTs/, imagesTr/."""
    for folder in (src, src / "imagesTs", src / "imagesTr"):
        found = sorted(folder.glob(f"*{NNUNET_SUFFIX}"))
        if found:
            return found
    return []


def _dataset_labels(src: Path) -> dict[str, int] | None:
    for candidate in (src / "dataset.json", src.parent / "dataset.json"):
        if candidate.is_file():
            try:
                labels = json.loads(candidate.read_text(encoding="utf-8")).get("labels")
            except (OSError, json.JSONDecodeError):
                return None
            return labels if isinstance(labels, dict) else None
    return None


def predict_nnunet(segmenter: Segmenter, task: object, src: Path, out: Path) -> dict[str, int]:
    """``OUT/<case>.nii.gz`` for every image; a damaged image is skipped and counted."""
    import nibabel

    values = class_values(task, _dataset_labels(src))
    counts: Counter = Counter()
    out.mkdir(parents=True, exist_ok=True)
    for path in nnunet_images(src):
        case = path.name[: -len(NNUNET_SUFFIX)]
        try:
            image = cast("nibabel.Nifti1Image", nibabel.load(str(path)))
            data = np.asanyarray(image.dataobj).astype(np.float32)
        except Exception:  # noqa: BLE001 - nibabel raises many types for damaged files
            counts["unreadable"] += 1
            continue
        squeezed = data.reshape(*data.shape[:2], -1)  # (X, Y, frames) for 2-D/3-D(/4-D)
        zooms = image.header.get_zooms()
        spacing = (float(zooms[1]), float(zooms[0]))  # (row, col): axis 1 is the row
        frames = [squeezed[:, :, i].T for i in range(squeezed.shape[2])]
        labels = segment_stack(segmenter, frames, spacing)  # (frames, rows, cols)
        mask = values[labels].transpose(2, 1, 0).reshape(data.shape)
        result = nibabel.Nifti1Image(mask.astype(np.uint8), image.affine, header=image.header)
        result.set_data_dtype(np.uint8)
        result.header.set_slope_inter(1.0, 0.0)
        nibabel.save(result, str(out / f"{case}.nii.gz"))
        counts["cases"] += 1
        counts["frames"] += len(frames)
    return dict(counts)


# ---------------------------------------------------------------------------- DICOM


@dataclass
class DicomFrame:
    dataset: Any  # pydicom Dataset of the instance
    frame: int  # 0-based frame of a multi-frame instance
    position: np.ndarray
    orientation: tuple[float, ...]
    spacing: tuple[float, float]  # (row, col) mm
    trigger_ms: float
    order: float


@dataclass
class DicomStack:
    """Frames of one series that share one orientation and matrix (a localizer splits)."""

    series_uid: str
    frames: list[DicomFrame] = field(default_factory=list)


def read_dicom_stacks(src: Path) -> tuple[list[DicomStack], Counter]:
    """Every MR image under ``src`` grouped into stacks; unreadable files counted by reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from client.intake.reading import instance_geometry

    stacks: dict[tuple, DicomStack] = {}
    skipped: Counter = Counter()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path))
        except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, AttributeError):
            skipped["not_dicom"] += 1
            continue
        if getattr(ds, "Modality", "") != "MR" or "PixelData" not in ds:
            skipped["not_mr_image"] += 1
            continue
        try:
            geometry = instance_geometry(ds)
        except Exception:  # noqa: BLE001 - a damaged header is one skipped file
            skipped["missing_geometry"] += 1
            continue
        for index, g in enumerate(geometry):
            if g.position is None or g.orientation is None or g.spacing is None:
                skipped["missing_geometry"] += 1
                break
            key = (str(ds.SeriesInstanceUID), tuple(round(v, ORIENTATION_DECIMALS) for v in g.orientation),
                   int(ds.Rows), int(ds.Columns))
            stacks.setdefault(key, DicomStack(str(ds.SeriesInstanceUID))).frames.append(DicomFrame(
                ds, index, np.asarray(g.position, dtype=np.float64), tuple(g.orientation),
                (float(g.spacing[0]), float(g.spacing[1])), g.trigger_ms, g.order))
    return list(stacks.values()), skipped


def frame_pixels(frame: DicomFrame) -> np.ndarray:
    """The frame's stored values through the modality LUT; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    ds = frame.dataset
    pixels = ds.pixel_array
    pixels = pixels[frame.frame] if pixels.ndim == 3 else pixels
    image = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        image = image.max() - image
    return image


def stack_grid(stack: DicomStack) -> list[list[DicomFrame]]:
    """Frames as grid[slice][phase]: slices along the normal, phases by TriggerTime (the
    intake's ordering rule)."""
    from client.intake.geometry import grid_indices, slice_normal

    normal = slice_normal(stack.frames[0].orientation)
    along = np.array([float(f.position @ normal) for f in stack.frames])
    slices, phases = grid_indices(along, [(f.trigger_ms, f.order) for f in stack.frames])
    grid: list[list[DicomFrame | None]] = [[None] * (int(phases.max()) + 1)
                                           for _ in range(int(slices.max()) + 1)]
    for f, s, t in zip(stack.frames, slices, phases, strict=True):
        grid[s][t] = f
    return [[f for f in row if f is not None] for row in grid]


def nifti_affine(grid: list[list[DicomFrame]]) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm, from the first slice's ImagePositionPatient."""
    first = grid[0][0]
    iop = np.asarray(first.orientation, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]  # direction of increasing column / row index
    d_row, d_col = first.spacing
    lps = np.eye(4)
    lps[:3, 0] = row_cos * d_col
    lps[:3, 1] = col_cos * d_row
    if len(grid) > 1:
        lps[:3, 2] = (grid[-1][0].position - first.position) / (len(grid) - 1)
    else:
        thickness = float(getattr(first.dataset, "SliceThickness", 0) or 1.0)
        lps[:3, 2] = np.cross(row_cos, col_cos) * thickness
    lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _applies(task: object, stack: DicomStack) -> bool:
    from client.intake.classify import text_hints
    from shared_model.labels import UNKNOWN

    ds = stack.frames[0].dataset
    parts = [str(getattr(ds, k, "")) for k in ("SeriesDescription", "ProtocolName", "SequenceName")]
    sequence, view = text_hints(parts)
    sequences, views = getattr(task, "sequences", ()), getattr(task, "views", ())
    return (sequence == UNKNOWN or not sequences or sequence in sequences) and \
        (view == UNKNOWN or not views or view in views)


def predict_dicom(segmenter: Segmenter, task: object, src: Path, out: Path) -> dict[str, int]:
    """NIfTI and DICOM SEG per segmented series (see the module docstring)."""
    import nibabel

    stacks, skipped = read_dicom_stacks(src)
    values = class_values(task)
    counts: Counter = Counter({f"skipped_{k}": v for k, v in skipped.items()})
    out.mkdir(parents=True, exist_ok=True)
    per_series: Counter = Counter(s.series_uid for s in stacks)
    for number, stack in enumerate(stacks):
        if not _applies(task, stack):
            continue
        grid = stack_grid(stack)
        if len({len(row) for row in grid}) != 1:
            counts["skipped_incomplete_series"] += 1
            continue
        flat = [f for row in grid for f in row]
        labels = segment_stack(segmenter, [frame_pixels(f) for f in flat], flat[0].spacing)
        slices, phases = len(grid), len(grid[0])
        volume = values[labels].reshape(slices, phases, *labels.shape[1:])  # (S, T, rows, cols)
        data = np.ascontiguousarray(volume.transpose(3, 2, 0, 1))  # col, row, slice, phase
        name = stack.series_uid if per_series[stack.series_uid] == 1 else f"{stack.series_uid}_{number}"
        image = nibabel.Nifti1Image(data.astype(np.uint8), nifti_affine(grid))
        image.header.set_xyzt_units("mm", "msec")
        nibabel.save(image, str(out / f"{name}.nii.gz"))
        write_dicom_segs(out, name, grid, labels, task)
        counts["series"] += 1
        counts["frames"] += len(flat)
    return dict(counts)


# Patient and study attributes a DICOM SEG copies from its source (type 2: may be empty).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber")
_SEGMENT_CODES = {"lv_blood": "LeftVentricle", "lv_myo": "LeftVentricleMyocardium",
                  "remote_myo": "LeftVentricleMyocardium", "myocardium": "LeftVentricleMyocardium",
                  "rv_blood": "RightVentricle", "la_blood": "LeftAtrium", "ra_blood": "RightAtrium",
                  "scar": "Scar"}


def write_dicom_segs(out: Path, name: str, grid: list[list[DicomFrame]], labels: np.ndarray,
                     task: object) -> list[Path]:
    """``<name>.seg.dcm``; for a time series one instance per phase, ``<name>.seg-tNN.dcm``,
    all of one segmentation series (a SEG is organised by plane position, and the frames of a
    cine share their positions)."""
    from pydicom.uid import generate_uid

    phases = len(grid[0])
    per_frame = labels.reshape(len(grid), phases, *labels.shape[1:])
    series_uid = generate_uid()
    paths = []
    for t in range(phases):
        path = out / (f"{name}.seg.dcm" if phases == 1 else f"{name}.seg-t{t:02d}.dcm")
        write_dicom_seg(path, [row[t] for row in grid], per_frame[:, t], task, series_uid, t + 1)
        paths.append(path)
    return paths


def write_dicom_seg(path: Path, frames: list[DicomFrame], labels: np.ndarray, task: object,
                    series_uid: str, instance_number: int = 1) -> None:
    """A binary DICOM Segmentation of ``labels`` (N, rows, cols: class indices) over the source
    instances of ``frames``, one segment per class, made by highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    classes = task.classes  # type: ignore[attr-defined]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="FedCMR", family=codes.cid7162.ArtificialIntelligence, version=_version())
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name,
        segmented_property_category=codes.SCT.AnatomicalStructure if name != "scar"
        else codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=getattr(codes.SCT, _SEGMENT_CODES.get(name, "Heart")),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for i, (name, _) in enumerate(classes, start=1)]
    multi = [f for f in frames if getattr(f.dataset, "NumberOfFrames", 1) not in (None, "", 1, "1")]
    if multi:  # an Enhanced MR series: one source instance, frames in its own order
        source = [frames[0].dataset]
        order = np.argsort([f.frame for f in frames])
        pixel = labels[order]
    else:
        source = [f.dataset for f in frames]
        pixel = labels
    for ds in source:  # in-memory copies of the headers; the export itself is never written
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    onehot = np.stack([pixel == i for i in range(1, len(classes) + 1)], axis=-1).astype(np.uint8)
    first = frames[0].dataset
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=onehot,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid,
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer="FedCMR",
        manufacturer_model_name=f"FedCMR {getattr(task, 'name', '')}",
        software_versions=_version(), device_serial_number="0", omit_empty_frames=False)
    seg.save_as(str(path))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedcmr")
    except PackageNotFoundError:
        return "0"


def detect_input(path: Path) -> str:
    """``store`` (a FedCMR store), ``nnunet`` (an images folder) or ``dicom``."""
    if (path / "manifest.json").is_file():
        return "store"
    if nnunet_images(path):
        return "nnunet"
    if path.is_dir():
        return "dicom"
    raise FileNotFoundError(f"{path}: not a store, an nnU-Net images folder or a DICOM folder")



def predict_input(task_name: str, bundle_path: Path, src: Path, out: Path,
                  device_name: str = "auto") -> tuple[str, dict[str, int]]:
    """Predict on a store, an nnU-Net images folder or a DICOM folder: (input kind, counts)."""
    from client.finetune import predict_on_store
    from shared_model.bundle import load_bundle, task_model_from_bundle
    from shared_model.tasks import TaskKind, get_task
    from shared_model.train import resolve_device

    kind = detect_input(src)
    if kind == "store":
        return kind, predict_on_store(task_name, bundle_path, src, out, device_name)
    task = get_task(task_name)
    if task.kind != TaskKind.segmentation:
        raise ValueError(f"prediction on a {kind} folder is for segmentation tasks; ingest the "
                         f"export into a store for '{task_name}' (`fedcmr-client ingest`)")
    bundle = load_bundle(bundle_path)
    model = task_model_from_bundle(bundle, task, require_head=True)
    segmenter = Segmenter(model, model_grid(bundle.config), resolve_device(device_name),
                          convex_classes=task.convex_classes)
    run = predict_nnunet if kind == "nnunet" else predict_dicom
    return kind, run(segmenter, task, src, out)
