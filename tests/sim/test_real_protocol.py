"""The few-shot protocol's arms fine-tune as a node would: its built-in recipe, changed the way
a user's overrides change it."""

from client.finetune import FROZEN_SEGMENTATION_LR
from shared_model.config import FinetuneMode, load_config
from shared_model.finetune import SCRATCH_RECIPE
from sim.real_protocol import arm_recipe


def test_the_foundation_model_trains_with_the_nodes_recipe_unless_told_otherwise() -> None:
    def tasks(overrides: list[str]):  # noqa: ANN202
        return load_config(None, arm_recipe("fm", overrides)).tasks

    assert tasks([]).mode == FinetuneMode.auto and tasks([]).lr == FROZEN_SEGMENTATION_LR
    # a rate alone keeps the recipe's frozen encoder; a mode replaces the whole recipe
    assert (tasks(["tasks.lr=0.01"]).mode, tasks(["tasks.lr=0.01"]).lr) == (FinetuneMode.auto, 0.01)
    assert arm_recipe("fm", ["tasks.mode=full"]) == ["tasks.mode=full"]
    # the foundation model's overrides are not the baselines'
    assert arm_recipe("scratch", ["tasks.mode=linear"]) == list(SCRATCH_RECIPE)
    assert arm_recipe("unet", ["tasks.mode=linear"]) == []
