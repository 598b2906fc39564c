"""The real-patient protocol that both the few-shot benchmark and the demo run.

Real Sunnybrook CMR (``../shared/data`` beside the repository, or ``$FEDCMR_REAL_DATA``): three
cine studies with blood-pool and myocardium contours, 20 patients of four pathology groups with
blood-pool masks. The test patients are those a foundation model's config keeps out of its
pretraining (``sim.holdout_patients``). Training goes through the node's own fine-tuning
(:func:`client.finetune.finetune_on_store`) on per-patient stores made by the node's intake;
prediction runs on the raw test images the way ``fedcmr-client predict`` does (heart found
first, masks in the images' own geometry) and is scored there.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import nibabel
import numpy as np
import torch

from shared_model.errors import UserError

if TYPE_CHECKING:
    from client.finetune import FinetuneReport
    from shared_model.config import FedCMRConfig

ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "FEDCMR_REAL_DATA"
CINE_TRAIN = ("SCD0000101", "SCD0000201")  # 1 labelled patient: the first alone
ARMS = ("fm", "scratch", "unet")


class RealDataError(UserError, FileNotFoundError):
    """The real Sunnybrook folders are not where the protocol looks for them."""


def data_root() -> Path:
    """``$FEDCMR_REAL_DATA``, else ``../shared/data`` beside the repository."""
    root = Path(os.environ.get(DATA_ENV) or ROOT.parent / "shared" / "data")
    for part in ("sunnybrook/link.csv", "sunnybrook-frames/cases.csv"):
        if not (root / part).is_file():
            raise RealDataError(f"{root / part} is missing; point ${DATA_ENV} at the folder "
                                "holding sunnybrook/ and sunnybrook-frames/")
    return root


@dataclass
class ScoredFrame:
    """A test image in its own geometry with its expert masks."""

    patient: str
    group: str
    image: np.ndarray  # (rows, cols) raw values
    spacing: tuple[float, float]  # (row, col) mm
    blood: np.ndarray  # bool (rows, cols)
    myo: np.ndarray | None = None  # bool; cine frames with an epicardial contour


@dataclass
class CineTest:
    """The contoured frames of a cine study and its whole stack (where the heart is sought)."""

    frames: list[ScoredFrame]
    stack: list[np.ndarray]
    spacing: tuple[float, float]


@dataclass
class HeldOut:
    frames: list[ScoredFrame]  # the frame patients
    cine: CineTest
    patients: list[str] = field(default_factory=list)


@dataclass
class Score:
    blood: float  # mean blood-pool Dice over every test frame
    myo: float  # mean myocardium Dice over the cine frames that have it
    groups: dict[str, float]  # blood-pool Dice per pathology group


def frame_patients() -> dict[str, str]:
    """Patient -> pathology group of the 20 frame patients."""
    with open(data_root() / "sunnybrook-frames" / "cases.csv", newline="") as handle:
        return {row["patient"]: row["group"] for row in csv.DictReader(handle)}


def held_out_tests(holdout: list[str]) -> HeldOut:
    """The held-out frame patients and the (first) held-out cine study, read from the data."""
    groups = frame_patients()
    patients = sorted(p for p in holdout if p in groups)
    cine = sorted(p for p in holdout if p.startswith("SCD"))
    if not patients or not cine:
        raise UserError("the model's config holds out no frame patient or no cine study "
                        "(sim.holdout_patients): the protocol needs patients it never saw")
    return HeldOut(_frame_tests(set(patients), groups), _cine_test(cine[0]), patients + cine[:1])


def _frame_tests(patients: set[str], groups: dict[str, str]) -> list[ScoredFrame]:
    root = data_root() / "sunnybrook-frames"
    out = []
    with open(root / "cases.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["patient"] not in patients:
                continue
            image = cast("nibabel.Nifti1Image", nibabel.load(root / "imagesTr" / f"{row['case']}_0000.nii.gz"))
            label = cast("nibabel.Nifti1Image", nibabel.load(root / "labelsTr" / f"{row['case']}.nii.gz"))
            zooms = image.header.get_zooms()
            out.append(ScoredFrame(row["patient"], groups[row["patient"]],
                                   np.asarray(image.dataobj)[:, :, 0].T.astype(np.float32),
                                   (float(zooms[1]), float(zooms[0])),
                                   np.asarray(label.dataobj)[:, :, 0].T == 1))
    return out


def _cine_test(patient: str) -> CineTest:
    import pydicom

    from client.adapters.sunnybrook import rasterise_polygon, read_contour

    root = data_root() / "sunnybrook"
    with open(root / "link.csv", newline="") as handle:
        contours = root / "contours" / dict(csv.reader(handle))[patient]
    stack, tests, spacing = [], [], (1.0, 1.0)
    for path in sorted((root / "dicoms" / patient).iterdir(), key=lambda p: int(p.stem)):
        ds = pydicom.dcmread(path)
        image = ds.pixel_array.astype(np.float32)
        spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        stack.append(image)
        number = int(ds.InstanceNumber)
        inner = contours / "i-contours" / f"IM-0001-{number:04d}-icontour-manual.txt"
        if not inner.is_file():
            continue
        blood = rasterise_polygon(read_contour(inner), *image.shape)
        outer = contours / "o-contours" / f"IM-0001-{number:04d}-ocontour-manual.txt"
        myo = rasterise_polygon(read_contour(outer), *image.shape) & ~blood if outer.is_file() else None
        tests.append(ScoredFrame(patient, "cine (HF-I)", image, spacing, blood, myo))
    return CineTest(tests, stack, spacing)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


# ------------------------------------------------------------------------------- training


def patient_store(work: Path, patient: str, cfg: FedCMRConfig) -> Path:
    """A store of one patient (cached under ``work``), made by the node's own intake."""
    from client.intake.pipeline import IngestOptions, ingest

    store = work / "stores" / patient
    if not (store / "manifest.json").is_file():
        cine = patient.startswith("SCD")
        ingest(IngestOptions(src=data_root() / ("sunnybrook" if cine else "sunnybrook-frames"),
                             store=store, spacing_mm=cfg.data.spacing_mm, crop_px=cfg.data.crop_px,
                             progress=False, patients=frozenset({patient})),
               "sunnybrook" if cine else "nnunet")
    return store


def training_sets(budget: int, seeds: int, pool: list[str]) -> list[list[str]]:
    """Per seed the labelled patients: SCD0000101 alone for 1; both training cine studies and
    patients drawn from ``pool`` for more."""
    if budget == 1:
        return [[CINE_TRAIN[0]]] * seeds
    rng = np.random.default_rng(0)
    extra = budget - len(CINE_TRAIN)
    return [[*CINE_TRAIN, *sorted(rng.choice(pool, extra, replace=False).tolist())]
            for _ in range(seeds)]


def scratch_bundle(fm: Path, out: Path, seed: int) -> Path:
    """The foundation model's architecture with a freshly initialised encoder (no decoder)."""
    from shared_model.bundle import load_bundle, save_encoder
    from shared_model.config import save_resolved_config
    from shared_model.encoders import build_encoder

    cfg = load_bundle(fm).config
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    save_encoder(out / "encoder.safetensors", build_encoder(cfg.model.preset).state_dict(), cfg)
    return out


def arm_recipe(arm: str, fm_overrides: Sequence[str] = ()) -> list[str]:
    """An arm's fine-tuning overrides: the node's built-in recipe for the foundation model (its
    encoder frozen), changed by ``fm_overrides`` as a user's overrides change it; scratch has
    no pretrained encoder to keep, so everything of it trains at one learning rate."""
    from client.finetune import recipe_mode
    from shared_model.finetune import SCRATCH_RECIPE

    if arm == "fm":
        return [*recipe_mode("sax_seg", "fm", None, fm_overrides), *fm_overrides]
    return list(SCRATCH_RECIPE) if arm == "scratch" else []


def run_arm(arm: str, stores: list[Path], fm: Path, work: Path, seed: int, seconds: float,
            device: str = "cpu", fm_overrides: Sequence[str] = ()) -> tuple[Path, FinetuneReport]:
    """Fine-tune one arm for ``seconds`` on ``stores`` (every subject labelled, none held out);
    ``fm_overrides`` change the foundation model's recipe as a user's overrides would."""
    from client.finetune import finetune_on_store
    from shared_model.bundle import load_bundle
    from shared_model.config import load_config

    cfg = load_config(None, [f"seed={seed}", f"tasks.max_seconds={seconds}", "tasks.steps=100000",
                             f"tasks.arch={'unet' if arm == 'unet' else 'fm'}", f"device={device}",
                             *arm_recipe(arm, fm_overrides)])
    out = work / "runs" / f"{arm}-{seed}-{time.monotonic_ns()}"
    start: Path | None = fm
    if arm == "scratch":
        start = scratch_bundle(fm, work / "scratch" / str(seed), seed)
    elif arm == "unet":  # the same input grid as the foundation model
        start = None
        base = load_bundle(fm).config
        cfg.model, cfg.data = base.model, base.data
    report = finetune_on_store("sax_seg", start, stores, out, cfg, test_fraction=0.0)
    return out, report


def segmenter_for(bundle: Path, device: str = "cpu"):  # noqa: ANN201 - client.inference.Segmenter
    from client.inference import Segmenter
    from client.predict_inputs import model_grid
    from shared_model.bundle import load_bundle, task_model_from_bundle
    from shared_model.tasks import get_task

    loaded = load_bundle(bundle)
    task = get_task("sax_seg")
    model = task_model_from_bundle(loaded, task, require_head=True)
    return Segmenter(model, model_grid(loaded.config), torch.device(device),
                     convex_classes=task.convex_classes)


def predictions(bundle: Path, tests: HeldOut) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Class maps in each test image's own geometry: (frame patients', cine frames')."""
    from client.inference import segment_stack

    segmenter = segmenter_for(bundle)
    frames = [segment_stack(segmenter, [t.image], t.spacing)[0] for t in tests.frames]
    cine = list(segment_stack(segmenter, [t.image for t in tests.cine.frames], tests.cine.spacing,
                              stack=tests.cine.stack))
    return frames, cine


def score(bundle: Path, tests: HeldOut) -> Score:
    return score_predictions(tests, *predictions(bundle, tests))


def score_predictions(tests: HeldOut, frames: list[np.ndarray], cine: list[np.ndarray]) -> Score:
    blood: dict[str, list[float]] = {}
    for test, labels in zip(tests.frames, frames, strict=True):
        blood.setdefault(test.group, []).append(dice(labels == 1, test.blood))
    myo = []
    for test, labels in zip(tests.cine.frames, cine, strict=True):
        blood.setdefault(test.group, []).append(dice(labels == 1, test.blood))
        if test.myo is not None:
            myo.append(dice(labels == 2, test.myo))
    every = [v for values in blood.values() for v in values]
    return Score(float(np.mean(every)), float(np.mean(myo)) if myo else float("nan"),
                 {g: float(np.mean(v)) for g, v in sorted(blood.items())})
