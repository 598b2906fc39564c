"""Hospital-side fine-tuning and prediction with a FedCMR model bundle, on the node's store.

``finetune_on_store``: take a bundle (a release or a run folder), build the task's samples from
the store, hold out whole subjects for testing, fine-tune and evaluate (``finetune_at_node``, the
node's own fine-tuning session, which a simulated site's local fine-tuning runs too), and write a
new bundle with the task head. ``predict_on_store``: run a bundle's task head over a store and write masks as
NIfTI, landmarks and classes as JSON and CSV.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from client.inference import clean_labels
from client.store import LocalStore, StoreError
from shared_model.bundle import (
    Bundle,
    BundleError,
    load_bundle,
    save_task_bundle,
    task_model_for,
    task_model_from_bundle,
)
from shared_model.config import FedCMRConfig, PrivacyMode, TaskArch
from shared_model.encoders import get_preset
from shared_model.files import atomic_write_bytes, atomic_write_text
from shared_model.finetune import FinetuneResult, evaluate, finetune, predict_all
from shared_model.labels import parse_frame_key
from shared_model.privacy import DPSettings
from shared_model.tasks import (
    SeriesData,
    Task,
    TaskData,
    TaskDataError,
    TaskKind,
    UnknownTaskError,
    get_task,
)
from shared_model.train import CheckpointPolicy, make_generator, resolve_device


def series_from_store(store: LocalStore, keys: Sequence[str] | None = None) -> list[SeriesData]:
    """The store's series as model-side SeriesData (images as float32, labels in store pixels)."""
    out = []
    for key in sorted(keys if keys is not None else store.manifest.series):
        record = store.manifest.series[key]
        landmarks = {parse_frame_key(k): {n: (float(p[0]), float(p[1])) for n, p in points.items()}
                     for k, points in record.landmarks.items()}
        out.append(SeriesData(
            key=key, subject=record.subject, images=store.load(key).astype(np.float32),
            spacing_mm=store.manifest.spacing_mm, sequence=record.sequence, view=record.view,
            mask=store.load_mask(key) if record.mask else None,
            labeled_frames=[(int(s), int(t)) for s, t in record.labeled_frames],
            landmarks=landmarks, classes=dict(record.classes),
            subject_labels=dict(store.manifest.subjects.get(record.subject, {})),
            partial_frames={parse_frame_key(k): tuple(v) for k, v in record.partial_labels.items()},
            label_structures=tuple(record.info.get("label_structures") or ())))
    return out


def held_out(subjects: Sequence[str], test_fraction: float, split_seed: int) -> list[str]:
    """The subjects kept for evaluation only: never pretrained on, never fine-tuned on.

    ``test_fraction`` 0 holds out nobody (a hospital training on every labelled subject).
    """
    unique = sorted(set(subjects))
    if test_fraction <= 0:
        return []
    if len(unique) < 2:
        raise TaskDataError(f"need data from at least 2 subjects to hold one out for testing; "
                         f"there are {len(unique)}")
    order = [unique[i] for i in torch.randperm(len(unique), generator=make_generator(split_seed, "holdout")).tolist()]
    n_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)
    return sorted(order[:n_test])


def split_subjects(subjects: Sequence[str], label_budget: int, test_fraction: float,
                   seed: int, split_seed: int | None = None) -> tuple[list[str], list[str]]:
    """(train, test): whole subjects. The held-out test subjects depend on ``split_seed`` only
    (default: ``seed``); ``seed`` draws at most ``label_budget`` training subjects from the rest.

    ``label_budget`` <= 0 means every subject not held out for testing.
    """
    test = held_out(subjects, test_fraction, seed if split_seed is None else split_seed)
    rest = sorted(set(subjects) - set(test))
    order = [rest[i] for i in torch.randperm(len(rest), generator=make_generator(seed, "draw")).tolist()]
    train = order[:label_budget] if label_budget > 0 else order
    return sorted(train), test


@dataclass
class FinetuneReport:
    out: Path
    train_subjects: int
    test_subjects: int
    train_samples: int
    test_samples: int
    metrics: dict[str, float]
    epsilon: float
    steps: int = 0
    seconds: float = 0.0


def pooled_series(store_paths: Sequence[Path], task: Task) -> list[SeriesData]:
    """The task's series of one or more stores; subjects are named per store so that two
    stores' pseudonyms can never merge."""
    series: list[SeriesData] = []
    for index, path in enumerate(store_paths):
        store = LocalStore.open(path)
        for item in series_from_store(store, task_series(store, task)):
            if len(store_paths) > 1:
                item.subject = f"{index}:{item.subject}"
            series.append(item)
    return series


FROZEN_SEGMENTATION_LR = 3.0e-3  # the decoder's rate on a frozen encoder (recipe_mode)


def recipe_mode(task: str, arch: str, config: str | None,
                overrides: Sequence[str] = ()) -> list[str]:
    """The built-in recipe fine-tunes a foundation model's dense task with its transformer
    frozen (the pretrained decoder trains): on 2 CPU cores a step costs half as much, and within
    the session's budget that beat fine-tuning everything on real held-out patients (README). A
    segmentation decoder then trains at 3e-3 (measured on real patients with 1 labelled one:
    blood pool +3 points and myocardium +16 over 1e-3, and no run lost the myocardium), and with
    2 or more labelled subjects the encoder's conv stem trains with it (``tasks.mode=auto``). A
    preset (--config) or a tasks.mode override decides otherwise (and then nothing of this
    recipe applies); a tasks.lr override sets the rate."""
    try:
        kind = get_task(task).kind
    except UnknownTaskError:
        return []  # finetune_on_store names the unknown task
    if arch != "fm" or config is not None or any(o.startswith("tasks.mode=") for o in overrides):
        return []
    if kind == TaskKind.segmentation:
        return ["tasks.mode=auto", f"tasks.lr={FROZEN_SEGMENTATION_LR}"]
    return ["tasks.mode=linear"] if kind == TaskKind.landmarks else []


def check_store_grid(path: Path, cfg: FedCMRConfig) -> None:
    """The store's grid must be the model's: its pixels are resized to the model's input as is."""
    manifest = LocalStore.open(path).manifest
    if (manifest.spacing_mm, manifest.crop_px) != (cfg.data.spacing_mm, cfg.data.crop_px):
        raise StoreError(
            f"{path}: the store's grid is {manifest.spacing_mm} mm x {manifest.crop_px} px, the "
            f"model's {cfg.data.spacing_mm} mm x {cfg.data.crop_px} px; ingest into a new store "
            f"with data.spacing_mm={cfg.data.spacing_mm} data.crop_px={cfg.data.crop_px}")


def task_series(store: LocalStore, task: Task) -> list[str]:
    """Keys of the store's series a task can use, so only those arrays are loaded."""
    sequences, views = getattr(task, "sequences", ()), getattr(task, "views", ())
    keys = []
    for key, record in store.manifest.series.items():
        if sequences and record.classes.get("sequence", record.sequence) not in sequences:
            continue
        if views and record.classes.get("view", record.view) not in views:
            continue
        keys.append(key)
    return keys


def finetune_at_node(model: torch.nn.Module, task: Task, train: TaskData, test: TaskData,
                     cfg: FedCMRConfig, *, gen: torch.Generator, device: torch.device,
                     dp: DPSettings | None = None,
                     checkpoint: CheckpointPolicy | None = None) -> tuple[FinetuneResult, dict[str, float]]:
    """A node's own fine-tuning session: train ``model`` on ``train`` (``cfg.tasks``), then
    evaluate it on the held-out ``test`` subjects; returns the training result and the metrics."""
    result = finetune(model, task, train, cfg.tasks, gen=gen, device=device, dp=dp, checkpoint=checkpoint)
    return result, evaluate(model, task, test, device)


def finetune_on_store(task_name: str, bundle_path: Path | None, store_path: Path | Sequence[Path],
                      out: Path, cfg: FedCMRConfig, label_budget: int = 0,
                      test_fraction: float = 0.3, resume: bool = True) -> FinetuneReport:
    """Fine-tune ``task_name`` on the labelled subjects of one or more stores; write a bundle.

    ``bundle_path`` is the foundation model to start from (tasks.arch=fm); with
    tasks.arch=unet it may be None (a supervised U-Net trains from scratch).
    """
    task = get_task(task_name)
    bundle = load_bundle(bundle_path) if bundle_path is not None else None
    if bundle is not None:  # its encoder and input grid (a U-Net takes the same grid)
        cfg.model, cfg.data = bundle.config.model, bundle.config.data
    elif cfg.tasks.arch == TaskArch.fm:
        raise BundleError("fine-tuning the foundation model needs --model BUNDLE (or a shipped "
                          "model: `fedcmr-client models`)")
    stores = [store_path] if isinstance(store_path, (str, Path)) else list(store_path)
    if bundle is None:  # a U-Net of its own: the (first) store's grid
        manifest = LocalStore.open(Path(stores[0])).manifest
        cfg.data.spacing_mm, cfg.data.crop_px = manifest.spacing_mm, manifest.crop_px
    for path in stores:
        check_store_grid(Path(path), cfg)
    size = get_preset(cfg.model.preset).image_size
    data = task.build(pooled_series([Path(p) for p in stores], task), size)
    if len(data) == 0:
        raise TaskDataError(f"{', '.join(map(str, stores))}: no labelled samples for task "
                             f"'{task_name}'; ingest with --labels or use another task")
    train_ids, test_ids = split_subjects(data.subjects, label_budget, test_fraction, cfg.seed,
                                         cfg.tasks.split_seed)
    train = data.subset([i for i, s in enumerate(data.subjects) if s in train_ids])
    test = data.subset([i for i, s in enumerate(data.subjects) if s in test_ids])
    model = task_model_for(cfg, task, bundle)
    device = resolve_device(cfg.device)
    dp = _dp_settings(cfg)
    checkpoint = CheckpointPolicy(out / "checkpoint.safetensors", every=50,
                                  fingerprint=f"{task_name}/{cfg.seed}/{len(train)}") if resume else None
    result, metrics = finetune_at_node(model, task, train, test, cfg,
                                       gen=make_generator(cfg.seed, "finetune", task_name),
                                       device=device, dp=dp, checkpoint=checkpoint)
    metrics = metrics if len(test) else {}
    summary = {"task": task_name, "arch": cfg.tasks.arch.value, "train_subjects": len(train_ids),
               "test_subjects": len(test_ids), "train_samples": len(train),
               "test_samples": len(test), "metrics": metrics, "epsilon": result.epsilon,
               "delta": cfg.privacy.delta if dp else None, "steps": result.local.steps,
               "seconds": round(result.local.seconds, 1), "mode": result.mode.value}
    save_task_bundle(out, cfg, task, model.cpu(), {k: _json_safe(v) for k, v in summary.items()},
                     base=bundle if cfg.tasks.arch == TaskArch.fm else None)
    if checkpoint is not None:
        checkpoint.path.unlink(missing_ok=True)  # the session finished; the bundle is the result
    return FinetuneReport(out, len(train_ids), len(test_ids), len(train), len(test), metrics,
                          result.epsilon, result.local.steps, result.local.seconds)


def _input_size(bundle: Bundle) -> int:
    from shared_model.encoders import get_preset

    return get_preset(bundle.config.model.preset).image_size


def _dp_settings(cfg: FedCMRConfig) -> DPSettings | None:
    if cfg.privacy.mode != PrivacyMode.sample:
        return None
    p = cfg.privacy
    return DPSettings(p.noise_multiplier, p.max_grad_norm, p.delta, p.accountant,
                      p.reproducible_noise)


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- prediction


def predict_on_store(task_name: str, bundle_path: Path, store_path: Path, out: Path,
                     device_name: str = "auto") -> dict[str, int]:
    """Predict ``task_name`` for every series of a store that the task applies to."""
    task = get_task(task_name)
    bundle = load_bundle(bundle_path)
    model = task_model_from_bundle(bundle, task, require_head=True)
    device = resolve_device(device_name)
    store = LocalStore.open(store_path)
    size = _input_size(bundle)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"series": 0, "frames": 0}
    rows: list[dict[str, object]] = []
    for series in series_from_store(store):
        if not _applies(task, series):
            continue
        counts["series"] += 1
        if task.kind == TaskKind.segmentation:
            slice_mm = float(store.manifest.series[series.key].info.get("slice_spacing_mm", 1.0))
            counts["frames"] += _write_mask(model, task, series, size, device, out,
                                            (store.manifest.spacing_mm, slice_mm))
        elif task.kind == TaskKind.landmarks:
            rows += _landmark_rows(model, task, series, size, device)
        else:
            rows += _class_rows(model, task, series, size, device)
    if rows:
        _write_table(out, task_name, rows)
    return counts


def _applies(task: Task, series: SeriesData) -> bool:
    sequences = getattr(task, "sequences", ())
    views = getattr(task, "views", ())
    if sequences and series.label("sequence") not in sequences:
        return False
    return not views or series.label("view") in views


def _frames(series: SeriesData, size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    s_count, t_count = series.images.shape[:2]
    index = [(s, t) for s in range(s_count) for t in range(t_count)]
    frames = series.images.reshape(-1, *series.images.shape[-2:])
    from shared_model.tasks.base import resize_frames

    return resize_frames(frames, size), index


def _write_mask(model: torch.nn.Module, task: Task, series: SeriesData, size: int,
                device: torch.device, out: Path, spacing_mm: tuple[float, float]) -> int:
    """A NIfTI mask in the store's grid: (col, row, slice, phase), MASK_VALUES; the affine
    scales by the store's in-plane spacing and the stack's slice spacing (mm)."""
    inputs, index = _frames(series, size)
    labels = predict_all(model, task, inputs, device)  # (N, size, size) task class indices
    store_size = series.images.shape[-1]
    full = F.interpolate(labels[:, None].float(), size=(store_size, store_size),
                         mode="nearest-exact")[:, 0].to(torch.uint8).numpy()
    full = np.stack([clean_labels(frame, task.convex_classes) for frame in full])  # as `predict` on raw inputs
    values = np.zeros(len(task.classes) + 1, dtype=np.uint8)  # type: ignore[attr-defined]
    for i, (_, mask_values) in enumerate(task.classes, start=1):  # type: ignore[attr-defined]
        values[i] = mask_values[0]
    volume = values[full].reshape(series.images.shape)  # (S, T, H, W) in MASK_VALUES
    data = np.ascontiguousarray(volume.transpose(3, 2, 0, 1))  # NIfTI order: col, row, slice, phase
    in_plane, between = spacing_mm
    image = nib.Nifti1Image(data, np.diag([in_plane, in_plane, between, 1.0]))
    payload = gzip.compress(image.to_bytes(), mtime=0)
    atomic_write_bytes(out / "masks" / f"{series.key}.nii.gz", payload)
    return len(index)


def _landmark_rows(model: torch.nn.Module, task: Task, series: SeriesData, size: int,
                   device: torch.device) -> list[dict[str, object]]:
    inputs, index = _frames(series, size)
    coords = predict_all(model, task, inputs, device)  # (N, L, 2) input pixels
    scale = series.images.shape[-1] / size
    rows = []
    for (s, t), points in zip(index, coords.tolist(), strict=True):
        for name, (r, c) in zip(task.landmarks, points, strict=True):  # type: ignore[attr-defined]
            rows.append({"series": series.key, "slice": s, "phase": t, "landmark": name,
                         "row": round((r + 0.5) * scale - 0.5, 2), "col": round((c + 0.5) * scale - 0.5, 2)})
    return rows


def _class_rows(model: torch.nn.Module, task: Task, series: SeriesData, size: int,
                device: torch.device) -> list[dict[str, object]]:
    classes = task.classes  # type: ignore[attr-defined]
    if task.kind == TaskKind.bag_classification:
        data = task.build([series], size)
        if len(data) == 0:
            return []
        probs = predict_all(model, task, data.inputs, device)[0]
        return [{"series": series.key, "prediction": classes[int(probs.argmax())],
                 **{f"p_{c}": round(float(p), 4) for c, p in zip(classes, probs, strict=True)}}]
    inputs, _ = _frames(series, size)
    probs = predict_all(model, task, inputs, device).mean(dim=0)  # average over the series' frames
    return [{"series": series.key, "prediction": classes[int(probs.argmax())],
             **{f"p_{c}": round(float(p), 4) for c, p in zip(classes, probs, strict=True)}}]


def _write_table(out: Path, task_name: str, rows: list[dict[str, object]]) -> None:
    atomic_write_text(out / f"{task_name}.json", json.dumps(rows, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / f"{task_name}.csv", buffer.getvalue())
