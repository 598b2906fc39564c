"""A synthetic multi-site CMR cohort, written as each hospital's DICOM export plus its labels.

``fedcmr-sim cohort --sites N --subjects-per-site M --out DIR --seed S`` writes::

    DIR/cohort.json                 {"format": "fedcmr-cohort", "version": 1, "seed": S,
                                     "sites": [{"name": "site-0", "vendor": ..., "model": ...,
                                                "field_strength_t": ..., "pixel_spacing_mm": ...,
                                                "matrix": [rows, cols], "slice_thickness_mm": ...,
                                                "spacing_between_slices_mm": ...,
                                                "cine_phases": ..., "enhanced_multiframe": ...,
                                                "subjects": n, "disease_mix": {...},
                                                "diseases": {disease: count}}, ...]}
    DIR/site-<i>/dicom/...          the PACS-like export (only DICOM files; nested hex folders,
                                    extension-less hex names; layout differs between sites)
    DIR/site-<i>/planted_phi.json   every PHI string planted in that site's headers (a list)
    DIR/site-<i>/labels/series.csv  SeriesInstanceUID,StudyInstanceUID,sequence,view,
                                    lge_pathology,labeled_phases
    DIR/site-<i>/labels/studies.csv StudyInstanceUID,disease
    DIR/site-<i>/labels/landmarks.csv SOPInstanceUID,frame,landmark,row,col
    DIR/site-<i>/labels/masks/<SeriesInstanceUID>.nii.gz

One study per subject, one DICOM series per acquisition: cine 2CH, 4CH, 3CH (one slice each),
cine SAX (evenly spaced, base to apex), first-pass perfusion (3 SAX slices), native T1 map and
T2 map (3 evenly spaced SAX slices), T2-weighted dark-blood STIR SAX, LGE SAX. The series of a
study share StudyInstanceUID and FrameOfReferenceUID; ImagePositionPatient /
ImageOrientationPatient are the real planes through one 3-D heart (LPS mm).

- ``sequence`` is one of ``shared_model.labels.SEQUENCES``, ``view`` one of ``VIEWS``;
  ``lge_pathology`` is ``scar``/``no_scar`` on LGE series and empty otherwise; ``labeled_phases``
  lists ";"-separated 0-based phase indices (TriggerTime order) whose frames carry masks on every
  slice (cine: ``0;k`` for ED and the frame closest to end-systole; single-phase series: ``0``),
  empty when the series has no mask file.
- ``disease`` is one of ``shared_model.labels.DISEASES`` (NOR, DCM, HCM, MINF, ARV); LGE shows
  scar exactly in MINF studies.
- Landmarks: ``frame`` is the 1-based frame number inside an Enhanced MR multi-frame instance
  and empty for single-frame images; ``row``/``col`` are float pixel coordinates of that image,
  0-based, pixel centres at integers. SAX cine: ``rv_insertion_anterior``/``_inferior`` on the
  labelled frames of every slice whose RV touches the septum. LAX cine: ``mitral_hinge_1`` (the
  hinge at the smaller column: septal in 4CH, inferior in 2CH, anterior/aortic in 3CH),
  ``mitral_hinge_2`` and ``lv_apex`` (epicardial apex) on the labelled frames.
- Masks: uint8 NIfTI, data shape (Columns, Rows, S, T) = data[col, row, slice, phase]; slices in
  increasing position along n = row cosines x column cosines (ImageOrientationPatient), phases
  in increasing TriggerTime; values from ``shared_model.labels.MASK_VALUES``; frames outside
  ``labeled_phases`` are all zero; the affine maps voxels to RAS mm (LPS with x, y negated), its
  third column is the step between slices (SliceThickness along n for single-slice series).
  Structures: cine SAX lv_blood, lv_myo, rv_blood; cine 4CH lv_blood, lv_myo, rv_blood,
  la_blood, ra_blood; 2CH lv_blood, lv_myo, la_blood; 3CH lv_blood, lv_myo, la_blood and
  rv_blood where the RV is in the plane; LGE SAX lv_blood, lv_myo, scar (scar pixels only
  ``scar``); T1/T2 maps lv_blood, lv_myo. T2w and perfusion have no mask.
- Storage: Explicit VR Little Endian, uncompressed. Classic MR Image Storage (one file per frame)
  except at sites with ``enhanced_multiframe``, whose cine and LGE series are one Enhanced MR
  Image Storage instance each (per-frame PlanePosition, PlaneOrientation,
  CardiacSynchronization/NominalCardiacTriggerDelayTime and FrameContent groups). Magnitude
  images are in vendor units (BitsStored and RescaleSlope differ by vendor); T1 maps are ms
  (slope 1), T2 maps ms after RescaleSlope 0.1. Perfusion: each slice has one TriggerTime;
  dynamics are TemporalPositionIdentifier 1..NumberOfTemporalPositions (one per heartbeat).

``M`` (subjects per site) is the mean: sites differ in size (``SiteProfile.subject_weight``), each
has at least one subject, and the cohort holds exactly N x M subjects. Everything is a function
of the seed (not of ``workers``): the same seed writes byte-identical files, so identical pixel
data, UIDs and labels.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path

import nibabel as nib
import numpy as np

from shared_model.errors import UserError
from shared_model.labels import DISEASES
from sim.dicom_export import (SeriesHeader, cohort_uid, plant_identity, series_description,
                              write_classic, write_enhanced)
from sim.phantom import sample_anatomy
from sim.sites import SiteProfile, site_profile, subjects_per_site
from sim.study import SeriesData, StudyOptions, render_study

COHORT_FORMAT, COHORT_VERSION = "fedcmr-cohort", 1
SERIES_COLUMNS = ("SeriesInstanceUID", "StudyInstanceUID", "sequence", "view", "lge_pathology",
                  "labeled_phases")
LANDMARK_COLUMNS = ("SOPInstanceUID", "frame", "landmark", "row", "col")


class CohortError(UserError, ValueError):
    """A cohort request that cannot be written as asked; the message says why."""


@dataclass(frozen=True)
class SubjectJob:
    out: Path
    seed: int
    site_index: int
    subject_index: int
    disease: str
    options: StudyOptions = StudyOptions()


@dataclass
class SubjectResult:
    site_index: int
    subject_index: int
    study_uid: str
    disease: str
    series_rows: list[dict[str, str]] = field(default_factory=list)
    landmark_rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    phi: list[str] = field(default_factory=list)
    frames: int = 0


def plan_diseases(site: SiteProfile, site_index: int, count: int, seed: int) -> list[str]:
    """Disease of each subject of a site: the site's (non-IID) mix shared out over ``count``
    subjects by largest remainder (seeded jitter breaks near-ties), in a seeded order."""
    names = [d for d in DISEASES if site.disease_mix.get(d, 0) > 0]
    weights = np.array([site.disease_mix[d] for d in names], dtype=float)
    rng = np.random.default_rng([seed, site_index, 101])
    share = weights / weights.sum() * count
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts + rng.uniform(0, 0.25, len(names))), kind="stable")
    counts[order[: count - counts.sum()]] += 1
    diseases = [name for name, n in zip(names, counts) for _ in range(n)]
    return [str(d) for d in rng.permutation(diseases)]


def plan_jobs(out: Path, sites: int, mean_subjects: int, seed: int,
              options: StudyOptions = StudyOptions()) -> list[SubjectJob]:
    counts = subjects_per_site(sites, mean_subjects, seed)
    jobs = []
    for index, count in enumerate(counts):
        for subject, disease in enumerate(plan_diseases(site_profile(index), index, count, seed)):
            jobs.append(SubjectJob(out, seed, index, subject, disease, options))
    return jobs


def _inversion_ms(sequence: str, field_t: float, rng: np.random.Generator) -> float | None:
    if sequence == "lge":
        return float(rng.uniform(260, 320) if field_t < 2 else rng.uniform(320, 380))
    if sequence == "t2w":
        return 160.0 if field_t < 2 else 210.0
    return 100.0 if sequence == "t1_map" else None


def _series_number(site: SiteProfile, k: int) -> int:
    return {"Philips": 100 * k + 1, "GE MEDICAL SYSTEMS": k + 1}.get(site.vendor, k)


def write_subject(job: SubjectJob) -> SubjectResult:
    """Render one subject's study and write its DICOM files and mask files; return label rows."""
    site = site_profile(job.site_index)
    site_dir = job.out / f"site-{job.site_index}"
    rng = np.random.default_rng([job.seed, job.site_index, job.subject_index])
    anat = sample_anatomy(rng, job.disease)
    ident = plant_identity(rng, job.seed, job.site_index, job.subject_index, site)
    result = SubjectResult(job.site_index, job.subject_index, ident.study_uid, job.disease,
                           phi=ident.phi_strings())
    start = ident.study_start_s + 300.0
    for k, series in enumerate(render_study(anat, site, rng, job.options), start=1):
        number = _series_number(site, k)
        head = SeriesHeader(number, cohort_uid(job.seed, job.site_index, job.subject_index,
                                               "series", k),
                            series_description(site, series.sequence, series.view, number, rng),
                            start, _inversion_ms(series.sequence, site.field_strength_t, rng),
                            anat.rr_ms)
        start += 20.0 + 14.0 * len(series.planes)
        enhanced = site.enhanced_multiframe and series.sequence in ("cine", "lge")
        writer = write_enhanced if enhanced else write_classic
        refs = writer(site_dir / "dicom", series, head, site, ident, job.seed)
        result.frames += series.num_frames
        if series.masks is not None:
            write_mask(site_dir / "labels" / "masks" / f"{head.uid}.nii.gz", series,
                       site.slice_thickness_mm)
        result.series_rows.append(_series_row(series, head.uid, ident.study_uid))
        where = {(r.slice, r.phase): r for r in refs}
        for s, t, name, row, col in series.landmarks:
            ref = where[(s, t)]
            result.landmark_rows.append((ref.sop_uid, "" if ref.frame is None else str(ref.frame),
                                         name, f"{row:.3f}", f"{col:.3f}"))
    return result


def _phase_order(series: SeriesData) -> np.ndarray:
    """Phase indices sorted by TriggerTime (on the first slice; all slices share the order)."""
    return np.argsort(series.trigger_ms[0], kind="stable")


def _series_row(series: SeriesData, series_uid: str, study_uid: str) -> dict[str, str]:
    rank = {int(p): i for i, p in enumerate(_phase_order(series))}
    labeled = sorted(rank[p] for p in series.labeled_phases) if series.masks is not None else []
    return dict(SeriesInstanceUID=series_uid, StudyInstanceUID=study_uid,
                sequence=series.sequence, view=series.view, lge_pathology=series.lge_pathology,
                labeled_phases=";".join(str(p) for p in labeled))


def mask_affine(series: SeriesData, order: np.ndarray, thickness_mm: float) -> np.ndarray:
    """Voxel (col, row, slice) -> RAS mm for the slices in ``order``; the slice axis is the step
    between slices, or ``thickness_mm`` along the normal for a single slice."""
    first = series.planes[order[0]]
    if len(order) > 1:
        step = series.planes[order[1]].position - first.position
    else:
        step = first.normal * thickness_mm
    lps = np.eye(4)
    lps[:3, 0] = first.row_dir * first.spacing[1]
    lps[:3, 1] = first.col_dir * first.spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_mask(path: Path, series: SeriesData, thickness_mm: float) -> None:
    """The series' masks as uint8 NIfTI, data[col, row, slice, phase] (see module docstring)."""
    assert series.masks is not None  # only labelled series get a mask file
    normal = series.planes[0].normal
    order = np.argsort([float(p.position @ normal) for p in series.planes], kind="stable")
    data = series.masks[order][:, _phase_order(series)]
    data = np.ascontiguousarray(np.transpose(data, (3, 2, 0, 1)))
    affine = mask_affine(series, order, thickness_mm)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "msec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def _write_csv(path: Path, header: tuple[str, ...], rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _site_entry(index: int, results: list[SubjectResult]) -> dict:
    site = site_profile(index)
    diseases = {d: sum(r.disease == d for r in results) for d in DISEASES}
    return dict(name=f"site-{index}", vendor=site.vendor, model=site.model,
                field_strength_t=site.field_strength_t, pixel_spacing_mm=site.pixel_spacing_mm,
                matrix=list(site.matrix), slice_thickness_mm=site.slice_thickness_mm,
                spacing_between_slices_mm=site.spacing_between_slices_mm,
                cine_phases=site.cine_phases, enhanced_multiframe=site.enhanced_multiframe,
                subjects=len(results), disease_mix=dict(site.disease_mix), diseases=diseases)


def write_site_labels(site_dir: Path, results: list[SubjectResult]) -> None:
    """series.csv, studies.csv, landmarks.csv and planted_phi.json of one site."""
    labels = site_dir / "labels"
    _write_csv(labels / "series.csv", SERIES_COLUMNS,
               [[row[c] for c in SERIES_COLUMNS] for r in results for row in r.series_rows])
    _write_csv(labels / "studies.csv", ("StudyInstanceUID", "disease"),
               [[r.study_uid, r.disease] for r in results])
    _write_csv(labels / "landmarks.csv", LANDMARK_COLUMNS,
               [row for r in results for row in r.landmark_rows])
    phi = sorted({value for r in results for value in r.phi})
    (site_dir / "planted_phi.json").write_text(json.dumps(phi, indent=1) + "\n")


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix two cohorts in one folder; with ``overwrite``, remove only a cohort's own
    files (cohort.json and site-<i> folders)."""
    if out.exists() and not out.is_dir():
        raise CohortError(f"--out {out} is a file; give a folder")
    existing = [p for p in out.glob("site-*") if p.is_dir()] + [
        p for p in [out / "cohort.json"] if p.exists()]
    if existing and not overwrite:
        raise CohortError(f"{out} already holds a cohort ({existing[0].name}); choose another "
                          "--out or pass --overwrite to replace it")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _pool_context() -> BaseContext:
    """Fork on Linux (workers start before the pool's own thread; the caller must not run other
    threads, e.g. a self-refreshing progress bar), spawn elsewhere."""
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def write_cohort(out: Path, sites: int, subjects_per_site_mean: int, seed: int,
                 options: StudyOptions = StudyOptions(), workers: int = 1,
                 overwrite: bool = False,
                 on_subject: Callable[[SubjectResult], None] | None = None) -> dict:
    """Write the whole cohort (see the module docstring); returns the cohort.json content.

    ``workers`` > 1 renders subjects in separate processes; the output does not depend on it.
    """
    if sites < 1 or subjects_per_site_mean < 1:
        raise CohortError("need --sites >= 1 and --subjects-per-site >= 1")
    prepare_out(out, overwrite)
    jobs = plan_jobs(out, sites, subjects_per_site_mean, seed, options)
    results = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_pool_context()) as pool:
            for result in pool.map(write_subject, jobs):
                results.append(result)
                if on_subject:
                    on_subject(result)
    else:
        for job in jobs:
            results.append(write_subject(job))
            if on_subject:
                on_subject(results[-1])
    by_site = [[r for r in results if r.site_index == i] for i in range(sites)]
    for index, site_results in enumerate(by_site):
        write_site_labels(out / f"site-{index}", site_results)
    summary = dict(format=COHORT_FORMAT, version=COHORT_VERSION, seed=seed,
                   sites=[_site_entry(i, r) for i, r in enumerate(by_site)])
    (out / "cohort.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


__all__ = ["write_cohort", "write_subject", "plan_jobs", "write_mask", "mask_affine",
           "CohortError", "SubjectResult", "StudyOptions"]
