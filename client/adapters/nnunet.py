"""nnU-Net v2 / Medical Segmentation Decathlon raw datasets -> store series with masks.

Layout (nnU-Net v2 raw)::

    dataset.json                  channel_names, labels {name: value}, file_ending
    imagesTr/<case>_0000.nii.gz   channel 0 of each training case (2-D or 3-D)
    labelsTr/<case>.nii.gz        the case's label map (same shape and affine)
    imagesTs/<case>_0000.nii.gz   optional test cases (images only)
    cases.csv                     optional: case, patient[, group | disease]

NIfTI axis 0 is the image column and axis 1 the row, so a frame is ``data[:, :, z].T``; the
in-plane spacing comes from the header zooms. Every case becomes one series of ``Z`` slices and
one phase. Label names map onto the project's vocabulary (:data:`DEFAULT_LABEL_NAMES`, extended
or overridden with ``--label-map NAME=structure``); each labelled frame records the structures
the dataset draws, so a dataset that labels only the LV blood pool gives partial labels that a
task uses for that structure alone. Case ids are pseudonymised like DICOM patient IDs (a
hospital's case names may hold identifiers); no header text is kept. Only channel 0 is read:
the other channels of a multi-channel dataset are counted as ``unused_file``.
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
from client.intake.deid import Pseudonymiser, series_key
from client.intake.geometry import resample_image, resample_mask
from client.intake.pipeline import IngestOptions, IntakeError, commit_series, open_store
from client.intake.scan import list_files
from client.intake.summary import IngestSummary
from client.store import LocalStore, SeriesRecord, normalise_intensity
from shared_model.files import read_json
from shared_model.labels import MASK_VALUES, frame_key

# Label names of common cardiac datasets -> the store's structures. Keys are normalised with
# :func:`normalise_label_name` (lower case, words joined by "_").
DEFAULT_LABEL_NAMES: dict[str, str] = {
    **{name: name for name in MASK_VALUES},
    "lv_blood_pool": "lv_blood", "lv": "lv_blood", "lvbp": "lv_blood", "lv_cavity": "lv_blood",
    "left_ventricle": "lv_blood", "left_ventricular_cavity": "lv_blood", "lv_endo": "lv_blood",
    "myo": "lv_myo", "myocardium": "lv_myo", "lv_myocardium": "lv_myo", "lvm": "lv_myo",
    "rv": "rv_blood", "rv_blood_pool": "rv_blood", "right_ventricle": "rv_blood",
    "rv_cavity": "rv_blood",
    "la": "la_blood", "left_atrium": "la_blood", "ra": "ra_blood", "right_atrium": "ra_blood",
    "scar": "scar", "infarct": "scar", "mi": "scar", "lge": "scar",
}
# Pathology groups named in a cases.csv -> the disease classes of task 9 where they correspond.
GROUP_DISEASES: dict[str, str] = {
    "heart_failure_with_infarct": "MINF", "minf": "MINF", "hypertrophy": "HCM", "hcm": "HCM",
    "normal": "NOR", "nor": "NOR", "dcm": "DCM", "arv": "ARV",
}
MAX_VOXELS = 64_000_000  # larger volumes are skipped as absurd
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def normalise_label_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def parse_label_map(items: list[str] | None) -> dict[str, str]:
    """``NAME=structure`` pairs (a comma-separated string or several) -> a mapping."""
    mapping: dict[str, str] = {}
    for item in items or []:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            name, sep, structure = pair.partition("=")
            if not sep or structure.strip() not in (*MASK_VALUES, "ignore"):
                raise IntakeError(f"--label-map '{pair}': expected NAME=structure with structure "
                                  f"one of {', '.join(MASK_VALUES)} or 'ignore'")
            mapping[normalise_label_name(name)] = structure.strip()
    return mapping


@dataclass
class NnunetDataset:
    """What dataset.json says, resolved against the label vocabulary."""

    root: Path
    file_ending: str
    values: dict[int, str]  # dataset label value -> store structure (background and ignored out)
    channels: int
    sequence: str
    view: str
    patients: dict[str, str] = field(default_factory=dict)  # case -> patient (cases.csv)
    groups: dict[str, str] = field(default_factory=dict)  # case -> group (cases.csv)
    diseases: dict[str, str] = field(default_factory=dict)  # patient -> disease class

    @property
    def structures(self) -> list[str]:
        return sorted(set(self.values.values()))


def read_dataset(src: Path, label_map: dict[str, str] | None = None,
                 sequence: str | None = None, view: str | None = None) -> NnunetDataset:
    """Parse ``dataset.json`` (and ``cases.csv``); :class:`IntakeError` naming what is wrong."""
    path = src / "dataset.json"
    if not path.is_file():
        raise IntakeError(f"{src}: no dataset.json; an nnU-Net raw dataset holds dataset.json, "
                          "imagesTr/ and labelsTr/")
    meta = read_json(path, IntakeError, "fix or re-export the dataset's dataset.json")
    if not isinstance(meta, dict):
        raise IntakeError(f"{path}: must hold a JSON object with 'labels' and 'file_ending'")
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise IntakeError(f"{path}: field 'labels' must map label names to values")
    names = {**DEFAULT_LABEL_NAMES, **(label_map or {})}
    values: dict[int, str] = {}
    for name, value in labels.items():
        if not isinstance(value, int):
            raise IntakeError(f"{path}: label '{name}' has value {value!r}; region-based labels "
                              "(lists of values) are not supported")
        key = normalise_label_name(name)
        if value == 0 or key == "background":
            continue
        structure = names.get(key)
        if structure is None:
            raise IntakeError(f"{path}: label '{name}' is not a known cardiac structure; map it "
                              f"with --label-map '{name}=<structure>' (one of "
                              f"{', '.join(MASK_VALUES)}) or '{name}=ignore'")
        if structure != "ignore":
            values[value] = structure
    channel_names = meta.get("channel_names") or meta.get("modality") or {"0": ""}
    description = " ".join(str(v) for v in channel_names.values()).lower()
    dataset = NnunetDataset(
        root=src, file_ending=str(meta.get("file_ending", ".nii.gz")), values=values,
        channels=len(channel_names),
        sequence=sequence or _sequence_of(description),
        view=view or ("4ch" if {"la_blood", "ra_blood"} & set(values.values()) else "sax"))
    dataset.patients, dataset.groups, dataset.diseases = _read_cases(src / "cases.csv")
    return dataset


def _sequence_of(description: str) -> str:
    if any(word in description for word in ("lge", "late", "psir")):
        return "lge"
    if "t1" in description and "map" in description:
        return "t1_map"
    if "t2" in description and "map" in description:
        return "t2_map"
    return "cine"  # cardiac segmentation datasets are cine unless their channel says otherwise


def _read_cases(path: Path) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    if not path.is_file():
        return {}, {}, {}
    patients, groups, diseases = {}, {}, {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "case" not in (reader.fieldnames or []):
            raise IntakeError(f"{path}: expected a header with a 'case' column (case, patient, "
                              "group)")
        for row in reader:
            case, patient = (row.get("case") or "").strip(), (row.get("patient") or "").strip()
            if not case:
                continue
            patients[case] = patient or case
            groups[case] = (row.get("group") or "").strip()
            label = normalise_label_name(row.get("disease") or row.get("group") or "")
            if label in GROUP_DISEASES:
                diseases[patients[case]] = GROUP_DISEASES[label]
    return patients, groups, diseases


@dataclass
class NnunetCase:
    case: str
    image: Path
    label: Path | None
    files: list[Path]


def find_cases(dataset: NnunetDataset) -> list[NnunetCase]:
    """Every case with a channel-0 image in imagesTr/ or imagesTs/ (labels from labelsTr/)."""
    ending = dataset.file_ending
    cases = []
    for folder in ("imagesTr", "imagesTs"):
        for image in sorted((dataset.root / folder).glob(f"*_0000{ending}")):
            case = image.name[: -len(ending)].rsplit("_", 1)[0]
            label = dataset.root / "labelsTr" / f"{case}{ending}" if folder == "imagesTr" else None
            label = label if label is not None and label.is_file() else None
            others = sorted(image.parent.glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
            files = [image] + ([label] if label else [])
            cases.append(NnunetCase(case, image, label, files + [p for p in others if p != image]))
    return cases


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(data with at least 3 axes, affine, zooms); ValueError('unreadable_nifti') if damaged."""
    import nibabel

    try:
        image = cast("nibabel.Nifti1Image", nibabel.load(str(path)))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise ValueError("unreadable_nifti") from exc
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim not in (3, 4) or data.size == 0 or data.size > MAX_VOXELS:
        raise ValueError("absurd_dimensions")
    return data, np.asarray(image.affine, dtype=np.float64), tuple(
        float(z) for z in image.header.get_zooms())


def build_case(dataset: NnunetDataset, case: NnunetCase, spacing_mm: float, crop_px: int
               ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(images (Z, 1, crop, crop), mask or None, info) on the store grid."""
    data, _, zooms = load_nifti(case.image)
    if data.ndim == 4:  # a 4-D image: the first time point (nnU-Net datasets are 2-D/3-D)
        data = data[..., 0]
    if not np.all(np.isfinite(data)):
        raise ValueError("unreadable_nifti")
    spacing = (zooms[1], zooms[0])  # (row, col): axis 1 is the row
    if min(spacing) <= 0:
        raise ValueError("missing_geometry")
    X, Y, Z = data.shape
    images = np.stack([normalise_intensity(resample_image(
        np.asarray(data[:, :, z], dtype=np.float32).T, spacing, crop_px, spacing_mm))
        for z in range(Z)])[:, None]
    mask = None
    if case.label is not None:
        labels, _, _ = load_nifti(case.label)
        if labels.ndim == 4:
            labels = labels[..., 0]
        if labels.shape != data.shape:
            raise ValueError("inconsistent_labels")
        lut = np.zeros(max(256, int(labels.max()) + 1), dtype=np.uint8)
        known = set(dataset.values) | {0}
        if not set(np.unique(labels).astype(int).tolist()) <= known:
            raise ValueError("unknown_label_values")
        for value, structure in dataset.values.items():
            lut[value] = MASK_VALUES[structure]
        mask = np.stack([resample_mask(lut[np.asarray(labels[:, :, z]).astype(np.int64).T], spacing,
                                       crop_px, spacing_mm) for z in range(Z)])[:, None]
    info = {"source": "nnunet", "pixel_spacing_mm": [round(spacing[0], 4), round(spacing[1], 4)],
            "matrix": [Y, X], "slice_spacing_mm": round(zooms[2], 3) if len(zooms) > 2 else None,
            "label_structures": dataset.structures}
    return images.astype(np.float16), mask, info


def _record(dataset: NnunetDataset, subject: str, key: str, images: np.ndarray,
            mask: np.ndarray | None, info: dict) -> SeriesRecord:
    """Labelled frames are partial when the dataset draws fewer structures than its view has."""
    record = SeriesRecord(key=key, array="", shape=[], sequence=dataset.sequence, view=dataset.view,
                          subject=subject, info=info,
                          classes={"sequence": dataset.sequence, "view": dataset.view})
    if mask is not None:
        frames = [(s, 0) for s in range(images.shape[0])]
        if set(dataset.structures) >= VIEW_STRUCTURES.get(dataset.view, set(dataset.structures)):
            record.labeled_frames = [[s, t] for s, t in frames]
        else:
            record.partial_labels = {frame_key(s, t): dataset.structures for s, t in frames}
    return record


# The structures a complete label of each view draws: fewer makes a frame a partial label.
VIEW_STRUCTURES: dict[str, set[str]] = {
    "sax": {"lv_blood", "lv_myo", "rv_blood"},
    "4ch": {"lv_blood", "lv_myo", "rv_blood", "la_blood", "ra_blood"},
}


def ingest_nnunet(options: IngestOptions, label_map: dict[str, str] | None = None,
                  sequence: str | None = None, view: str | None = None) -> IngestSummary:
    """Ingest an nnU-Net v2 raw dataset folder into the store."""
    started = time.monotonic()
    dataset = read_dataset(options.src, label_map, sequence, view)
    store, secret = open_store(options)
    pseudonymiser = Pseudonymiser(secret)
    index = IntakeIndex.load(options.store)
    files = list_files(options.src, exclude=[options.store])
    found = find_cases(dataset)
    cases = [c for c in found if options.takes_patient(
        dataset.patients.get(c.case, c.case), group=dataset.groups.get(c.case, ""))]
    summary = IngestSummary(format="nnunet")
    skips: Counter = Counter()
    skips["patient_not_selected"] = sum(1 + (c.label is not None) for c in found if c not in cases)
    accepted = {p for p in (options.src / "dataset.json", options.src / "cases.csv") if p.is_file()}
    keys: set[str] = set()
    try:
        for case in cases:
            reason, key = _ingest_case(store, pseudonymiser, index, dataset, case, options,
                                       summary)
            pair = [case.image] + ([case.label] if case.label else [])
            if reason:
                skips[reason] += len(pair)
            else:
                keys.add(key)
                accepted.update(pair)
    finally:
        index.save()
    skipped_pairs = sum(skips.values())
    skips["unused_file"] += len(files) - len(accepted & set(files)) - skipped_pairs
    summary.files_seen = len(files)
    summary.add_skips(+skips)
    summary.files_accepted = len(accepted & set(files))
    labelled = {case.label for case in cases if case.label}
    orphans = sum(1 for p in (options.src / "labelsTr").glob(f"*{dataset.file_ending}")
                  if p not in labelled)
    summary.series = len(keys)
    summary.subjects = len({store.manifest.series[k].subject for k in keys})
    records = [store.manifest.series[k] for k in keys]
    summary.labels = {"series_with_mask": sum(1 for r in records if r.mask),
                      "labeled_frames": sum(len(r.labeled_frames) for r in records),
                      "partially_labeled_frames": sum(len(r.partial_labels) for r in records),
                      "structures": dataset.structures}
    summary.label_problems = {"label_without_image": orphans} if orphans else {}
    summary.seconds = round(time.monotonic() - started, 3)
    summary.files_per_second = round(summary.files_seen / max(summary.seconds, 1e-6), 1)
    summary.write(options.store)
    return summary


def _ingest_case(store: LocalStore, pseudonymiser: Pseudonymiser, index: IntakeIndex,
                 dataset: NnunetDataset, case: NnunetCase, options: IngestOptions,
                 summary: IngestSummary) -> tuple[str, str]:
    """('', key) when the case is in the store, (reason, '') when it was skipped."""
    patient = dataset.patients.get(case.case, case.case)
    fingerprints = sorted(file_fingerprint(pseudonymiser, options.src, f) for f in case.files[:2])
    digest = pseudonymiser.fingerprint("|".join(fingerprints + dataset.structures))
    slot = pseudonymiser.fingerprint(f"nnunet/{case.case}")
    previous = index.series.get(slot)
    if previous and previous.get("labels") == digest and store.has(previous.get("key", "")):
        summary.series_unchanged += 1
        return "", previous["key"]
    subject = pseudonymiser.subject(f"nnunet:{patient}", "")
    key = series_key(subject, pseudonymiser.uid(f"nnunet/{case.case}"))
    try:
        images, mask, info = build_case(dataset, case, options.spacing_mm, options.crop_px)
    except ValueError as exc:
        reason = str(exc)
        return (reason if reason in _CASE_REASONS else "unreadable_nifti"), ""
    written = commit_series(store, _record(dataset, subject, key, images, mask, info), images, mask)
    disease = dataset.diseases.get(patient)
    if disease and store.manifest.subjects.get(subject, {}).get("disease") != disease:
        store.set_subject_labels(subject, {"disease": disease})
    summary.files_read += len(case.files[:2])
    summary.series_written += int(written)
    summary.series_unchanged += int(not written)
    index.series[slot] = {"key": key, "labels": digest}
    return "", key


_CASE_REASONS = ("unreadable_nifti", "inconsistent_labels", "unknown_label_values",
                 "absurd_dimensions", "missing_geometry")
