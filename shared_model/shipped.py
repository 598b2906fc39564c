"""The foundation models shipped with FedCMR: bundles under the repository's ``models/``.

Each sub-folder of :func:`models_dir` is a bundle (``config.yaml``, ``encoder.safetensors``,
``model_card.md``) made by the project's own federated pretraining; ``models/DEFAULT`` names the
one ``fedcmr-client finetune`` starts from when no ``--model`` is given. ``$FEDCMR_MODELS_DIR``
points elsewhere (e.g. a consortium's own releases).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "FEDCMR_MODELS_DIR"
DEFAULT_FILE = "DEFAULT"


@dataclass(frozen=True)
class ShippedModel:
    name: str
    path: Path
    default: bool
    summary: str  # the model card's first paragraph


def models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "models"


def shipped_models() -> list[ShippedModel]:
    """The bundles under :func:`models_dir`, the default first."""
    root = models_dir()
    default = (root / DEFAULT_FILE).read_text(encoding="utf-8").strip() \
        if (root / DEFAULT_FILE).is_file() else ""
    found = []
    for folder in sorted(p for p in root.glob("*") if (p / "config.yaml").is_file()):
        card = folder / "model_card.md"
        summary = _first_paragraph(card.read_text(encoding="utf-8")) if card.is_file() else ""
        found.append(ShippedModel(folder.name, folder, folder.name == default, summary))
    return sorted(found, key=lambda m: (not m.default, m.name))


def default_model() -> Path:
    """The bundle ``fedcmr-client finetune`` uses without ``--model``."""
    models = shipped_models()
    if not models:
        from shared_model.bundle import BundleError

        raise BundleError(f"no shipped foundation model under {models_dir()}; pass --model "
                          f"BUNDLE or point ${MODELS_DIR_ENV} at a folder of bundles")
    return models[0].path


def _first_paragraph(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    body = [line for line in lines if line and not line.startswith("#")]
    paragraph: list[str] = []
    for line in lines:
        if line.startswith("#"):
            continue
        if not line and paragraph:
            break
        if line:
            paragraph.append(line)
    return " ".join(paragraph) if paragraph else (body[0] if body else "")
