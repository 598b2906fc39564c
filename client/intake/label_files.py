"""A node's label files (``--labels DIR``), mapped onto store series and store pixels.

Layout (keyed by the hospital's original UIDs)::

    series.csv      SeriesInstanceUID,StudyInstanceUID,sequence,view,lge_pathology,labeled_phases
    studies.csv     StudyInstanceUID,disease
    landmarks.csv   SOPInstanceUID,frame,landmark,row,col
    masks/<SeriesInstanceUID>.nii.gz   uint8 (Columns, Rows, S, T) = data[col, row, slice, phase]

UIDs go through the same pseudonymiser as the images, so labels meet their series by store UID
and no original UID is kept. Masks are resampled with nearest neighbour into the series' store
grid, landmarks mapped into store pixels (:mod:`client.intake.geometry`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from client.intake.deid import Pseudonymiser
from client.intake.geometry import point_to_store, resample_mask
from client.intake.series import BuiltSeries
from shared_model.errors import UserError
from shared_model.labels import (
    DISEASES,
    LANDMARKS,
    LGE_PATHOLOGY,
    MASK_VALUES,
    SEQUENCES,
    VIEWS,
    frame_key,
)

Frame2 = tuple[int, int]  # (slice, phase)
ALLOWED_MASK_VALUES = frozenset({0, *MASK_VALUES.values()})


class LabelFileError(UserError, ValueError):
    """A label folder that cannot be used at all (missing header columns); names file and fix."""


@dataclass
class SeriesLabels:
    """Labels for one series, in the hospital's frame grid (before preprocessing).

    ``mask_loader`` returns uint8 (S, T, rows, cols); ``labeled_frames`` are frames with every
    structure drawn, ``partial`` maps other drawn frames to the structures they have;
    ``landmarks`` is keyed by (store SOP UID, frame number; 0 for single-frame instances).
    """

    mask_loader: Callable[[], np.ndarray] | None = None
    labeled_frames: list[Frame2] = field(default_factory=list)
    labeled_phases: list[int] = field(default_factory=list)
    partial: dict[Frame2, tuple[str, ...]] = field(default_factory=dict)
    landmarks: dict[tuple[str, int], dict[str, tuple[float, float]]] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    digest: str = ""


@dataclass
class NodeLabels:
    """Everything a node's label sources say, by store UID.

    Landmarks are keyed by instance, and which series an instance belongs to is known only once
    its file is read, so they form one table that every built series looks its frames up in.
    """

    series: dict[str, SeriesLabels] = field(default_factory=dict)  # store series UID -> labels
    studies: dict[str, dict[str, str]] = field(default_factory=dict)  # store study UID -> labels
    landmarks: dict[tuple[str, int], dict[str, tuple[float, float]]] = field(default_factory=dict)
    landmark_sops: frozenset[str] = frozenset()  # hospital SOP UIDs landmarks.csv names
    landmarks_digest: str = ""
    problems: Counter = field(default_factory=Counter)

    def digest(self, series_uid: str) -> str:
        """What the labels of one series depend on; a change makes a re-run redo the series."""
        labels = self.series.get(series_uid)
        own = labels.digest if labels else ""
        if not own and not self.landmarks_digest:
            return ""
        return hashlib.sha256(f"{own}/{self.landmarks_digest}".encode()).hexdigest()[:32]


@dataclass
class AppliedLabels:
    """Labels of one built series in store coordinates, ready for a SeriesRecord."""

    mask: np.ndarray | None = None
    labeled_frames: list[list[int]] = field(default_factory=list)
    partial: dict[str, list[str]] = field(default_factory=dict)
    landmarks: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading the folder

def csv_rows(path: Path, required: tuple[str, ...],
             error: type[Exception] = LabelFileError) -> list[dict[str, str]]:
    """The rows of a CSV file (values stripped; no file: none); ``error`` names a missing column."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise error(f"{path}: missing column(s) {', '.join(missing)}; expected "
                        f"header {','.join(required)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _phases(text: str) -> list[int] | None:
    try:
        return sorted({int(p) for p in text.replace(",", ";").split(";") if p.strip()})
    except ValueError:
        return None


def _series_row(row: dict[str, str], labels: SeriesLabels, problems: Counter) -> None:
    for name, vocabulary in (("sequence", SEQUENCES), ("view", VIEWS),
                             ("lge_pathology", LGE_PATHOLOGY)):
        value = row.get(name, "")
        if value in vocabulary:
            labels.classes[name] = value
        elif value:
            problems[f"unknown_{name}"] += 1
    phases = _phases(row.get("labeled_phases", ""))
    if phases is None or any(p < 0 for p in phases):
        problems["bad_labeled_phases"] += 1
    else:
        labels.labeled_phases = phases


def _mask_loader(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import nibabel

        data = np.asarray(cast("nibabel.Nifti1Image", nibabel.load(str(path))).dataobj)
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise ValueError("mask_shape_mismatch")
        return np.ascontiguousarray(np.transpose(data, (2, 3, 1, 0)))  # (S, T, rows, cols)
    return load


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_label_folder(folder: str | Path, pseudonymiser: Pseudonymiser) -> NodeLabels:
    """Read ``series.csv``, ``studies.csv``, ``landmarks.csv`` and ``masks/`` (each optional)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LabelFileError(f"label folder {folder} does not exist")
    out = NodeLabels()
    series_rows = csv_rows(folder / "series.csv", ("SeriesInstanceUID",))
    sources: dict[str, dict[str, Any]] = defaultdict(dict)
    for row in series_rows:
        uid = pseudonymiser.uid(row["SeriesInstanceUID"])
        labels = out.series.setdefault(uid, SeriesLabels())
        _series_row(row, labels, out.problems)
        sources[uid]["row"] = {k: row.get(k, "") for k in
                               ("sequence", "view", "lge_pathology", "labeled_phases")}
    for path in sorted((folder / "masks").glob("*.nii*")) if (folder / "masks").is_dir() else []:
        uid = pseudonymiser.uid(path.name.split(".nii")[0])
        labels = out.series.setdefault(uid, SeriesLabels())
        labels.mask_loader = _mask_loader(path)
        sources[uid]["mask"] = _file_digest(path)
    _read_landmarks(folder / "landmarks.csv", pseudonymiser, out)
    for row in csv_rows(folder / "studies.csv", ("StudyInstanceUID", "disease")):
        if row["disease"] in DISEASES:
            out.studies[pseudonymiser.uid(row["StudyInstanceUID"])] = {"disease": row["disease"]}
        elif row["disease"]:
            out.problems["unknown_disease"] += 1
    for uid, labels in out.series.items():
        labels.digest = hashlib.sha256(json.dumps(sources[uid], sort_keys=True).encode()).hexdigest()
    return out


def _read_landmarks(path: Path, pseudonymiser: Pseudonymiser, out: NodeLabels) -> None:
    rows = csv_rows(path, ("SOPInstanceUID", "frame", "landmark", "row", "col"))
    sops = set()
    for row in rows:
        try:
            frame = int(row["frame"]) if row["frame"] else 0
            point = (float(row["row"]), float(row["col"]))
        except ValueError:
            out.problems["bad_landmark_row"] += 1
            continue
        if row["landmark"] not in LANDMARKS or not all(math.isfinite(v) for v in point):
            out.problems["bad_landmark_row"] += 1
            continue
        sops.add(row["SOPInstanceUID"])
        out.landmarks.setdefault((pseudonymiser.uid(row["SOPInstanceUID"]), frame), {})[
            row["landmark"]] = point
    out.landmark_sops = frozenset(sops)
    if out.landmarks:
        canonical = sorted((k[0], k[1], sorted(v.items())) for k, v in out.landmarks.items())
        out.landmarks_digest = hashlib.sha256(json.dumps(canonical).encode()).hexdigest()


# ---------------------------------------------------------------- applying to a built series

def _store_mask(built: BuiltSeries, labels: SeriesLabels, frames: list[Frame2], crop_px: int,
                spacing_mm: float, problems: Counter) -> np.ndarray | None:
    try:
        hospital = labels.mask_loader() if labels.mask_loader else None
    except Exception:  # noqa: BLE001 - a damaged label file costs its labels, not the ingest
        problems["unreadable_mask"] += 1
        return None
    if hospital is None:
        return None
    S, T = len(built.grid), len(built.grid[0])
    if hospital.shape != (S, T, *built.matrix):
        problems["mask_shape_mismatch"] += 1
        return None
    if not set(np.unique(hospital).tolist()) <= ALLOWED_MASK_VALUES:
        problems["mask_values_outside_vocabulary"] += 1
        return None
    out = np.zeros((S, T, crop_px, crop_px), dtype=np.uint8)
    for s, t in frames:
        out[s, t] = resample_mask(hospital[s, t], built.spacing, crop_px, spacing_mm)
    return out


def _store_landmarks(built: BuiltSeries, table: dict[tuple[str, int], dict[str, tuple[float, float]]],
                     crop_px: int, spacing_mm: float,
                     problems: Counter) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for s, row in enumerate(built.grid):
        for t, frame in enumerate(row):
            if not frame.sop_ref:
                continue
            points = table.get((frame.sop_ref, frame.frame_number))
            if points is None and frame.frame_number <= 1:  # "frame" left empty or given as 1
                points = table.get((frame.sop_ref, 1 - frame.frame_number))
            for name, (r, c) in (points or {}).items():
                rr, cc = point_to_store(r, c, frame.matrix, frame.spacing, crop_px, spacing_mm)
                if -0.5 <= rr <= crop_px - 0.5 and -0.5 <= cc <= crop_px - 0.5:
                    out.setdefault(frame_key(s, t), {})[name] = [round(rr, 3), round(cc, 3)]
                else:
                    problems["landmark_outside_crop"] += 1
    return out


def apply_labels(built: BuiltSeries, node: NodeLabels, crop_px: int,
                 spacing_mm: float) -> AppliedLabels:
    """The labels of ``built`` in store coordinates; problems are counted on ``node``."""
    labels = node.series.get(built.series_uid, SeriesLabels())
    S, T = len(built.grid), len(built.grid[0])
    frames = list(labels.labeled_frames) or [(s, t) for t in labels.labeled_phases for s in range(S)]
    if any(not (0 <= s < S and 0 <= t < T) for s, t in [*frames, *labels.partial]):
        node.problems["labeled_frame_outside_series"] += 1
        frames, partial = [], {}
    else:
        partial = dict(labels.partial)
    mask = _store_mask(built, labels, sorted({*frames, *partial}), crop_px, spacing_mm, node.problems)
    if labels.mask_loader is not None and not frames and not partial:
        node.problems["mask_without_labeled_phases"] += 1
    applied = AppliedLabels(classes=dict(labels.classes), info=dict(labels.info))
    if mask is not None and (frames or partial):
        applied.mask = mask
        applied.labeled_frames = [[s, t] for s, t in sorted(frames)]
        applied.partial = {frame_key(s, t): list(names) for (s, t), names in sorted(partial.items())}
    if node.landmarks:
        applied.landmarks = _store_landmarks(built, node.landmarks, crop_px, spacing_mm, node.problems)
    return applied
