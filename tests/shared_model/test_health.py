"""Pretraining health signals on inputs whose answer is known."""

import math

import pytest
import torch

from shared_model.ssl.dino import kl_to_center
from shared_model.ssl.health import embedding_std, patch_labels, patch_probe_dice, rankme


def test_embedding_std_ignores_a_common_offset_and_sees_collapse() -> None:
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 64, generator=gen)
    assert embedding_std(spread) == pytest.approx(1 / math.sqrt(64), rel=0.1)
    # a large shared component (as MAE's pooled LayerNorm tokens have) changes nothing
    assert embedding_std(spread + 50.0) == pytest.approx(embedding_std(spread), rel=1e-3)
    assert embedding_std(torch.ones(32, 64) * 3.0) == 0.0


def test_rankme_counts_the_dimensions_in_use() -> None:
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(256, 16, generator=gen)
    assert 13 < rankme(full) <= 16
    assert rankme(full + 40.0) == pytest.approx(rankme(full), rel=1e-3)  # a shared offset
    one_dim = torch.randn(256, 1, generator=gen) * torch.ones(1, 16)
    assert rankme(one_dim) == pytest.approx(1.0, abs=0.05)


def test_kl_to_center_is_zero_under_collapse_and_log_k_when_each_image_has_its_own() -> None:
    k = 8
    assert kl_to_center(torch.full((4, k), 1 / k)) == pytest.approx(0.0, abs=1e-6)
    assert kl_to_center(torch.eye(k)) == pytest.approx(math.log(k), rel=1e-4)


def test_patch_probe_separates_tokens_that_carry_the_label() -> None:
    # Prepare: 4 frames of 4x4 patches; blood-pool tokens point one way, the others another
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = 1
    labels = patch_labels(masks, patch=8)
    assert labels.shape == (4, 16) and int(labels[0].sum()) == 4
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 16, 32, generator=gen) * 0.1
    tokens[..., 0] += labels.float() * 3.0
    tokens[..., 1] += (~labels).float() * 3.0
    # Execute / Assert: informative tokens give a perfect probe, random ones do not
    assert patch_probe_dice(tokens[:2], labels[:2], tokens[2:], labels[2:], k=3) == 1.0
    noise = torch.randn(4, 16, 32, generator=gen)
    assert patch_probe_dice(noise[:2], labels[:2], noise[2:], labels[2:], k=3) < 0.9


def test_patch_probe_finds_a_rare_structure_a_majority_vote_would_miss() -> None:
    # Prepare: the structure covers 1 patch in 25 (as the blood pool does at 8 px); its tokens
    # point one way, the background's another, and two background patches per fitted frame
    # (partial-volume borders) look like the structure, so they outnumber it near its tokens
    gen = torch.Generator().manual_seed(1)
    labels = torch.zeros(8, 25, dtype=torch.bool)
    labels[:, 12] = True
    structure, background = torch.randn(16, generator=gen) * 3, torch.randn(16, generator=gen) * 3
    tokens = background + torch.randn(8, 25, 16, generator=gen) * 0.3
    tokens[labels] = structure + torch.randn(8, 16, generator=gen) * 0.3
    tokens[:4, :2] = structure + torch.randn(4, 2, 16, generator=gen) * 0.3
    # Execute: among the 10 nearest fitted patches of a structure patch, 4 are structure and 6
    # background, so a plain majority vote calls it background (Dice 0)
    dice = patch_probe_dice(tokens[:4], labels[:4], tokens[4:], labels[4:], k=10)
    # Check: the balanced vote finds it; one class only has nothing to tell apart
    assert dice == 1.0
    assert math.isnan(patch_probe_dice(tokens[:4], torch.zeros(4, 25, dtype=torch.bool), tokens[4:], labels[4:]))
