"""The real-patient few-shot protocol: foundation model vs scratch vs a supervised U-Net.

Real Sunnybrook CMR of 23 patients (``../shared/data``): 3 cine studies with blood-pool and
myocardium contours, 20 patients of four pathology groups with blood-pool masks. A fixed test
set is held out, the one the shipped foundation model never saw in pretraining (its config's
``sim.holdout_patients``): two patients per pathology group and one cine study. Training sets:

- 1 labelled patient: the cine study SCD0000101 (as the anchors' 1-study case)
- 3: both remaining cine studies + one more patient drawn per seed
- 10: both cine studies + 8 patients drawn per seed

Each arm trains through the node's own fine-tuning (``client.finetune.finetune_on_store``) with
the same wall-clock budget and augmentation: ``fm`` (the shipped model, or ``--fm BUNDLE``),
``scratch`` (the same architecture, randomly initialised) and ``unet`` (MONAI U-Net). Each
prediction runs on the raw test images the way ``fedcmr-client predict`` does (heart found
first, masks in the images' own geometry) and is scored there: blood-pool Dice on every test
frame (per group and overall), myocardium Dice on the cine frames that have it; mean and spread
over seeds, and each arm's ratio to the U-Net.

    python benchmarks/sunnybrook_fewshot.py [--budgets 1 3 10] [--seeds 3] [--seconds 120]
        [--arms fm scratch unet] [--fm models/<name>] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CINE_TRAIN = ("SCD0000101", "SCD0000201")  # 1 labelled patient: the first alone


@dataclass
class TestFrame:
    patient: str
    group: str
    image: np.ndarray  # (rows, cols) raw
    spacing: tuple[float, float]
    blood: np.ndarray  # bool (rows, cols)
    myo: np.ndarray | None  # bool, cine frames with an epicardial contour


def frame_patients() -> dict[str, str]:
    with open(DATA / "sunnybrook-frames" / "cases.csv", newline="") as handle:
        return {row["patient"]: row["group"] for row in csv.DictReader(handle)}


def load_frame_tests(patients: set[str]) -> list[TestFrame]:
    out = []
    groups = frame_patients()
    with open(DATA / "sunnybrook-frames" / "cases.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["patient"] not in patients:
                continue
            image = cast("nibabel.Nifti1Image", nibabel.load(
                DATA / "sunnybrook-frames" / "imagesTr" / f"{row['case']}_0000.nii.gz"))
            label = cast("nibabel.Nifti1Image", nibabel.load(
                DATA / "sunnybrook-frames" / "labelsTr" / f"{row['case']}.nii.gz"))
            zooms = image.header.get_zooms()
            out.append(TestFrame(row["patient"], groups[row["patient"]],
                                 np.asarray(image.dataobj)[:, :, 0].T.astype(np.float32),
                                 (float(zooms[1]), float(zooms[0])),
                                 np.asarray(label.dataobj)[:, :, 0].T == 1, None))
    return out


def load_cine_tests(patient: str) -> tuple[list[TestFrame], list[np.ndarray], tuple[float, float]]:
    """The contoured frames of a cine study, and every frame of its stack (for localisation)."""
    import pydicom

    from client.adapters.sunnybrook import rasterise_polygon, read_contour

    links = dict(csv.reader(open(DATA / "sunnybrook" / "link.csv")))
    contours = DATA / "sunnybrook" / "contours" / links[patient]
    frames, tests, spacing = [], [], (1.0, 1.0)
    for path in sorted((DATA / "sunnybrook" / "dicoms" / patient).iterdir(), key=lambda p: int(p.stem)):
        ds = pydicom.dcmread(path)
        image = ds.pixel_array.astype(np.float32)
        spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        frames.append(image)
        number = int(ds.InstanceNumber)
        inner = contours / "i-contours" / f"IM-0001-{number:04d}-icontour-manual.txt"
        if not inner.is_file():
            continue
        blood = rasterise_polygon(read_contour(inner), *image.shape)
        outer = contours / "o-contours" / f"IM-0001-{number:04d}-ocontour-manual.txt"
        myo = rasterise_polygon(read_contour(outer), *image.shape) & ~blood if outer.is_file() else None
        tests.append(TestFrame(patient, "cine (HF-I)", image, spacing, blood, myo))
    return tests, frames, spacing


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


# ------------------------------------------------------------------------------- stores


def patient_store(work: Path, patient: str, cfg) -> Path:  # noqa: ANN001
    """A store of one patient (cached under ``work``), via the node's own intake."""
    from client.intake.pipeline import IngestOptions, ingest

    store = work / "stores" / patient
    if not (store / "manifest.json").is_file():
        cine = patient.startswith("SCD")
        ingest(IngestOptions(src=DATA / ("sunnybrook" if cine else "sunnybrook-frames"), store=store,
                             spacing_mm=cfg.data.spacing_mm, crop_px=cfg.data.crop_px, progress=False,
                             patients=frozenset({patient})), "sunnybrook" if cine else "nnunet")
    return store


def training_sets(budget: int, seeds: int, pool: list[str]) -> list[list[str]]:
    """Per seed the labelled patients (see the module docstring)."""
    if budget == 1:
        return [[CINE_TRAIN[0]]] * seeds
    rng = np.random.default_rng(0)
    extra = budget - len(CINE_TRAIN)
    return [[*CINE_TRAIN, *sorted(rng.choice(pool, extra, replace=False).tolist())] for _ in range(seeds)]


# ------------------------------------------------------------------------------- one run


def scratch_bundle(fm: Path, out: Path, seed: int) -> Path:
    """The foundation model's architecture with a freshly initialised encoder."""
    from shared_model.bundle import load_bundle, save_encoder
    from shared_model.config import save_resolved_config
    from shared_model.encoders import build_encoder

    cfg = load_bundle(fm).config
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    save_encoder(out / "encoder.safetensors", build_encoder(cfg.model.preset).state_dict(), cfg)
    return out


def run_arm(arm: str, stores: list[Path], fm: Path, work: Path, seed: int, seconds: float):  # noqa: ANN201
    from client.finetune import finetune_on_store
    from shared_model.config import load_config

    overrides = [f"seed={seed}", f"tasks.max_seconds={seconds}", "tasks.steps=100000",
                 f"tasks.arch={'unet' if arm == 'unet' else 'fm'}", "device=cpu"]
    cfg = load_config(None, overrides)
    out = work / "runs" / f"{arm}-{seed}-{time.monotonic_ns()}"
    start = {"fm": fm, "scratch": scratch_bundle(fm, work / "scratch" / str(seed), seed),
             "unet": None}[arm]
    if arm == "unet":  # the same input grid as the foundation model
        from shared_model.bundle import load_bundle

        base = load_bundle(fm).config
        cfg.model, cfg.data = base.model, base.data
    report = finetune_on_store("sax_seg", start, stores, out, cfg, test_fraction=0.0)
    return out, report


def score(bundle: Path, frame_tests: list[TestFrame], cine: tuple) -> dict[str, object]:  # noqa: ANN001
    from client.inference import Segmenter, segment_stack
    from client.predict_inputs import model_grid
    from shared_model.bundle import load_bundle, task_model_from_bundle
    from shared_model.tasks import get_task

    loaded = load_bundle(bundle)
    model = task_model_from_bundle(loaded, get_task("sax_seg"), require_head=True)
    segmenter = Segmenter(model, model_grid(loaded.config), torch.device("cpu"))
    blood: dict[str, list[float]] = {}
    for test in frame_tests:
        labels = segment_stack(segmenter, [test.image], test.spacing)[0]
        blood.setdefault(test.group, []).append(dice(labels == 1, test.blood))
    cine_tests, cine_frames, spacing = cine
    labels = segment_stack(segmenter, [t.image for t in cine_tests], spacing, stack=cine_frames)
    myo = []
    for test, predicted in zip(cine_tests, labels, strict=True):
        blood.setdefault(test.group, []).append(dice(predicted == 1, test.blood))
        if test.myo is not None:
            myo.append(dice(predicted == 2, test.myo))
    every = [v for values in blood.values() for v in values]
    return {"blood": float(np.mean(every)), "myo": float(np.mean(myo)) if myo else float("nan"),
            "groups": {g: float(np.mean(v)) for g, v in sorted(blood.items())}}


# ------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120.0, help="fine-tuning budget per run")
    parser.add_argument("--arms", nargs="+", default=["fm", "scratch", "unet"])
    parser.add_argument("--fm", type=Path, default=None, help="foundation-model bundle")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from shared_model.bundle import load_bundle
    from shared_model.shipped import default_model

    torch.set_num_threads(2)
    fm = args.fm or default_model()
    fm_cfg = load_bundle(fm).config
    held = set(fm_cfg.sim.holdout_patients)
    groups = frame_patients()
    test_frames_patients = {p for p in held if p in groups}
    cine_test = sorted(p for p in held if p.startswith("SCD"))
    if not test_frames_patients or not cine_test:
        raise SystemExit(f"{fm}: its config names no held-out patients (sim.holdout_patients); "
                         "the protocol needs patients the model never saw")
    pool = sorted(p for p in groups if p not in held)
    work = args.work or Path(tempfile.mkdtemp(prefix="fewshot-"))
    frame_tests = load_frame_tests(test_frames_patients)
    cine = load_cine_tests(cine_test[0])
    started = time.monotonic()
    rows = []
    for budget in args.budgets:
        for seed, patients in enumerate(training_sets(budget, args.seeds, pool)):
            stores = [patient_store(work, p, fm_cfg) for p in patients]
            for arm in args.arms:
                out, report = run_arm(arm, stores, fm, work, seed, args.seconds)
                result = score(out, frame_tests, cine)
                rows.append({"arm": arm, "budget": budget, "seed": seed, "patients": patients,
                             "steps": report.steps, "seconds": round(report.seconds, 1), **result})
                print(f"  {arm:8s} budget {budget:2d} seed {seed}: blood {result['blood']:.3f} "
                      f"myo {result['myo']:.3f} ({report.steps} steps)", flush=True)
    print_table(rows, args, fm, test_frames_patients, cine_test, time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "machine": machine()}, indent=1))


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.python_version()}"


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def print_table(rows: list[dict], args, fm: Path, tests: set[str], cine: list[str],  # noqa: ANN001
                seconds: float) -> None:
    print(f"\nreal-patient few-shot protocol: FM {fm}; {args.seconds:.0f} s fine-tuning per run; "
          f"{args.seeds} seeds; test: {len(tests)} frame patients ({', '.join(sorted(tests))}) "
          f"+ cine {', '.join(cine)}; machine: {machine()}; {seconds / 60:.1f} min")
    groups = sorted({g for r in rows for g in r["groups"]})
    header = ["labelled", "arm", "blood (all)", "myo (cine)", *groups, "blood / U-Net", "steps"]
    print(" | ".join(header))
    for budget in args.budgets:
        unet = [r["blood"] for r in rows if r["budget"] == budget and r["arm"] == "unet"]
        for arm in args.arms:
            mine = [r for r in rows if r["budget"] == budget and r["arm"] == arm]
            blood = [r["blood"] for r in mine]
            ratio = f"{statistics.mean(blood) / statistics.mean(unet):.3f}" if unet and blood else "-"
            cells = [str(budget), arm, _stat(blood), _stat([r["myo"] for r in mine]),
                     *[_stat([r["groups"][g] for r in mine if g in r["groups"]]) for g in groups],
                     ratio, str(round(statistics.mean(r["steps"] for r in mine)))]
            print(" | ".join(cells))


if __name__ == "__main__":
    main()
