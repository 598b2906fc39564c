"""Every task: samples from series, model output shapes, finite loss and metrics."""

import math

import pytest
import torch
from opacus.validators import ModuleValidator

from shared_model.encoders import build_encoder
from shared_model.labels import UNKNOWN
from shared_model.tasks import TASKS, get_task
from shared_model.tasks.base import TaskKind
from shared_model.tasks.models import build_task_model, depth_indices
from shared_model.tasks.scoring import (
    decode_heatmaps,
    gaussian_heatmaps,
    predict,
    segmentation_metrics,
    task_loss,
    task_metrics,
)
from tests.shared_model.task_fixtures import lge_series, sax_series

SIZE = 64


@pytest.fixture(scope="module")
def cohort_series() -> list:
    series = [sax_series(f"sax{i}", f"subj{i}", disease=("NOR", "DCM")[i % 2], seed=i) for i in range(4)]
    series += [lge_series(f"lge{i}", f"subj{i}", scar=bool(i % 2)) for i in range(4)]
    return series


def test_nine_tasks_are_registered() -> None:
    assert set(TASKS) == {"sequence", "view", "sax_seg", "lax_seg", "lge_seg", "mapping_seg",
                          "landmarks", "lge_pathology", "disease"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_model_shapes_loss_and_metrics(name: str, cohort_series: list) -> None:
    task = get_task(name)
    data = task.build(cohort_series, SIZE)
    if len(data) == 0:  # tasks whose sequences the fixture lacks: use a synthetic toy batch
        data = _toy_batch(task)
    torch.manual_seed(0)
    model = build_task_model(task, build_encoder("vit-tiny-p8-64"))
    assert ModuleValidator.validate(model, strict=False) == []
    batch = data.subset(range(min(4, len(data))))
    outputs = model(batch.inputs)
    expected = {TaskKind.segmentation: (len(batch), task.num_outputs, SIZE, SIZE),
                TaskKind.landmarks: (len(batch), task.num_outputs, SIZE, SIZE)}.get(
        task.kind, (len(batch), task.num_outputs))
    assert tuple(outputs.shape) == expected
    loss = task_loss(task, outputs, batch.targets, batch.valid)
    assert torch.isfinite(loss)
    loss.backward()
    metrics = task_metrics(task, predict(task, outputs.detach()), batch.targets, batch.valid,
                           data.spacing_mm or 3.0)
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    assert any(math.isfinite(v) for v in metrics.values())


def _toy_batch(task):
    from shared_model.tasks.base import TaskData
    n = 4
    if task.kind == TaskKind.segmentation:
        return TaskData(torch.rand(n, 1, SIZE, SIZE), torch.randint(0, task.num_outputs, (n, SIZE, SIZE)),
                        ["a"] * n, 3.0)
    return TaskData(torch.rand(n, 1, SIZE, SIZE), torch.arange(n) % task.num_outputs, ["a"] * n, 3.0)


def test_segmentation_samples_and_class_maps(cohort_series: list) -> None:
    sax = get_task("sax_seg").build(cohort_series, SIZE)
    assert len(sax) == 4 * 3 * 2  # 4 series x 3 slices x 2 labelled phases
    assert sax.inputs.shape == (24, 1, SIZE, SIZE) and sax.targets.shape == (24, SIZE, SIZE)
    assert set(sax.targets.unique().tolist()) == {0, 1, 2, 3}
    assert sax.spacing_mm == pytest.approx(1.5 * 32 / SIZE)
    lge = get_task("lge_seg").build(cohort_series, SIZE)
    assert set(lge.targets.unique().tolist()) == {0, 1, 2}  # background, remote myo, scar


def test_bag_tasks_pool_series_and_subjects(cohort_series: list) -> None:
    lge = get_task("lge_pathology").build(cohort_series, SIZE)
    assert lge.inputs.shape == (4, 8, 1, SIZE, SIZE)
    assert lge.targets.tolist() == [0, 1, 0, 1]  # lge0..3: no_scar, scar, ...
    disease = get_task("disease").build(cohort_series, SIZE)
    assert len(disease) == 4 and disease.inputs.shape[1] == 16
    assert sorted(disease.targets.tolist()) == [0, 0, 1, 1]  # NOR, DCM


def test_classification_labels_fall_back_to_headers(cohort_series: list) -> None:
    seq = get_task("sequence").build(cohort_series, SIZE)
    assert sorted(set(seq.targets.tolist())) == [0, 1]  # cine, lge
    unknown = sax_series("u", "subj9")
    unknown.sequence = UNKNOWN
    assert len(get_task("sequence").build([unknown], SIZE)) == 0


def test_landmark_samples_scale_to_input_pixels(cohort_series: list) -> None:
    data = get_task("landmarks").build(cohort_series[:1], SIZE)
    assert data.valid is not None and data.valid[:, :2].all() and not data.valid[:, 2:].any()
    # (8.0 + 0.5) * 2 - 0.5 in input pixels for a store point at row 8.0 of a 32 px image
    first = data.targets[0, 0]
    assert first[0].item() == pytest.approx((16 - 8.25 + 0.5) * 2 - 0.5)


def test_heatmap_decoding_is_sub_pixel() -> None:
    coords = torch.tensor([[[20.3, 41.7], [5.5, 60.25]]])
    heat = gaussian_heatmaps(coords, 64, 64).view(1, 2, 64, 64)
    decoded = decode_heatmaps(torch.log(heat + 1e-12))
    assert torch.allclose(decoded, coords, atol=0.06)  # < 0.2 mm at 3 mm pixels


def test_segmentation_metrics_perfect_and_shifted() -> None:
    task = get_task("sax_seg")
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    target[0, 8:24, 8:24] = 1
    perfect = segmentation_metrics(task, target.clone(), target, spacing_mm=2.0)
    assert perfect["dice_lv_blood"] == pytest.approx(1.0) and perfect["hd95_mm_lv_blood"] == pytest.approx(0.0)
    shifted = torch.roll(target, 2, dims=2)
    metrics = segmentation_metrics(task, shifted, target, spacing_mm=2.0)
    assert metrics["dice_lv_blood"] == pytest.approx(14 / 16, abs=1e-4)
    assert metrics["hd95_mm_lv_blood"] == pytest.approx(4.0, abs=0.01)  # 2 px x 2 mm


def test_depth_indices_end_at_the_last_block() -> None:
    assert depth_indices(4) == [0, 1, 2, 3]
    assert depth_indices(12) == [2, 5, 8, 11]


def test_partial_dice_ce_is_monai_dice_ce_when_every_class_is_drawn() -> None:
    from monai.losses import DiceCELoss

    from shared_model.tasks.scoring import partial_dice_ce

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 16, 16, generator=gen)
    targets = torch.randint(0, 4, (3, 16, 16), generator=gen)
    reference = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)(
        logits, targets[:, None])
    assert partial_dice_ce(logits, targets).item() == pytest.approx(reference.item(), rel=1e-5)
    all_drawn = torch.ones(3, 3, dtype=torch.bool)
    assert partial_dice_ce(logits, targets, all_drawn).item() == pytest.approx(reference.item(), rel=1e-5)


def test_partial_labels_leave_undrawn_classes_open() -> None:
    from shared_model.tasks.scoring import partial_dice_ce

    # Prepare: a frame that draws only class 1; outside it the model says "class 2" or "background"
    targets = torch.zeros(1, 8, 8, dtype=torch.long)
    targets[0, 2:5, 2:5] = 1
    says_2, says_bg = torch.full((1, 4, 8, 8), -10.0), torch.full((1, 4, 8, 8), -10.0)
    for logits in (says_2, says_bg):
        logits[0, 1][targets[0] == 1] = 10.0
    says_2[0, 2][targets[0] == 0] = 10.0
    says_bg[0, 0][targets[0] == 0] = 10.0
    only_1 = torch.tensor([[True, False, False]])

    # Execute / Assert: with a partial label both are right; with a complete one, class 2 is wrong
    assert partial_dice_ce(says_2, targets, only_1).item() == pytest.approx(
        partial_dice_ce(says_bg, targets, only_1).item(), abs=1e-4)
    assert partial_dice_ce(says_2, targets).item() > partial_dice_ce(says_bg, targets).item() + 1.0


def test_partial_frames_become_samples_with_their_drawn_classes() -> None:
    # Prepare: blood pool and myocardium drawn at ED (phase 0), only the blood pool at phase 2
    series = sax_series("s", "subj", phases=4)
    series.mask[:, 2][series.mask[:, 2] != 1] = 0
    series.mask[:, 1] = 0
    series.mask[series.mask == 3] = 0  # no RV anywhere: a dataset that labels the LV only
    series.labeled_frames = [(s, 0) for s in range(3)]
    series.partial_frames = {(s, 2): ("lv_blood",) for s in range(3)}

    # Execute
    data = get_task("sax_seg").build([series], SIZE)

    # Assert: classes lv_blood, lv_myo, rv_blood
    assert len(data) == 6
    assert data.valid.tolist() == [[True, True, False]] * 3 + [[True, False, False]] * 3
    from shared_model.finetune import absent_where_never_drawn

    trained = absent_where_never_drawn(get_task("sax_seg"), data)
    assert trained.valid[:, 2].all()  # the RV, never drawn: learned as absent


def test_segmentation_metrics_skip_frames_that_do_not_draw_a_structure() -> None:
    task = get_task("sax_seg")
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 4:10] = 1
    pred = target.clone()
    pred[1, 0:3, 0:3] = 2  # "myocardium" where frame 1 does not draw it
    drawn = torch.tensor([[True, True, True], [True, False, False]])
    metrics = segmentation_metrics(task, pred, target, 1.0, drawn)
    assert metrics["dice_lv_blood"] == pytest.approx(1.0)
    assert math.isnan(metrics["dice_lv_myo"])  # frame 0 has none, frame 1 does not draw it


def test_a_structure_no_test_frame_draws_is_undefined_not_an_error() -> None:
    # Prepare: two frames that label only the blood pool (the myocardium drawn by none)
    task = get_task("sax_seg")
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 4:10] = 1
    drawn = torch.tensor([[True, False, False], [True, False, False]])
    # Execute
    metrics = segmentation_metrics(task, target.clone(), target, 1.0, drawn)
    # Assert
    assert metrics["dice_lv_blood"] == pytest.approx(1.0)
    assert math.isnan(metrics["dice_lv_myo"]) and math.isnan(metrics["hd95_mm_lv_myo"])
    assert metrics["dice_mean"] == pytest.approx(1.0)
