"""SSL losses against reference computations on fixed inputs, and one step of each method."""

import math

import numpy as np
import pytest
import torch

from shared_model.config import load_config
from shared_model.ssl import build_ssl_model, federated_keys
from shared_model.ssl.dino import (
    cosine_schedule,
    dino_cross_entropy,
    teacher_probabilities,
    teacher_temperature,
    update_momentum,
    updated_center,
)
from shared_model.ssl.mae import masked_patch_loss, patchify, random_masking, unpatchify
from shared_model.train import make_generator, make_optimizer, pretrain_local


def _reference_mae_loss(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, p: int) -> float:
    """He et al.'s forward_loss, written with an explicit einsum patchify."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // p, p, w // p, p)
    x = np.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, ddof=1, keepdims=True)
    target = (x - mean) / np.sqrt(var + 1e-6)
    loss = ((pred - target) ** 2).mean(axis=-1)
    return float((loss * mask).sum() / mask.sum())


def test_mae_loss_matches_reference() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 1, 16, 16)).astype(np.float32)
    pred = rng.normal(size=(3, 4, 64)).astype(np.float32)
    mask = (rng.random((3, 4)) > 0.5).astype(np.float32)
    mask[:, 0] = 1
    ours = masked_patch_loss(torch.from_numpy(pred), patchify(torch.from_numpy(images), 8),
                             torch.from_numpy(mask), norm_pix=True)
    assert float(ours) == pytest.approx(_reference_mae_loss(images, pred, mask, 8), rel=1e-5)


def test_patchify_round_trip_and_masking_counts() -> None:
    images = torch.randn(2, 1, 32, 32)
    assert torch.equal(unpatchify(patchify(images, 8), 8), images)
    keep, restore, mask = random_masking(2, 16, 0.75, make_generator(1))
    assert keep.shape == (2, 4) and mask.sum(dim=1).tolist() == [12.0, 12.0]
    for b in range(2):  # kept patches are exactly the unmasked ones
        assert set(keep[b].tolist()) == set(torch.nonzero(mask[b] == 0)[:, 0].tolist())
    assert torch.equal(torch.gather(torch.argsort(restore, 1), 1, restore), torch.arange(16).expand(2, -1))


def _reference_dino_loss(student: list[np.ndarray], teacher: list[np.ndarray], center: np.ndarray,
                         t_s: float, t_t: float) -> float:
    """Caron et al., Algorithm 1: H(t, s) summed over pairs of different views, averaged."""
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        q = softmax((t - center) / t_t)
        for v, s in enumerate(student):
            if v == i:
                continue
            total += float(np.mean(-(q * np.log(softmax(s / t_s))).sum(axis=-1)))
            terms += 1
    return total / terms


def test_dino_loss_matches_reference() -> None:
    rng = np.random.default_rng(1)
    student = [rng.normal(size=(4, 10)).astype(np.float32) for _ in range(5)]  # 2 global + 3 local
    teacher = [rng.normal(size=(4, 10)).astype(np.float32) for _ in range(2)]
    center = rng.normal(size=(1, 10)).astype(np.float32) * 0.1
    probs = teacher_probabilities(torch.from_numpy(np.concatenate(teacher)), torch.from_numpy(center), 0.04)
    ours = dino_cross_entropy([torch.from_numpy(s) for s in student], list(probs.chunk(2)), 0.1)
    assert float(ours) == pytest.approx(_reference_dino_loss(student, teacher, center, 0.1, 0.04), rel=1e-4)


def test_center_momentum_and_schedules() -> None:
    center = torch.zeros(1, 3)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert torch.allclose(updated_center(center, logits, 0.9), torch.tensor([[0.2, 0.2, 0.2]]))
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(0.0)
    update_momentum(model, ema, 0.75)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.75))
    assert cosine_schedule(0.996, 1.0, 0.0) == pytest.approx(0.996)
    assert cosine_schedule(0.996, 1.0, 1.0) == pytest.approx(1.0)
    cfg = load_config("demo-cpu", ["ssl.dino.warmup_teacher_temp=0.02", "ssl.dino.teacher_temp=0.06"]).ssl.dino
    assert teacher_temperature(cfg, 0.0) == pytest.approx(0.02)
    assert teacher_temperature(cfg, cfg.warmup_fraction / 2) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 0.9) == pytest.approx(0.06)


@pytest.mark.parametrize("method, signals", [("mae", {"embed_std"}),
                                             ("dino", {"embed_std", "teacher_entropy"})])
def test_one_pretraining_step_per_method(method: str, signals: set[str]) -> None:
    cfg = load_config("demo-cpu", [f"ssl.method={method}", "ssl.dino.out_dim=256",
                                   "ssl.dino.local_crops=2"])
    torch.manual_seed(0)
    model = build_ssl_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pretrain_local(model, torch.rand(8, 1, 64, 64), steps=2, batch_size=4,
                            optimizer=make_optimizer(model, 1e-3, 0.05), gen=make_generator(0),
                            device=torch.device("cpu"), base_lr=1e-3)
    assert math.isfinite(result.loss_last) and signals <= set(result.stats)
    changed = [k for k in federated_keys(model) if not torch.equal(before[k], model.state_dict()[k])]
    assert any(k.startswith("encoder.") for k in changed)
    if method == "dino":  # the teacher follows the student by EMA, not by gradient
        assert not torch.equal(before["teacher.head.last_layer.weight"],
                               model.state_dict()["teacher.head.last_layer.weight"])
        assert all(not p.requires_grad for p in model.teacher.parameters())
        entropy = result.stats["teacher_entropy"]
        assert 0.0 < entropy <= math.log(256) + 1e-4


@pytest.mark.parametrize("preset", ["vit-tiny-p8-64", "hybrid-unet-p16-96"])
def test_dense_mae_pretrains_under_sample_level_dp(preset: str) -> None:
    """DP-SGD MAE (privacy.mode=sample) with the dense decoder: Opacus clips and noises per
    image, through the pretraining loop the nodes run."""
    from shared_model.privacy import DPSettings, make_private

    cfg = load_config("demo-cpu", ["ssl.mae.decoder=dense", f"model.preset={preset}", "privacy.mode=sample"])
    torch.manual_seed(0)
    model = build_ssl_model(cfg)
    size = int(model.encoder.patch_embed.img_size[0])
    images = torch.rand(8, 1, size, size)
    optimizer = make_optimizer(model, 1e-3, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private = make_private(model, optimizer, torch.utils.data.TensorDataset(images), 4,
                           DPSettings(1.0, 1.0, 1e-5), make_generator(0))
    try:
        result = pretrain_local(model, images, steps=2, batch_size=4, optimizer=optimizer,
                                gen=make_generator(0), device=torch.device("cpu"), base_lr=1e-3,
                                private=private)
        history = private.accountant_state()
    finally:
        private.close()
    assert math.isfinite(result.loss_last)
    assert sum(int(row[2]) for row in history) == 2
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before if k.startswith("encoder."))


@pytest.mark.parametrize("overrides", [["ssl.method=dino"], ["ssl.mae.decoder=transformer"]])
def test_sample_level_dp_pretraining_refuses_what_opacus_cannot_clip_per_image(overrides) -> None:
    from shared_model.config import ConfigError

    with pytest.raises(ConfigError, match="ssl.mae.decoder=dense"):
        load_config("demo-cpu", ["privacy.mode=sample", *overrides])
    load_config("demo-cpu", ["privacy.mode=user", *overrides])  # site-level DP takes any method


def test_dino_teacher_is_federated_only_when_configured() -> None:
    local = build_ssl_model(load_config("demo-cpu", ["ssl.method=dino", "ssl.dino.out_dim=64"]))
    shared = build_ssl_model(load_config("demo-cpu", ["ssl.method=dino", "ssl.dino.out_dim=64",
                                                      "ssl.dino.teacher=aggregated"]))
    assert not any(k.startswith("teacher.") for k in federated_keys(local))
    assert any(k.startswith("teacher.") for k in federated_keys(shared)) and "center" in federated_keys(shared)


def test_paper_preset_builds_and_runs_one_step() -> None:
    cfg = load_config("paper-vit-s8", ["ssl.dino.local_crops=2", "ssl.dino.out_dim=4096"])
    torch.manual_seed(0)
    model = build_ssl_model(cfg)
    result = pretrain_local(model, torch.rand(2, 1, 224, 224), steps=1, batch_size=2,
                            optimizer=make_optimizer(model, 1e-4, 0.04), gen=make_generator(0),
                            device=torch.device("cpu"), base_lr=1e-4)
    assert math.isfinite(result.loss_last)
    assert sum(p.numel() for p in model.encoder.parameters()) > 21_000_000


@pytest.mark.parametrize("preset", ["hybrid-tiny-p8-96", "hybrid-unet-p16-96"])
def test_dense_mae_pretrains_the_decoder_that_segmentation_starts_from(tmp_path, preset) -> None:
    from shared_model.bundle import DECODER_FILE, load_bundle, save_encoder, task_model_from_bundle
    from shared_model.config import load_config, save_resolved_config
    from shared_model.ssl import build_ssl_model
    from shared_model.tasks import get_task
    from shared_model.weights import save_safetensors, select_prefix

    # Prepare: a dense-MAE model after one step, written as a release bundle
    cfg = load_config(None, [f"model.preset={preset}", "ssl.mae.decoder=dense",
                             "tasks.decoder_width=8"])
    torch.manual_seed(0)
    model = build_ssl_model(cfg)
    images = torch.rand(4, 1, 96, 96)
    loss, reconstruction, _ = model(images, torch.Generator().manual_seed(0))
    assert reconstruction.shape == images.shape  # painted back at full resolution
    loss, stats = model.training_step(images, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and {"embed_std", "rankme"} <= set(stats)
    state = model.state_dict()
    save_resolved_config(cfg, tmp_path)
    save_encoder(tmp_path / "encoder.safetensors", select_prefix(state, "encoder."), cfg)
    save_safetensors(tmp_path / DECODER_FILE, select_prefix(state, "head."))

    # Execute
    seg = task_model_from_bundle(load_bundle(tmp_path), get_task("sax_seg"))

    # Assert: every decoder weight but the output layer comes from pretraining
    head = seg.head.state_dict()
    pretrained = select_prefix(state, "head.")
    shared = [k for k in head if not k.startswith("out.")]
    assert shared and all(torch.equal(head[k], pretrained[k]) for k in shared)
    assert head["out.weight"].shape[0] == 4 and pretrained["out.weight"].shape[0] == 1
