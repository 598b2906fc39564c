"""ACDC and M&Ms-style NIfTI folders -> store series with masks, ED/ES and disease labels.

ACDC (one folder per case, any depth)::

    patientXXX/Info.cfg                   ED: 1  ES: 12  Group: DCM  (1-based frames)
    patientXXX/patientXXX_4d.nii.gz       (X, Y, Z, T) cine SAX
    patientXXX/patientXXX_frameNN_gt.nii.gz   (X, Y, Z) labels of frame NN: 1 RV, 2 MYO, 3 LV

M&Ms::

    <code>/<code>_sa.nii.gz               (X, Y, Z, T) cine SAX
    <code>/<code>_sa_gt.nii.gz            (X, Y, Z, T) labels at ED and ES: 1 LV, 2 MYO, 3 RV
    *.csv (in the folder or --labels)     External code, Vendor(Name), ED, ES (0-based), Pathology

NIfTI axis 0 is the image column and axis 1 the row (the label-file convention), so a frame is
``data[:, :, z, t].T``; spacing comes from the header zooms. Slices keep the file's z order.
Identifiers are the datasets' own case codes, pseudonymised like DICOM patient IDs; age, sex,
height and weight are not kept. Labels map to ``shared_model.labels.MASK_VALUES``.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from client.intake.bookkeeping import IntakeIndex, file_fingerprint
from client.intake.classify import vendor_label
from client.intake.deid import Pseudonymiser, series_key
from client.intake.geometry import resample_image, resample_mask
from client.intake.pipeline import IngestOptions, commit_series, open_store
from client.intake.scan import list_files
from client.intake.summary import IngestSummary
from client.store import LocalStore, SeriesRecord, normalise_intensity
from shared_model.labels import DISEASES, MASK_VALUES

ACDC_LABELS = {1: MASK_VALUES["rv_blood"], 2: MASK_VALUES["lv_myo"], 3: MASK_VALUES["lv_blood"]}
MNMS_LABELS = {1: MASK_VALUES["lv_blood"], 2: MASK_VALUES["lv_myo"], 3: MASK_VALUES["rv_blood"]}
ACDC_GROUPS = {"NOR": "NOR", "DCM": "DCM", "HCM": "HCM", "MINF": "MINF", "RV": "ARV"}
_ACDC_GT = re.compile(r"_frame(\d+)_gt\.nii(\.gz)?$")


@dataclass
class NiftiCase:
    """One subject's cine SAX volume and its labels, as the dataset lays them out."""

    dataset: str  # acdc | mnms
    code: str  # the dataset's case code (pseudonymised before it reaches the store)
    image: Path
    gt: dict[int, Path] = field(default_factory=dict)  # phase (0-based) -> 3-D labels (ACDC)
    gt_4d: Path | None = None  # 4-D labels (M&Ms)
    ed: int | None = None  # 0-based phases
    es: int | None = None
    disease: str | None = None
    vendor: str | None = None
    files: list[Path] = field(default_factory=list)  # every file the case uses


# ---------------------------------------------------------------- finding cases

def _acdc_info(path: Path) -> dict[str, str]:
    info = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if ":" in line:
            name, value = line.split(":", 1)
            info[name.strip()] = value.strip()
    return info


def find_acdc_cases(src: Path) -> list[NiftiCase]:
    cases = []
    for cfg in sorted(src.rglob("Info.cfg")):
        folder = cfg.parent
        images = sorted(folder.glob("*_4d.nii*"))
        info = _acdc_info(cfg)
        case = NiftiCase(dataset="acdc", code=folder.name, image=images[0] if images else Path(),
                         files=[cfg, *images])
        try:
            case.ed, case.es = int(info["ED"]) - 1, int(info["ES"]) - 1
        except (KeyError, ValueError):
            pass
        case.disease = ACDC_GROUPS.get(info.get("Group", ""))
        for gt in sorted(folder.glob("*_gt.nii*")):
            match = _ACDC_GT.search(gt.name)
            if match:
                case.gt[int(match.group(1)) - 1] = gt
                case.files.append(gt)
        # patientXXX_frameNN.nii.gz repeat frames of the 4-D volume: part of the case, not read
        case.files.extend(p for p in sorted(folder.glob("*_frame[0-9]*.nii*")) if p not in case.files)
        cases.append(case)
    return cases


def _mnms_table(src: Path, labels: Path | None) -> tuple[dict[str, dict[str, str]], list[Path]]:
    candidates = [labels] if labels is not None and labels.is_file() else sorted(src.rglob("*.csv"))
    for path in candidates:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if "External code" in (reader.fieldnames or []):
                return {row["External code"].strip(): row for row in reader}, [path]
    return {}, []


def find_mnms_cases(src: Path, labels: Path | None = None) -> tuple[list[NiftiCase], list[Path]]:
    table, metadata = _mnms_table(src, labels)
    cases = []
    for image in sorted(src.rglob("*_sa.nii*")):
        code = image.name.split("_sa.nii")[0]
        row = table.get(code, {})
        case = NiftiCase(dataset="mnms", code=code, image=image, files=[image])
        gt = sorted(image.parent.glob(f"{code}_sa_gt.nii*"))
        if gt:
            case.gt_4d = gt[0]
            case.files.append(gt[0])
        try:
            case.ed, case.es = int(row["ED"]), int(row["ES"])
        except (KeyError, ValueError):
            pass
        pathology = row.get("Pathology", "").strip()
        case.disease = pathology if pathology in DISEASES else None
        vendor = row.get("VendorName", "") or {"A": "siemens", "B": "philips", "C": "ge",
                                               "D": "canon"}.get(row.get("Vendor", "").strip(), "")
        case.vendor = vendor_label(vendor) if vendor else None
        cases.append(case)
    return cases, metadata


# ---------------------------------------------------------------- reading one case

def _load(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel

    image = cast("nibabel.Nifti1Image", nibabel.load(str(path)))
    return np.asanyarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms())


def _hospital_mask(case: NiftiCase, shape: tuple[int, ...]) -> tuple[np.ndarray | None, list[int]]:
    """Labels as (S, T, rows, cols) in MASK_VALUES and the labelled phases, or None."""
    X, Y, Z, T = shape
    lut = np.zeros(256, dtype=np.uint8)
    for source, value in (ACDC_LABELS if case.dataset == "acdc" else MNMS_LABELS).items():
        lut[source] = value
    mask = np.zeros((Z, T, Y, X), dtype=np.uint8)
    if case.gt_4d is not None:
        data, _ = _load(case.gt_4d)
        if data.shape != shape:
            raise ValueError("inconsistent_labels")
        phases = [t for t in (case.ed, case.es) if t is not None and 0 <= t < T] or \
            [t for t in range(T) if np.any(data[..., t])]
        for t in phases:
            mask[:, t] = lut[np.transpose(data[..., t], (2, 1, 0)).astype(np.uint8)]
        return (mask, sorted(set(phases))) if phases else (None, [])
    phases = []
    for t, path in sorted(case.gt.items()):
        data, _ = _load(path)
        if data.shape != shape[:3] or not 0 <= t < T:
            raise ValueError("inconsistent_labels")
        mask[:, t] = lut[np.transpose(data, (2, 1, 0)).astype(np.uint8)]
        phases.append(t)
    return (mask, phases) if phases else (None, [])


def build_case(case: NiftiCase, spacing_mm: float, crop_px: int
               ) -> tuple[np.ndarray, np.ndarray | None, list[int], dict]:
    """(images (S, T, crop, crop) float16, mask or None, labelled phases, info)."""
    data, zooms = _load(case.image)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ValueError("unreadable_nifti")
    X, Y, Z, T = data.shape
    spacing = (zooms[1], zooms[0])  # (row, col): axis 1 is the row
    images = np.empty((Z, T, crop_px, crop_px), dtype=np.float16)
    for z in range(Z):
        for t in range(T):
            frame = resample_image(np.asarray(data[:, :, z, t], dtype=np.float32).T, spacing,
                                   crop_px, spacing_mm)
            images[z, t] = normalise_intensity(frame)
    hospital, phases = _hospital_mask(case, data.shape)
    mask = None
    if hospital is not None:
        mask = np.zeros(images.shape, dtype=np.uint8)
        for z in range(Z):
            for t in phases:
                mask[z, t] = resample_mask(hospital[z, t], spacing, crop_px, spacing_mm)
    info = {"source": "nifti", "dataset": case.dataset,
            "pixel_spacing_mm": [round(spacing[0], 4), round(spacing[1], 4)], "matrix": [Y, X],
            "slice_spacing_mm": round(zooms[2], 3) if len(zooms) > 2 else None,
            "ed_phase": case.ed, "es_phase": case.es}
    if case.vendor:
        info["vendor"] = case.vendor
    return images, mask, phases, info


# ---------------------------------------------------------------- the run

def _store_case(store: LocalStore, pseudonymiser: Pseudonymiser, case: NiftiCase,
                options: IngestOptions) -> tuple[str, bool]:
    subject = pseudonymiser.subject(f"{case.dataset}:{case.code}", "")
    key = series_key(subject, pseudonymiser.uid(f"{case.dataset}/{case.code}/sa"))
    images, mask, phases, info = build_case(case, options.spacing_mm, options.crop_px)
    frames = [[s, t] for t in phases for s in range(images.shape[0])] if mask is not None else []
    record = SeriesRecord(key=key, array="", shape=[], sequence="cine", view="sax",
                          subject=subject, info=info, labeled_frames=sorted(frames),
                          classes={"sequence": "cine", "view": "sax"})
    written = commit_series(store, record, images, mask)
    if case.disease and store.manifest.subjects.get(subject, {}).get("disease") != case.disease:
        store.set_subject_labels(subject, {"disease": case.disease})
    return key, written


def ingest_nifti(options: IngestOptions, fmt: str) -> IngestSummary:
    """Ingest an ACDC (``fmt='acdc'``) or M&Ms (``fmt='mnms'``) folder into the store."""
    started = time.monotonic()
    store, secret = open_store(options)
    pseudonymiser = Pseudonymiser(secret)
    index = IntakeIndex.load(options.store)
    files = list_files(options.src, exclude=[options.store])
    if fmt == "acdc":
        cases, metadata = find_acdc_cases(options.src), list[Path]()
    else:
        cases, metadata = find_mnms_cases(options.src, options.labels)
    summary = IngestSummary(format=fmt)
    skips: Counter = Counter()
    used: set[Path] = set(metadata)
    keys = set()
    try:
        for case in cases:
            reason, key = _ingest_case(store, pseudonymiser, index, case, options, summary)
            if reason:
                skips[reason] += len(case.files) or 1
                continue
            keys.add(key)
            used.update(case.files)
    finally:
        index.save()
    skips["unused_file"] += sum(1 for f in files if f not in used and not _case_file(f, cases))
    summary.files_seen = len(files)
    summary.files_accepted = sum(1 for f in files if f in used)
    summary.add_skips(+skips)
    summary.series = len(keys)
    summary.subjects = len({store.manifest.series[k].subject for k in keys})
    summary.labels = {"series_with_mask": sum(1 for k in keys if store.manifest.series[k].mask),
                      "labeled_frames": sum(len(store.manifest.series[k].labeled_frames) for k in keys)}
    summary.seconds = round(time.monotonic() - started, 3)
    summary.files_per_second = round(summary.files_seen / max(summary.seconds, 1e-6), 1)
    summary.write(options.store)
    return summary


def _case_file(path: Path, cases: list[NiftiCase]) -> bool:
    return any(path in case.files for case in cases)


def _ingest_case(store: LocalStore, pseudonymiser: Pseudonymiser, index: IntakeIndex,
                 case: NiftiCase, options: IngestOptions, summary: IngestSummary) -> tuple[str, str]:
    """('', key) when the case is in the store, (reason, '') when it was skipped."""
    if not case.image.is_file():
        return "missing_image", ""
    fingerprints = sorted(file_fingerprint(pseudonymiser, options.src, f) for f in case.files)
    digest = pseudonymiser.fingerprint("|".join(fingerprints))
    previous = index.series.get(pseudonymiser.fingerprint(f"{case.dataset}/{case.code}"))
    if previous and previous.get("labels") == digest and store.has(previous.get("key", "")):
        summary.series_unchanged += 1
        return "", previous["key"]
    try:
        key, written = _store_case(store, pseudonymiser, case, options)
    except ValueError as exc:
        known = str(exc) in ("inconsistent_labels", "unreadable_nifti")
        return (str(exc) if known else "unreadable_nifti"), ""
    except Exception:  # noqa: BLE001 - one bad case never stops the others
        return "unreadable_nifti", ""
    summary.files_read += len(case.files)
    summary.series_written += int(written)
    summary.series_unchanged += int(not written)
    index.series[pseudonymiser.fingerprint(f"{case.dataset}/{case.code}")] = {
        "key": key, "labels": digest}
    return "", key
