"""Sunnybrook Cardiac Data (SCD): cine SAX DICOM plus manual LV contours -> store with masks.

Layout (see the data folder's README)::

    dicoms/<patient>/<InstanceNumber>.dcm
    contours/<original id>/i-contours/IM-0001-NNNN-icontour-manual.txt   endocardium
    contours/<original id>/o-contours/IM-0001-NNNN-ocontour-manual.txt   epicardium
    link.csv    patient_id,original_id

NNNN is the InstanceNumber *in the header* of the contoured image (files happen to be named by
it, the intake does not rely on that). Each contour line is ``x y`` = (column, row) pixel
coordinates of that image. Inside the i-contour is LV blood pool (``lv_blood``), between i and o
the LV myocardium (``lv_myo``). SCD draws the epicardium at end-diastole only: frames with both
contours are fully labelled (``labeled_frames``), frames with the endocardium only (end-systole)
are ``partial_labels`` with ``lv_blood``. ED is the phase of the epicardial contours, ES the other
contoured phase; both go to the series' info as ``ed_phase``/``es_phase``. Pixel spacing comes
from each series' header (SCD0000301 has 1.289 mm pixels, the others 1.367 mm).

The images go through the ordinary DICOM intake (de-identification included); the contours
become labels keyed by the pseudonymised series UID.
"""

from __future__ import annotations

import csv
import hashlib
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom

from client.intake.deid import Pseudonymiser, quiet_pydicom
from client.intake.geometry import grid_indices, slice_normal
from client.intake.label_files import LabelFileError, NodeLabels, SeriesLabels, csv_rows
from client.intake.pipeline import IngestOptions, IntakeError, open_store, run_dicom_intake
from client.intake.reading import instance_geometry
from client.intake.summary import IngestSummary
from shared_model.labels import MASK_VALUES

_CONTOUR_NAME = re.compile(r"IM-\d+-(\d+)-([io])contour-manual\.txt$")
# SCD groups (from the original id) -> ACDC disease classes where they correspond.
_GROUP_DISEASE = (("SC-HF-I-", "MINF"), ("SC-HYP-", "HCM"), ("SC-N-", "NOR"))


def rasterise_polygon(points_xy: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Pixels whose centre (integer row, col) lies inside a closed polygon of (x=col, y=row).

    Even-odd scanlines: exact for pixel centres, no dependency beyond numpy.
    """
    x = np.asarray(points_xy[:, 0], dtype=np.float64)
    y = np.asarray(points_xy[:, 1], dtype=np.float64)
    x0, y0, x1, y1 = x, y, np.roll(x, -1), np.roll(y, -1)
    mask = np.zeros((rows, cols), dtype=bool)
    for r in range(max(0, int(np.floor(y.min()))), min(rows, int(np.ceil(y.max())) + 1)):
        crossing = ((y0 <= r) & (y1 > r)) | ((y1 <= r) & (y0 > r))
        if not crossing.any():
            continue
        xs = np.sort(x0[crossing] + (r - y0[crossing]) * (x1[crossing] - x0[crossing])
                     / (y1[crossing] - y0[crossing]))
        for a, b in zip(xs[::2], xs[1::2]):
            lo, hi = max(0, int(np.ceil(a))), min(cols, int(np.ceil(b)))
            mask[r, lo:hi] = True
    return mask


def polygon_area(points_xy: np.ndarray) -> float:
    """Shoelace area in pixels² (for checks: compare with a mask's pixel count)."""
    x, y = points_xy[:, 0], points_xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def read_contour(path: Path) -> np.ndarray:
    """(N, 2) array of (x = column, y = row); :class:`LabelFileError` naming the file if damaged."""
    try:
        with warnings.catch_warnings():  # an empty file is reported below, not as a warning
            warnings.simplefilter("ignore", UserWarning)
            points = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:  # numpy: ValueError on text that is not numbers
        raise LabelFileError(f"{path}: unreadable contour ({exc}); expected lines of 'x y' "
                             "pixel coordinates") from exc
    if points.shape[1] != 2 or len(points) < 3 or not np.isfinite(points).all():
        raise LabelFileError(f"{path}: expected at least 3 lines of 'x y' pixel coordinates")
    return points


def _headers(folder: Path) -> dict[int, dict]:
    """InstanceNumber -> series UID, study UID, matrix and the intake's geometry of each image."""
    out: dict[int, dict] = {}
    with quiet_pydicom():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                geometry = instance_geometry(ds)[0]
                out[int(ds.InstanceNumber)] = dict(
                    series=str(ds.SeriesInstanceUID), study=str(ds.StudyInstanceUID),
                    matrix=(int(ds.Rows), int(ds.Columns)), geometry=geometry)
            except Exception:  # noqa: BLE001 - the intake itself reports unreadable files
                continue
    return out


def _grid(headers: dict[int, dict]) -> dict[int, tuple[int, int]]:
    """InstanceNumber -> (slice, phase) exactly as the intake orders the series."""
    instances = sorted(headers)
    geometries = [headers[i]["geometry"] for i in instances]
    normal = slice_normal(geometries[0].orientation)
    along = np.array([float(np.dot(g.position, normal)) for g in geometries])
    slices, phases = grid_indices(along, [(g.trigger_ms, g.order) for g in geometries])
    return {i: (int(s), int(t)) for i, s, t in zip(instances, slices, phases)}


def _contours(folder: Path) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {"i": {}, "o": {}}
    for path in sorted(folder.rglob("*contour-manual.txt")):
        match = _CONTOUR_NAME.search(path.name)
        if match:
            found[match.group(2)][int(match.group(1))] = path
    return found


def _series_labels(headers: dict[int, dict], contours: dict[str, dict[int, Path]],
                   problems: Counter) -> SeriesLabels:
    """One patient's contours as a hospital-grid mask, complete/partial frames, ED/ES phases."""
    grid = _grid(headers)
    S = 1 + max(s for s, _ in grid.values())
    T = 1 + max(t for _, t in grid.values())
    rows, cols = next(iter(headers.values()))["matrix"]
    mask = np.zeros((S, T, rows, cols), dtype=np.uint8)
    labels = SeriesLabels(classes={"sequence": "cine", "view": "sax"})
    ed_phases: Counter[int] = Counter()
    es_phases: Counter[int] = Counter()
    for instance, path in contours["i"].items():
        if instance not in grid:
            problems["contour_without_image"] += 1
            continue
        s, t = grid[instance]
        outer = contours["o"].get(instance)
        try:  # a damaged contour file costs its frame, like the intake's unreadable masks
            blood = rasterise_polygon(read_contour(path), rows, cols)
            epi = None if outer is None else rasterise_polygon(read_contour(outer), rows, cols)
        except LabelFileError:
            problems["unreadable_contour"] += 1
            continue
        if epi is not None:
            mask[s, t][epi & ~blood] = MASK_VALUES["lv_myo"]
            labels.labeled_frames.append((s, t))
            ed_phases[t] += 1
        else:
            labels.partial[(s, t)] = ("lv_blood",)
            es_phases[t] += 1
        mask[s, t][blood] = MASK_VALUES["lv_blood"]
    problems["epicardium_without_endocardium"] += len(set(contours["o"]) - set(contours["i"]))
    labels.mask_loader = lambda: mask
    labels.info = {"dataset": "sunnybrook"}
    if ed_phases and es_phases:
        labels.info.update(ed_phase=ed_phases.most_common(1)[0][0],
                           es_phase=es_phases.most_common(1)[0][0])
    return labels


def _digest(paths: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _links(path: Path) -> list[tuple[str, str]]:
    """(patient folder, original id) per row of ``link.csv``; :class:`IntakeError` if damaged."""
    columns = ("patient_id", "original_id")
    if not path.is_file():
        raise IntakeError(f"{path}: missing; the Sunnybrook folder needs link.csv with header "
                          f"{','.join(columns)}")
    try:
        rows = csv_rows(path, columns, IntakeError)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IntakeError(f"{path}: not a readable CSV ({exc}); expected header "
                          f"{','.join(columns)}") from exc
    links = []
    for line, row in enumerate(rows, start=2):
        values = [row.get(c, "") for c in columns]
        if not all(values):
            empty = [c for c, v in zip(columns, values) if not v]
            raise IntakeError(f"{path}, line {line}: no {', '.join(empty)}; every row needs "
                              f"{','.join(columns)}")
        links.append((values[0], values[1]))
    return links


def sunnybrook_labels(root: Path, pseudonymiser: Pseudonymiser,
                      patients: set[str] | None = None) -> NodeLabels:
    """Contours of every patient in ``link.csv`` (or of ``patients``, folder names) as labels
    keyed by store series UID."""
    out = NodeLabels()
    for patient, original in _links(root / "link.csv"):
        if patients is not None and patient not in patients:
            continue
        headers = _headers(root / "dicoms" / patient)
        contours = _contours(root / "contours" / original)
        if not headers or not contours["i"]:
            out.problems["patient_without_images_or_contours"] += 1
            continue
        series = {h["series"] for h in headers.values()}
        if len(series) != 1:
            out.problems["patient_with_several_series"] += 1
            continue
        labels = _series_labels(headers, contours, out.problems)
        labels.digest = _digest([*contours["i"].values(), *contours["o"].values()], original)
        out.series[pseudonymiser.uid(series.pop())] = labels
        disease = next((d for prefix, d in _GROUP_DISEASE if original.startswith(prefix)), None)
        if disease:
            study = next(iter(headers.values()))["study"]
            out.studies[pseudonymiser.uid(study)] = {"disease": disease}
    out.problems = Counter({k: v for k, v in out.problems.items() if v})
    return out


def ingest_sunnybrook(options: IngestOptions) -> IngestSummary:
    """Ingest a Sunnybrook folder: its DICOM through the intake, its contours as labels."""
    root = options.src
    missing = [name for name in ("dicoms", "contours", "link.csv") if not (root / name).exists()]
    if missing:
        raise IntakeError(f"{root} is not a Sunnybrook folder: missing {', '.join(missing)} "
                          "(expected dicoms/, contours/ and link.csv)")
    opened = open_store(options)
    taken = {patient for patient, original in _links(root / "link.csv")
             if options.takes_patient(patient, original)}
    labels = sunnybrook_labels(root, Pseudonymiser(opened[1]), taken)
    left_out = tuple(p for p in sorted((root / "dicoms").iterdir())
                     if p.is_dir() and p.name not in taken)
    return run_dicom_intake(options, labels, fmt="sunnybrook", scan_root=root / "dicoms",
                            opened=opened, excluded_folders=left_out)
