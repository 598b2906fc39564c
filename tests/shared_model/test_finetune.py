"""Fine-tuning modes, layer-wise decay, DP-SGD with an accountant, and mid-session resume."""

import json
from pathlib import Path

import pytest
import torch

from shared_model.checkpoint import CheckpointError, LoopState, load_loop_state, save_loop_state
from shared_model.config import FinetuneMode, TasksConfig, load_config
from shared_model.encoders import build_encoder
from shared_model.finetune import SCRATCH_RECIPE, evaluate, finetune, param_groups
from shared_model.privacy import DPSettings, PrivacyError, epsilon_for
from shared_model.tasks import get_task
from shared_model.tasks.models import build_task_model
from shared_model.train import CheckpointPolicy, make_generator
from shared_model.weights import load_safetensors, save_safetensors
from tests.shared_model.task_fixtures import run_killed_on_loss_call, sax_series

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sax_data():
    series = [sax_series(f"s{i}", f"subj{i}", seed=i) for i in range(2)]
    return get_task("sax_seg").build(series, 64)


def _model(task_name: str = "sax_seg") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_task_model(get_task(task_name), build_encoder("vit-tiny-p8-64"))


def _settings(**kw) -> TasksConfig:
    return TasksConfig(**{"steps": 3, "batch_size": 4, "lr": 1e-3, **kw})


def test_layerwise_decay_scales_encoder_blocks() -> None:
    model = _model()
    groups = param_groups(model, weight_decay=0.01, layer_decay=0.5)
    scales = {}
    for group in groups:
        for p in group["params"]:
            scales[id(p)] = group["lr_scale"]
    named = dict(model.named_parameters())
    assert scales[id(named["head.out.weight"])] == 1.0
    assert scales[id(named["encoder.blocks.3.attn.qkv.weight"])] == 0.5
    assert scales[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5**4
    assert scales[id(named["encoder.pos_embed"])] == 0.5**5


def test_scratch_baseline_trains_everything_at_one_learning_rate() -> None:
    # the default layer-wise decay would give a random stem a seventh of the head's rate
    default, scratch = load_config(None, []).tasks, load_config(None, list(SCRATCH_RECIPE)).tasks
    assert scratch.mode == FinetuneMode.full and default.layer_decay < 1.0
    model = _model()
    groups = param_groups(model, scratch.weight_decay, scratch.layer_decay)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", list(FinetuneMode))
def test_modes_train_what_they_should(mode: FinetuneMode, sax_data) -> None:
    model = _model()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    result = finetune(model, get_task("sax_seg"), sax_data, _settings(mode=mode, frozen_fraction=0.5),
                      gen=make_generator(0), device=CPU)
    encoder_moved = any(not torch.equal(encoder_before[k], v) for k, v in model.encoder.state_dict().items())
    head_moved = any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    # a plain ViT has no conv stem: there tasks.mode=stem (and so auto) is linear
    frozen = (FinetuneMode.linear, FinetuneMode.stem, FinetuneMode.auto)
    assert head_moved and encoder_moved == (mode not in frozen)
    assert result.local.steps == 3


@pytest.mark.parametrize("private", [False, True])
def test_stem_mode_trains_the_conv_stem_through_the_skips_alone(private: bool) -> None:
    task = get_task("sax_seg")
    data = task.build([sax_series(f"s{i}", f"subj{i}", seed=i) for i in range(2)], 96)
    torch.manual_seed(0)
    model = build_task_model(task, build_encoder("hybrid-unet-p16-96"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a trained stem's tokens would carry its gradient through the transformer unless detached
    through_vit: list[bool] = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, out: through_vit.append(out.requires_grad))
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5) if private else None
    result = finetune(model, task, data, _settings(mode=FinetuneMode.stem, steps=2),
                      gen=make_generator(0), device=CPU, dp=dp)
    assert through_vit and not any(through_vit)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert any(k.startswith("encoder.patch_embed.stages.") for k in moved)
    assert "head.out.weight" in moved
    # the transformer, and the projection to its tokens, stay as pretrained
    assert not any(k.startswith("encoder.") and not k.startswith("encoder.patch_embed.stages.")
                   for k in moved)
    assert model.encoder.patch_embed.detach_tokens is False  # full fine-tuning later back-propagates
    assert (result.epsilon > 0) == private


def test_stem_mode_trains_the_stem_at_the_decoders_rate() -> None:
    # layer-wise decay would give the stem (the embeddings' layer) 0.75**7 of the decoder's rate
    from shared_model.finetune import mode_param_groups

    torch.manual_seed(0)
    model = build_task_model(get_task("sax_seg"), build_encoder("hybrid-unet-p16-96"))
    model.encoder.requires_grad_(False)
    model.encoder.patch_embed.stages.requires_grad_(True)
    settings = _settings(layer_decay=0.75)
    scales = {id(p): g["lr_scale"] for g in mode_param_groups(model, settings, FinetuneMode.stem)
              for p in g["params"]}
    named = dict(model.named_parameters())
    assert scales[id(named["encoder.patch_embed.stages.0.conv1.weight"])] == 1.0
    assert set(scales.values()) == {1.0}
    model.encoder.requires_grad_(True)
    full = {id(p): g["lr_scale"] for g in mode_param_groups(model, settings, FinetuneMode.full)
            for p in g["params"]}
    assert full[id(named["encoder.patch_embed.stages.0.conv1.weight"])] == pytest.approx(0.75**7)


def test_auto_mode_trains_the_stem_only_with_enough_labelled_subjects() -> None:
    from shared_model.finetune import STEM_MIN_SUBJECTS, resolved_mode
    from shared_model.tasks.unet import build_unet

    task = get_task("sax_seg")
    data = task.build([sax_series(f"s{i}", f"subj{i}", seed=i) for i in range(STEM_MIN_SUBJECTS)], 96)
    fewer = data.subset([i for i, s in enumerate(data.subjects) if s != "subj0"])
    hybrid = build_task_model(task, build_encoder("hybrid-unet-p16-96"))
    assert resolved_mode(FinetuneMode.auto, hybrid, data) == FinetuneMode.stem
    assert resolved_mode(FinetuneMode.auto, hybrid, fewer) == FinetuneMode.linear
    # no conv stem to train (a plain ViT, or a classifier whose head never sees the skips)
    assert resolved_mode(FinetuneMode.auto, _model(), data) == FinetuneMode.linear
    classifier = build_task_model(get_task("view"), build_encoder("hybrid-unet-p16-96"))
    assert resolved_mode(FinetuneMode.auto, classifier, data) == FinetuneMode.linear
    assert resolved_mode(FinetuneMode.linear, hybrid, data) == FinetuneMode.linear
    assert resolved_mode(FinetuneMode.auto, build_unet(task), data) == FinetuneMode.full
    result = finetune(hybrid, task, data, _settings(mode=FinetuneMode.auto, steps=1),
                      gen=make_generator(0), device=CPU)
    assert result.mode == FinetuneMode.stem


def test_evaluate_reports_task_metrics(sax_data) -> None:
    metrics = evaluate(_model(), get_task("sax_seg"), sax_data, CPU)
    assert {"dice_lv_blood", "dice_lv_myo", "dice_rv_blood", "hd95_mm_lv_blood", "samples"} <= set(metrics)


def test_dp_sgd_reports_epsilon_and_strips_the_wrapper(sax_data) -> None:
    model = _model()
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    result = finetune(model, get_task("sax_seg"), sax_data, _settings(mode=FinetuneMode.full, steps=2),
                      gen=make_generator(0), device=CPU, dp=dp)
    assert result.epsilon > 0
    assert not any(k.startswith("_module.") for k in model.state_dict())
    # The accountant history is plain data: epsilon recomputes from it, and grows with more steps.
    assert epsilon_for(result.dp_history, 1e-5) == pytest.approx(result.epsilon)
    more = finetune(model, get_task("sax_seg"), sax_data, _settings(mode=FinetuneMode.linear, steps=2),
                    gen=make_generator(1), device=CPU, dp=dp, dp_history=result.dp_history)
    assert more.epsilon > result.epsilon


def test_dp_refuses_unfreezing_mid_session(sax_data) -> None:
    with pytest.raises(PrivacyError, match="linear, stem, auto or full"):
        finetune(_model(), get_task("sax_seg"), sax_data, _settings(mode=FinetuneMode.frozen_then_unfrozen),
                 gen=make_generator(0), device=CPU, dp=DPSettings(1.0, 1.0, 1e-5))


def test_resume_mid_session_gives_identical_weights(tmp_path: Path, sax_data, monkeypatch) -> None:
    task, settings = get_task("sax_seg"), _settings(steps=4)
    # Uninterrupted run.
    straight = _model()
    finetune(straight, task, sax_data, settings, gen=make_generator(7), device=CPU)
    # A run killed during its third step (the checkpoint is written every 2 steps) ...
    policy = CheckpointPolicy(tmp_path / "loop.safetensors", every=2, fingerprint="sax/seed7")
    run_killed_on_loss_call(monkeypatch, 3, lambda: finetune(_model(), task, sax_data, settings, gen=make_generator(7),
                                                             device=CPU, checkpoint=policy))
    # ... and resumed by a fresh process-like start from the same seed.
    resumed = _model()
    result = finetune(resumed, task, sax_data, settings, gen=make_generator(7), device=CPU,
                      checkpoint=policy)
    assert result.local.resumed_from == 2
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key


def test_checkpoint_of_another_session_or_corrupt_is_refused(tmp_path: Path, sax_data) -> None:
    task = get_task("sax_seg")
    policy = CheckpointPolicy(tmp_path / "loop.safetensors", every=1, fingerprint="a")
    finetune(_model(), task, sax_data, _settings(steps=1), gen=make_generator(0), device=CPU, checkpoint=policy)
    other = CheckpointPolicy(policy.path, every=1, fingerprint="b")
    with pytest.raises(CheckpointError, match="belongs to session 'a'"):
        finetune(_model(), task, sax_data, _settings(steps=2), gen=make_generator(0), device=CPU, checkpoint=other)
    policy.path.write_bytes(policy.path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a usable"):
        finetune(_model(), task, sax_data, _settings(steps=2), gen=make_generator(0), device=CPU, checkpoint=policy)


@pytest.mark.parametrize("edit, fragment", [
    (lambda t, m: m.pop("step"), "'step'"),
    (lambda t, m: m["optimizer"].pop("scalars"), "'optimizer.scalars'"),
    (lambda t, m: m.update(optimizer=[]), "'optimizer'"),
    (lambda t, m: t.pop("rng/generator"), "'rng/generator'"),
])
def test_checkpoint_missing_fields_are_named_not_key_errors(tmp_path: Path, edit, fragment) -> None:
    # Prepare: a small loop checkpoint with one metadata field or tensor removed
    path = tmp_path / "loop.safetensors"
    save_loop_state(path, LoopState(
        step=2, model={"w": torch.ones(2)},
        optimizer={"state": {0: {"exp_avg": torch.zeros(2), "step": 2.0}}, "param_groups": [{}]},
        generator=make_generator(0).get_state(), batch_order=torch.arange(4)))
    tensors, raw = load_safetensors(path)
    meta = json.loads(raw["fedcmr"])
    edit(tensors, meta)
    save_safetensors(path, tensors, {"fedcmr": json.dumps(meta)})

    # Execute / Assert: a CheckpointError naming the file and the field
    with pytest.raises(CheckpointError, match=fragment) as caught:
        load_loop_state(path)
    assert str(path) in str(caught.value)


@pytest.mark.reliability(10)
def test_dp_noise_is_unpredictable_unless_a_simulation_asks_for_reproducible_noise(sax_data) -> None:
    def weights_after(dp: DPSettings) -> torch.Tensor:
        torch.manual_seed(0)
        model = _model()
        finetune(model, get_task("sax_seg"), sax_data, _settings(mode=FinetuneMode.full, steps=2),
                 gen=make_generator(0), device=CPU, dp=dp)
        return torch.cat([p.detach().flatten() for p in model.head.parameters()])

    secure = DPSettings(1.0, 1.0, 1e-5)
    assert not torch.equal(weights_after(secure), weights_after(secure))  # same plan seed
    seeded = DPSettings(1.0, 1.0, 1e-5, reproducible_noise=True)
    assert torch.equal(weights_after(seeded), weights_after(seeded))


def test_unfreezing_follows_a_time_budget_not_only_steps(sax_data, monkeypatch) -> None:
    # Prepare: a session bounded by time (steps far out of reach) whose clock reads 1/4 of the
    # budget more at every step and runs out after 4 steps
    import shared_model.train as train_module

    ticks = {"n": 0}

    def fraction(self, step: int, steps: int) -> float:
        return min(1.0, step / 4)

    def expired(self) -> bool:
        ticks["n"] += 1
        return ticks["n"] > 4

    monkeypatch.setattr(train_module.SessionClock, "fraction", fraction)
    monkeypatch.setattr(train_module.SessionClock, "expired", expired)
    model = _model()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    settings = _settings(mode=FinetuneMode.frozen_then_unfrozen, steps=10**6, max_seconds=100.0,
                         frozen_fraction=0.5)
    # Run
    result = finetune(model, get_task("sax_seg"), sax_data, settings, gen=make_generator(0), device=CPU)
    # Check: the encoder trained in the second half of the budget (it stayed frozen before
    # when the switch counted steps of a budget it never reached)
    assert result.local.steps == 4
    assert any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())


def test_foreground_groups_name_the_frames_that_hold_each_class(sax_data) -> None:
    from shared_model.finetune import foreground_groups

    task = get_task("sax_seg")
    groups = foreground_groups(task, sax_data)
    assert len(groups) == task.num_outputs - 1
    for label, group in enumerate(groups, start=1):
        holds = (sax_data.targets == label).flatten(1).any(1)
        assert torch.equal(group, torch.nonzero(holds).flatten())
    assert foreground_groups(get_task("view"), sax_data) == []


@pytest.mark.reliability(10)
def test_a_model_with_batchnorm_is_refused_for_dp_sgd() -> None:
    # Per-sample clipping cannot bound one image's influence through batch statistics
    from shared_model.privacy import make_private

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    data = torch.utils.data.TensorDataset(torch.zeros(8, 1, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PrivacyError, match="cannot train under DP-SGD"):
        make_private(model, optimizer, data, 4, DPSettings(1.0, 1.0, 1e-5), make_generator(0))
