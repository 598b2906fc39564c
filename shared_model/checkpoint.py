"""Mid-session training checkpoints without pickle: safetensors for every tensor, JSON for the rest.

A checkpoint holds the model weights, the optimizer state (tensors under ``optim/<param>/<name>``,
param groups as JSON), the step reached, the random generator state, the batch order still to
come, an accountant history when DP-SGD runs, and running loss statistics. Written atomically;
a truncated or foreign file is an error, never a silent fresh start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared_model.errors import UserError
from shared_model.weights import WeightsError, load_safetensors, save_safetensors

FORMAT = "fedcmr-loop-checkpoint"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


@dataclass
class LoopState:
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor
    batch_order: torch.Tensor
    losses: list[float] = field(default_factory=list)
    dp_history: list[list[float]] = field(default_factory=list)
    fingerprint: str = ""
    seconds: float = 0.0  # training time spent before this checkpoint (wall-clock budgets)


def _optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim/{param_id}/{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_loop_state(path: str | Path, state: LoopState) -> Path:
    tensors = {f"model/{k}": v for k, v in state.model.items()}
    optim_tensors, optim_meta = _optimizer_tensors(state.optimizer)
    tensors.update(optim_tensors)
    tensors["rng/generator"] = state.generator
    tensors["rng/batch_order"] = state.batch_order.to(torch.int64)
    meta = {"format": FORMAT, "step": state.step, "optimizer": optim_meta,
            "losses": state.losses, "dp_history": state.dp_history,
            "fingerprint": state.fingerprint, "seconds": state.seconds}
    return save_safetensors(path, tensors, {"fedcmr": json.dumps(meta)})


def _damaged(path: str | Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a usable training checkpoint ({what}); delete it to "
                           "start the session afresh, or restore the file")


def load_loop_state(path: str | Path) -> LoopState:
    try:
        tensors, raw_meta = load_safetensors(path)
        meta = json.loads(raw_meta["fedcmr"])
    except (WeightsError, KeyError, json.JSONDecodeError) as exc:
        raise _damaged(path, str(exc)) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a FedCMR training checkpoint")
    for name, kind in (("step", int), ("optimizer", dict), ("losses", list), ("dp_history", list)):
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise _damaged(path, f"metadata field '{name}' is missing or not a {kind.__name__}")
    for name, kind in (("scalars", dict), ("param_groups", list)):
        if not isinstance(meta["optimizer"].get(name), kind):
            raise _damaged(path, f"metadata field 'optimizer.{name}' is missing or not a "
                                 f"{kind.__name__}")
    for key in ("rng/generator", "rng/batch_order"):
        if key not in tensors:
            raise _damaged(path, f"tensor '{key}' is missing")
    optim_state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, param_id, name = key.split("/", 2)
                optim_state.setdefault(int(param_id), {})[name] = value
    except ValueError as exc:
        raise _damaged(path, f"tensor '{key}' is not optim/<param>/<name>") from exc
    for param_id, slots in meta["optimizer"]["scalars"].items():
        if not isinstance(slots, dict) or not param_id.isdigit():
            raise _damaged(path, f"metadata field 'optimizer.scalars.{param_id}' is not a "
                                 "parameter's scalars")
        optim_state.setdefault(int(param_id), {}).update(slots)
    return LoopState(
        step=meta["step"],
        model={k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
        optimizer={"state": optim_state, "param_groups": meta["optimizer"]["param_groups"]},
        generator=tensors["rng/generator"], batch_order=tensors["rng/batch_order"],
        losses=list(meta["losses"]), dp_history=list(meta["dp_history"]),
        fingerprint=str(meta.get("fingerprint", "")),
        seconds=float(meta.get("seconds", 0.0)),
    )
