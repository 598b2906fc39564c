"""The shipped foundation models: listing, the default, and the bundle in the repository."""

from pathlib import Path

import pytest
import torch

from shared_model.bundle import BundleError, load_bundle, task_model_from_bundle
from shared_model.config import load_config, save_resolved_config
from shared_model.encoders import build_encoder, get_preset
from shared_model.shipped import MODELS_DIR_ENV, default_model, models_dir, shipped_models
from shared_model.tasks import get_task
from shared_model.weights import save_safetensors


def _bundle(root: Path, card: str) -> None:
    cfg = load_config("demo-cpu")
    save_resolved_config(cfg, root)
    save_safetensors(root / "encoder.safetensors", build_encoder(cfg.model.preset).state_dict())
    (root / "model_card.md").write_text(card)


def test_the_default_is_listed_first_with_its_card_summary(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _bundle(tmp_path / "a-model", "# card\n\nFirst model.\n")
    _bundle(tmp_path / "b-model", "# card\n\nSecond model,\nin two lines.\n\nMore.\n")
    (tmp_path / "DEFAULT").write_text("b-model\n")
    (tmp_path / "not-a-bundle").mkdir()
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path))
    found = shipped_models()
    assert [(m.name, m.default) for m in found] == [("b-model", True), ("a-model", False)]
    assert found[0].summary == "Second model, in two lines."
    assert default_model() == tmp_path / "b-model"


def test_no_shipped_model_says_how_to_pass_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(BundleError, match="--model BUNDLE"):
        default_model()


def test_the_repository_ships_a_loadable_default_model() -> None:
    root = models_dir()
    assert (root / "DEFAULT").is_file(), f"{root}/DEFAULT names the shipped default model"
    bundle = load_bundle(default_model())
    assert bundle.decoder, "the shipped model carries its pretrained dense decoder"
    model = task_model_from_bundle(bundle, get_task("sax_seg"))
    px = get_preset(bundle.config.model.preset).image_size
    with torch.no_grad():
        out = model(torch.zeros(1, 1, px, px))
    assert out.shape[-2:] == (px, px) and torch.isfinite(out).all()
    assert "Held out of every site" in (default_model() / "model_card.md").read_text()
