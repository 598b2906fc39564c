"""The built-in fine-tuning recipe: a foundation model's dense tasks train with a frozen
transformer (segmentation's decoder at its own learning rate, its conv stem with enough subjects)."""

import pytest

from client.finetune import recipe_mode


@pytest.mark.parametrize(("task", "arch", "config", "expected"), [
    ("sax_seg", "fm", None, ["tasks.mode=auto", "tasks.lr=0.003"]),
    ("landmarks", "fm", None, ["tasks.mode=linear"]),
    ("view", "fm", None, []),  # classification: every layer trains
    ("sax_seg", "unet", None, []),  # a U-Net has no pretrained encoder to freeze
    ("sax_seg", "fm", "full-cpu", []),  # a preset decides for itself
    ("no_such_task", "fm", None, []),  # left to finetune_on_store to name
])
def test_only_the_built_in_recipe_freezes_a_foundation_models_encoder(
        task: str, arch: str, config: str | None, expected: list[str]) -> None:
    assert recipe_mode(task, arch, config) == expected


def test_a_users_mode_replaces_the_whole_recipe() -> None:
    # a frozen-decoder learning rate must not follow the user into fine-tuning everything
    assert recipe_mode("sax_seg", "fm", None, ["tasks.mode=full"]) == []
    assert recipe_mode("sax_seg", "fm", None, ["tasks.steps=10"]) == ["tasks.mode=auto", "tasks.lr=0.003"]
