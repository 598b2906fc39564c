"""A frozen encoder's features kept per augmented view (tasks.feature_views)."""

from pathlib import Path

import pytest
import torch

from shared_model.config import FinetuneMode, TasksConfig
from shared_model.encoders import build_encoder
from shared_model.feature_bank import FeatureBank
from shared_model.finetune import augment_batch, finetune
from shared_model.tasks import get_task
from shared_model.tasks.models import build_task_model
from shared_model.train import CheckpointPolicy, make_generator
from tests.shared_model.task_fixtures import run_killed_on_loss_call, lge_series, sax_series

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sax96():
    return get_task("sax_seg").build([sax_series(f"s{i}", f"subj{i}", seed=i) for i in range(2)], 96)


def _hybrid(task_name: str = "sax_seg") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_task_model(get_task(task_name), build_encoder("hybrid-unet-p16-96"))


def _settings(**kw) -> TasksConfig:
    return TasksConfig(**{"steps": 6, "batch_size": 4, "lr": 1e-3, "mode": FinetuneMode.linear, **kw})


@pytest.mark.parametrize("task_name,preset", [("sax_seg", "hybrid-unet-p16-96"), ("sax_seg", "vit-tiny-p8-64"),
                                              ("view", "vit-tiny-p8-64"), ("lge_pathology", "vit-tiny-p8-64")])
def test_decoding_the_encoded_features_is_the_forward_pass(task_name: str, preset: str) -> None:
    torch.manual_seed(0)
    model = build_task_model(get_task(task_name), build_encoder(preset)).eval()
    size = 96 if preset.endswith("96") else 64
    shape = (2, 3, 1, size, size) if task_name == "lge_pathology" else (2, 1, size, size)
    images = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(model(images), model.decode(images, model.encode(images)))


def test_linear_mode_computes_each_view_once_and_trains_the_head_alone(sax96, monkeypatch) -> None:
    model, task = _hybrid(), get_task("sax_seg")
    encoded: list[int] = []
    real_encode = type(model).encode
    monkeypatch.setattr(type(model), "encode", lambda self, x: (encoded.append(len(x)), real_encode(self, x))[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    views = 4  # MIN_VIEWS
    # 40 steps of 4 draws = 160 draws of at most len(data) * views distinct views
    finetune(model, task, sax96, _settings(steps=40, feature_views=views, augment=True),
             gen=make_generator(0), device=CPU)
    assert 0 < sum(encoded) <= len(sax96) * views < 40 * 4
    moved = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert "head.out.weight" in moved and not any(k.startswith("encoder.") for k in moved)


def test_without_the_bank_the_encoder_runs_every_step(sax96, monkeypatch) -> None:
    model, task = _hybrid(), get_task("sax_seg")
    encoded: list[int] = []
    real_encode = type(model).encode
    monkeypatch.setattr(type(model), "encode", lambda self, x: (encoded.append(len(x)), real_encode(self, x))[1])
    finetune(model, task, sax96, _settings(steps=3, feature_views=0), gen=make_generator(0), device=CPU)
    assert encoded == [4, 4, 4]


def test_a_view_holds_the_same_augmentation_whenever_it_is_first_drawn(sax96) -> None:
    task = get_task("sax_seg")
    model = _hybrid().eval()
    banks = [FeatureBank(model, task, sax96, 8, seed=5, augment=augment_batch, device=CPU) for _ in range(2)]
    index, slots = torch.tensor([3, 1, 3, 0]), torch.tensor([2, 7, 5, 1])
    first = banks[0].draw(index, slots)
    banks[1].draw(index.flip(0), slots.flip(0))  # filled in the other order
    second = banks[1].draw(index, slots)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.equal(first[0][0], first[0][2])  # two views of one sample differ


def test_the_bank_fits_its_memory_or_stays_off(sax96) -> None:
    task, model = get_task("sax_seg"), _hybrid().eval()
    small = FeatureBank(model, task, sax96, 16, seed=0, augment=augment_batch, device=CPU, memory_bytes=1 << 10)
    assert not small.active
    probe = FeatureBank(model, task, sax96, 16, seed=0, augment=augment_batch, device=CPU)
    per_view = sum(t.numel() * t.element_size() for t in probe.draw(torch.tensor([0]), torch.tensor([0]))[2])
    assert per_view > 4 * 4 * 36 * 192  # the tapped tokens and the stem's skips
    fit = FeatureBank(model, task, sax96, 16, seed=0, augment=augment_batch, device=CPU,
                      memory_bytes=6 * (per_view + 12 * 96 * 96) * len(sax96))
    assert fit.views == 6


def test_bag_tasks_train_on_stored_features() -> None:
    task = get_task("lge_pathology")
    data = task.build([lge_series(f"l{i}", f"subj{i}", scar=bool(i % 2)) for i in range(4)], 64)
    torch.manual_seed(0)
    model = build_task_model(task, build_encoder("vit-tiny-p8-64"))
    before = model.head.classify.weight.clone()
    finetune(model, task, data, _settings(steps=3, batch_size=2), gen=make_generator(0), device=CPU)
    assert not torch.equal(before, model.head.classify.weight)


def test_resume_with_the_bank_gives_identical_weights(tmp_path: Path, sax96, monkeypatch) -> None:
    task, settings = get_task("sax_seg"), _settings(steps=4, feature_views=4)
    straight = _hybrid()
    finetune(straight, task, sax96, settings, gen=make_generator(7), device=CPU)
    policy = CheckpointPolicy(tmp_path / "loop.safetensors", every=2, fingerprint="sax/seed7")
    run_killed_on_loss_call(monkeypatch, 3, lambda: finetune(_hybrid(), task, sax96, settings, gen=make_generator(7),
                                                             device=CPU, checkpoint=policy))
    resumed = _hybrid()
    result = finetune(resumed, task, sax96, settings, gen=make_generator(7), device=CPU, checkpoint=policy)
    assert result.local.resumed_from == 2
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-5), key
