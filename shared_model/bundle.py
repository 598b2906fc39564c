"""Model bundles: a folder a hospital can fine-tune from, predict with, or load in timm.

Layout::

    BUNDLE/config.yaml                 the resolved config the model was trained with
    BUNDLE/encoder.safetensors         the foundation encoder (plain timm keys)
    BUNDLE/decoder.safetensors         (dense-MAE pretraining) the pretrained dense decoder that
                                       segmentation and landmark heads start from
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
    TaskArch,
    config_from_yaml,
    save_resolved_config,
)
from shared_model.encoders import build_encoder, get_preset
from shared_model.errors import UserError
from shared_model.files import atomic_write_text
from shared_model.tasks import Task
from shared_model.tasks.models import build_task_model
from shared_model.tasks.unet import build_unet
from shared_model.weights import (
    WeightsError,
    load_into,
    load_safetensors,
    save_safetensors,
    select_prefix,
)

ENCODER_FILE = "encoder.safetensors"
# The pretrained dense decoder (MAE with ssl.mae.decoder=dense): dense task heads start from it
DECODER_FILE = "decoder.safetensors"
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
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)  # pretrained dense decoder

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
        # a supervised U-Net bundle has no foundation encoder
        no_encoder = cfg.tasks.arch == TaskArch.unet and not (root / ENCODER_FILE).exists()
        encoder = {} if no_encoder else load_safetensors(root / ENCODER_FILE)[0]
        tasks = {p.stem: load_safetensors(p)[0] for p in sorted((root / TASKS_DIR).glob("*.safetensors"))}
        decoder = load_safetensors(root / DECODER_FILE)[0] if (root / DECODER_FILE).exists() else {}
    except WeightsError as exc:
        raise BundleError(str(exc)) from exc
    return Bundle(root=root, config=cfg, encoder=encoder, tasks=tasks, decoder=decoder)


def task_model_for(cfg: FedCMRConfig, task: Task, bundle: Bundle | None) -> torch.nn.Module:
    """The model a fine-tuning session starts from: the bundle's (tasks.arch=fm) or a fresh
    supervised U-Net (tasks.arch=unet)."""
    if cfg.tasks.arch == TaskArch.unet:
        return build_unet(task)
    if bundle is None:
        raise BundleError("tasks.arch=fm needs a foundation-model bundle")
    if bundle.has_task(task.name) or bundle.decoder:  # its own head or pretrained decoder
        cfg.tasks.decoder_width = bundle.config.tasks.decoder_width
    return task_model_from_bundle(bundle, task, decoder_width=cfg.tasks.decoder_width)


def task_model_from_bundle(bundle: Bundle, task: Task, require_head: bool = False,
                           decoder_width: int | None = None) -> torch.nn.Module:
    """The bundle's model for ``task``; without one, its encoder with a freshly initialised head
    (``decoder_width`` channels for a dense head; default the bundle's)."""
    if bundle.config.tasks.arch == TaskArch.unet:
        if task.name not in bundle.tasks:
            raise BundleError(f"{bundle.root}: a U-Net bundle without a model for task "
                              f"'{task.name}' (have: {', '.join(bundle.tasks) or 'none'})")
        model: torch.nn.Module = build_unet(task)
        load_into(model, bundle.tasks[task.name], source=f"task model '{task.name}'")
        return model
    encoder = build_encoder(bundle.config.model.preset)
    try:
        load_into(encoder, bundle.encoder, source=f"{bundle.root / ENCODER_FILE}")
    except WeightsError as exc:
        raise BundleError(f"{exc}; the bundle's config names preset "
                          f"'{bundle.config.model.preset}'") from exc
    model = build_task_model(task, encoder, decoder_width or bundle.config.tasks.decoder_width)
    if task.name not in bundle.tasks and bundle.decoder and hasattr(model, "head"):
        start_from_decoder(model, bundle.decoder)
    if task.name in bundle.tasks:
        load_into(model, bundle.tasks[task.name], source=f"task model '{task.name}'")
    elif require_head:
        raise BundleError(f"{bundle.root}: no model for task '{task.name}' (have: "
                          f"{', '.join(bundle.tasks) or 'none'}); fine-tune it first with "
                          f"`fedcmr-client finetune --task {task.name}`")
    return model


def start_from_decoder(model: torch.nn.Module, decoder: dict[str, torch.Tensor]) -> int:
    """A dense task head from a pretrained decoder: every weight whose name and shape match
    (all but the output layer, whose classes are the task's). Returns how many; a classifier
    head matches none."""
    head = model.head
    assert isinstance(head, torch.nn.Module)
    own = head.state_dict()
    matching = {k: v for k, v in decoder.items() if k in own and own[k].shape == v.shape}
    if matching:
        head.load_state_dict({**own, **matching})
    return len(matching)


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
    has_encoder = any(k.startswith("encoder.") for k in state)
    foundation = base.encoder if base is not None else (
        select_prefix(state, "encoder.") if has_encoder else {})
    if foundation:  # a supervised U-Net has no foundation encoder to keep
        save_encoder(out / ENCODER_FILE, foundation, cfg)
    if base is not None and base.decoder:
        save_safetensors(out / DECODER_FILE, base.decoder, metadata={"part": "dense decoder"})
    if base is not None:
        for name, other in base.tasks.items():
            if name != task.name:
                save_safetensors(out / TASKS_DIR / f"{name}.safetensors", other)
    save_task_model(out / TASKS_DIR / f"{task.name}.safetensors", task, state)
    if metrics is not None:
        atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=1, sort_keys=True))
    return out
