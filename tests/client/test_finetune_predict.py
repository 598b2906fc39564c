"""Hospital-side fine-tuning and prediction on a store, from a model bundle."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from client.finetune import finetune_on_store, predict_on_store, series_from_store, split_subjects
from client.store import LocalStore, SeriesRecord, StoreError
from shared_model.bundle import load_bundle
from shared_model.config import load_config, save_resolved_config
from shared_model.encoders import build_encoder
from shared_model.labels import MASK_VALUES, frame_key
from shared_model.weights import save_safetensors
from tests.shared_model.task_fixtures import lge_series, sax_series


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    store = LocalStore.create(root, spacing_mm=1.5, crop_px=32)
    for i in range(4):
        sax = sax_series(f"sax{i}", f"subj{i}", seed=i, disease=("NOR", "DCM")[i % 2])
        store.add_series(SeriesRecord(
            key=sax.key, array="", shape=[], sequence="cine", view="sax", subject=sax.subject,
            labeled_frames=[list(f) for f in sax.labeled_frames],
            landmarks={frame_key(*f): {n: list(p) for n, p in pts.items()} for f, pts in sax.landmarks.items()}),
            sax.images, sax.mask)
        store.set_subject_labels(sax.subject, {"disease": sax.subject_labels["disease"]})
        lge = lge_series(f"lge{i}", f"subj{i}", scar=bool(i % 2))
        store.add_series(SeriesRecord(key=lge.key, array="", shape=[], sequence="lge", view="sax",
                                      subject=lge.subject, labeled_frames=[list(f) for f in lge.labeled_frames],
                                      classes=dict(lge.classes)), lge.images, lge.mask)
    return root


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    cfg = load_config("demo-cpu", ["data.crop_px=32"])  # the grid of the store it fine-tunes on
    save_resolved_config(cfg, root)
    torch.manual_seed(0)
    save_safetensors(root / "encoder.safetensors", build_encoder(cfg.model.preset).state_dict())
    return root


def test_a_store_on_another_grid_than_the_model_is_refused_with_the_fix(
        tmp_path: Path, labelled_store: Path) -> None:
    root = tmp_path / "bundle64"
    cfg = load_config("demo-cpu", ["data.crop_px=64"])
    save_resolved_config(cfg, root)
    save_safetensors(root / "encoder.safetensors", build_encoder(cfg.model.preset).state_dict())
    with pytest.raises(StoreError, match=r"1.5 mm x 32 px, the model's 1.5 mm x 64 px.*data.crop_px=64"):
        finetune_on_store("sax_seg", root, labelled_store, tmp_path / "ft", cfg, label_budget=2)
    assert not (tmp_path / "ft").exists()


def test_store_series_carry_labels(labelled_store: Path) -> None:
    series = {s.key: s for s in series_from_store(LocalStore.open(labelled_store))}
    assert series["sax0"].mask is not None and series["sax0"].mask.shape == (3, 4, 32, 32)
    assert series["sax1"].subject_labels == {"disease": "DCM"}
    assert (0, 0) in series["sax0"].landmarks and series["lge1"].classes["lge_pathology"] == "scar"


def test_split_keeps_subjects_whole_and_respects_the_budget() -> None:
    train, test = split_subjects(["a", "a", "b", "c", "d", "e"], label_budget=1, test_fraction=0.4, seed=3)
    assert len(train) == 1 and len(test) == 2 and not set(train) & set(test)
    with pytest.raises(ValueError, match="at least 2 subjects"):
        split_subjects(["a", "a"], 1, 0.5, 0)


def test_finetune_then_predict_segmentation(tmp_path: Path, labelled_store: Path, base_bundle: Path) -> None:
    cfg = load_config("demo-cpu", ["tasks.steps=2", "tasks.batch_size=4", "device=cpu"])
    report = finetune_on_store("sax_seg", base_bundle, labelled_store, tmp_path / "ft", cfg, label_budget=2)
    assert report.train_subjects == 2 and report.test_subjects >= 1
    assert {"dice_lv_blood", "dice_lv_myo", "dice_rv_blood"} <= set(report.metrics)
    bundle = load_bundle(tmp_path / "ft")
    assert bundle.has_task("sax_seg")
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert saved["task"] == "sax_seg" and saved["train_subjects"] == 2
    counts = predict_on_store("sax_seg", tmp_path / "ft", labelled_store, tmp_path / "pred", "cpu")
    assert counts["series"] == 4
    mask = nib.load(tmp_path / "pred" / "masks" / "sax0.nii.gz").get_fdata()
    assert mask.shape == (32, 32, 3, 4)  # col, row, slice, phase
    assert set(np.unique(mask).astype(int)) <= {0, *MASK_VALUES.values()}


@pytest.mark.parametrize("task, column", [("lge_pathology", "prediction"), ("landmarks", "landmark")])
def test_predict_writes_classes_and_landmarks(tmp_path: Path, labelled_store: Path, base_bundle: Path,
                                             task: str, column: str) -> None:
    cfg = load_config("demo-cpu", ["tasks.steps=1", "tasks.batch_size=2", "device=cpu"])
    finetune_on_store(task, base_bundle, labelled_store, tmp_path / "ft", cfg)
    predict_on_store(task, tmp_path / "ft", labelled_store, tmp_path / "pred", "cpu")
    rows = json.loads((tmp_path / "pred" / f"{task}.json").read_text())
    assert rows and column in rows[0]
    assert (tmp_path / "pred" / f"{task}.csv").read_text().splitlines()[0].startswith("series,")


def test_predict_without_a_head_says_how_to_get_one(tmp_path: Path, labelled_store: Path, base_bundle: Path) -> None:
    from shared_model.bundle import BundleError

    with pytest.raises(BundleError, match="fedcmr-client finetune --task sax_seg"):
        predict_on_store("sax_seg", base_bundle, labelled_store, tmp_path / "pred", "cpu")


def test_cli_finetune_and_predict(tmp_path: Path, labelled_store: Path, base_bundle: Path) -> None:
    from typer.testing import CliRunner

    from client.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "--task", "sax_seg", "--model", str(base_bundle), "--store",
                                 str(labelled_store), "--out", str(tmp_path / "ft"), "--label-budget", "2",
                                 "tasks.steps=1", "tasks.batch_size=2", "device=cpu"])
    assert result.exit_code == 0, result.output
    assert "dice_lv_blood" in result.output and "bundle written to" in result.output
    result = runner.invoke(app, ["predict", "--task", "sax_seg", "--model", str(tmp_path / "ft"),
                                 str(labelled_store), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred" / "masks").glob("*.nii.gz"))) == 4
    bad = runner.invoke(app, ["finetune", "--task", "no_such_task", "--model", str(base_bundle), "--store",
                              str(labelled_store), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown task" in bad.output


def test_unet_trains_on_pooled_stores_without_a_holdout_and_predicts(
        tmp_path: Path, labelled_store: Path) -> None:
    # Prepare: the same store twice stands for two hospitals' stores pooled at one node
    cfg = load_config(None, ["tasks.arch=unet", "tasks.steps=3", "tasks.batch_size=2",
                             "device=cpu", "model.preset=vit-tiny-p8-64"])

    # Execute
    report = finetune_on_store("sax_seg", None, [labelled_store, labelled_store], tmp_path / "unet",
                               cfg, test_fraction=0.0)
    counts = predict_on_store("sax_seg", tmp_path / "unet", labelled_store, tmp_path / "pred", "cpu")

    # Assert
    assert report.test_subjects == 0 and report.train_subjects == 8 and report.metrics == {}
    assert not (tmp_path / "unet" / "encoder.safetensors").exists()  # nothing foundational in it
    assert load_bundle(tmp_path / "unet").config.tasks.arch.value == "unet"
    assert counts["series"] == 4


def test_wall_clock_budget_ends_the_session(tmp_path: Path, labelled_store: Path, base_bundle: Path) -> None:
    cfg = load_config("demo-cpu", ["tasks.steps=100000", "tasks.max_seconds=1.0",
                                   "tasks.batch_size=2", "device=cpu"])
    report = finetune_on_store("sax_seg", base_bundle, labelled_store, tmp_path / "ft", cfg)
    assert 1 <= report.steps < 100000


def test_unet_refuses_classification_tasks(tmp_path: Path, labelled_store: Path) -> None:
    cfg = load_config(None, ["tasks.arch=unet", "tasks.steps=1", "device=cpu"])
    with pytest.raises(ValueError, match="tasks.arch=unet serves per-pixel tasks"):
        finetune_on_store("lge_pathology", None, labelled_store, tmp_path / "x", cfg)


@pytest.mark.parametrize("task", ["sax_seg", "lge_pathology"])
def test_export_onnx_matches_pytorch(tmp_path: Path, labelled_store: Path, base_bundle: Path,
                                     task: str) -> None:
    from typer.testing import CliRunner

    from client.cli import app
    from client.export import export_onnx

    cfg = load_config("demo-cpu", ["tasks.steps=1", "tasks.batch_size=2", "device=cpu"])
    finetune_on_store(task, base_bundle, labelled_store, tmp_path / "ft", cfg)
    result = export_onnx(task, tmp_path / "ft", tmp_path / "model.onnx")
    assert result.max_abs_difference < 1e-4 and result.path.stat().st_size > 10_000
    cli = CliRunner().invoke(app, ["export-onnx", "--task", task, "--model", str(tmp_path / "ft"),
                                   "--out", str(tmp_path / "cli.onnx")])
    assert cli.exit_code == 0 and "max abs difference" in cli.output, cli.output
