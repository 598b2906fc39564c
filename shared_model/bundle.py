"""Model bundles: a folder a hospital can fine-tune from, predict with, or load in timm.

Layout::

    BUNDLE/config.yaml                 the resolved config the model was trained with
    BUNDLE/encoder.safetensors         the foundation encoder (plain timm keys)
    BUNDLE/tasks/<task>.safetensors    a fine-tuned task model: its head (``head.*``) and the
                                       encoder as fine-tuned for that task (``encoder.*``)
    BUNDLE/model_card.md               (released bundles) what it is and how it was made
    BUNDLE/metrics.json                (optional) evaluation results

A server release and a node's fine-tuned model are both bundles; weights are safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared_model.config import (
    RESOLVED_CONFIG_NAME,
    FedCMRConfig,
    config_from_yaml,
    save_resolved_config,
)
from shared_model.encoders import build_encoder, get_preset
from shared_model.errors import UserError
from shared_model.files import atomic_write_text
from shared_model.tasks import Task
from shared_model.tasks.models import TaskModel, build_task_model
from shared_model.weights import (
    WeightsError,
    load_into,
    load_safetensors,
    save_safetensors,
    select_prefix,
)

ENCODER_FILE = "encoder.safetensors"
TASKS_DIR = "tasks"
METRICS_FILE = "metrics.json"


class BundleError(UserError, ValueError):
    """A bundle folder that is missing pieces or does not fit; the message says which."""


@dataclass
class Bundle:
    root: Path
    config: FedCMRConfig
    encoder: dict[str, torch.Tensor]
    tasks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def has_task(self, task: str) -> bool:
        return task in self.tasks


def load_bundle(path: str | Path) -> Bundle:
    root = Path(path)
    config_path = root / RESOLVED_CONFIG_NAME
    if not config_path.is_file():
        raise BundleError(f"{root}: no {RESOLVED_CONFIG_NAME}; is this a FedCMR model bundle "
                          "(a release folder or a fedcmr-sim run folder)?")
    cfg = config_from_yaml(config_path.read_text(encoding="utf-8"), str(config_path))
    try:
        encoder, _ = load_safetensors(root / ENCODER_FILE)
        tasks = {p.stem: load_safetensors(p)[0] for p in sorted((root / TASKS_DIR).glob("*.safetensors"))}
    except WeightsError as exc:
        raise BundleError(str(exc)) from exc
    return Bundle(root=root, config=cfg, encoder=encoder, tasks=tasks)


def task_model_from_bundle(bundle: Bundle, task: Task, require_head: bool = False) -> TaskModel:
    """The bundle's model for ``task``; without one, its encoder with a freshly initialised head."""
    encoder = build_encoder(bundle.config.model.preset)
    try:
        load_into(encoder, bundle.encoder, source=f"{bundle.root / ENCODER_FILE}")
    except WeightsError as exc:
        raise BundleError(f"{exc}; the bundle's config names preset "
                          f"'{bundle.config.model.preset}'") from exc
    model = build_task_model(task, encoder, bundle.config.tasks.decoder_width)
    if task.name in bundle.tasks:
        load_into(model, bundle.tasks[task.name], source=f"task model '{task.name}'")
    elif require_head:
        raise BundleError(f"{bundle.root}: no model for task '{task.name}' (have: "
                          f"{', '.join(bundle.tasks) or 'none'}); fine-tune it first with "
                          f"`fedcmr-client finetune --task {task.name}`")
    return model


def save_encoder(path: Path, encoder_state: dict[str, torch.Tensor], cfg: FedCMRConfig) -> Path:
    """The bare ViT encoder, with what timm needs to load it in the metadata."""
    bad = [k for k, v in encoder_state.items() if not torch.isfinite(v).all()]
    if bad:
        raise BundleError(f"encoder has non-finite values in {bad[:3]}; not saved")
    preset = get_preset(cfg.model.preset)
    return save_safetensors(path, encoder_state, metadata={
        "format": "pt", "fedcmr_preset": preset.name, "timm_name": preset.timm_name,
        "timm_kwargs": preset.timm_kwargs(), "ssl_method": cfg.ssl.method.value})


def save_task_model(path: Path, task: Task, state: dict[str, torch.Tensor]) -> Path:
    return save_safetensors(path, state, metadata={"task": task.name, "kind": task.kind.value})


def save_task_bundle(out: str | Path, cfg: FedCMRConfig, task: Task, model: torch.nn.Module,
                     metrics: dict[str, object] | None = None,
                     base: Bundle | None = None) -> Path:
    """A bundle with the base's foundation encoder and other tasks, plus ``model`` for ``task``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    foundation = base.encoder if base is not None else select_prefix(state, "encoder.")
    save_encoder(out / ENCODER_FILE, foundation, cfg)
    if base is not None:
        for name, other in base.tasks.items():
            if name != task.name:
                save_safetensors(out / TASKS_DIR / f"{name}.safetensors", other)
    save_task_model(out / TASKS_DIR / f"{task.name}.safetensors", task, state)
    if metrics is not None:
        atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=1, sort_keys=True))
    return out
