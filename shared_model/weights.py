"""Weights across boundaries: state dict <-> NumPy arrays, encoder selection, safetensors.

These few pure functions are the only way weights leave a model: to the wire (ordered float
arrays), to disk (safetensors, never pickle) and back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from shared_model.errors import UserError
from shared_model.files import atomic_write_bytes

StateDict = dict[str, torch.Tensor]

OPACUS_PREFIX = "_module."


class WeightsError(UserError, ValueError):
    """Weights that do not fit the model they are meant for."""


def state_dict_to_arrays(state_dict: Mapping[str, torch.Tensor],
                         keys: Sequence[str] | None = None) -> list[np.ndarray]:
    """Tensors as contiguous NumPy arrays, in ``keys`` order (default: the dict's order).

    The arrays are copies: they never alias a model's parameters, so later training cannot
    change what was already sent or checkpointed.
    """
    keys = list(state_dict) if keys is None else list(keys)
    return [np.array(state_dict[k].detach().cpu().numpy(), copy=True, order="C") for k in keys]


def arrays_to_state_dict(arrays: Sequence[np.ndarray], keys: Sequence[str],
                         reference: Mapping[str, torch.Tensor] | None = None) -> StateDict:
    """Arrays back into named tensors; with ``reference``, shapes and dtypes must match it.

    Arrays of another float dtype (e.g. the float64 aggregate SecAgg+ returns) are cast to the
    reference dtype so the model never holds a second, wider copy of itself.
    """
    if len(arrays) != len(keys):
        raise WeightsError(f"expected {len(keys)} arrays, got {len(arrays)}")
    out: StateDict = {}
    for key, array in zip(keys, arrays, strict=True):
        tensor = torch.from_numpy(np.array(array, copy=True))
        if reference is not None:
            ref = reference[key]
            if tuple(tensor.shape) != tuple(ref.shape):
                raise WeightsError(f"'{key}': shape {tuple(tensor.shape)} does not match the "
                                   f"model's {tuple(ref.shape)}")
            if tensor.dtype != ref.dtype:
                if not (tensor.is_floating_point() and ref.is_floating_point()):
                    raise WeightsError(f"'{key}': dtype {tensor.dtype} does not match the "
                                       f"model's {ref.dtype}")
                tensor = tensor.to(ref.dtype)
        out[key] = tensor
    return out


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The entries under ``prefix`` with the prefix removed (e.g. ``encoder.`` -> bare ViT)."""
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise WeightsError(f"no weights under the prefix '{prefix}'")
    return selected


def add_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {f"{prefix}{k}": v for k, v in state_dict.items()}


def strip_opacus(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove the ``_module.`` prefix Opacus' GradSampleModule adds to every key."""
    return {k.removeprefix(OPACUS_PREFIX): v for k, v in state_dict.items()}


def state_dict_nbytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def save_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, object] | None = None) -> Path:
    """Write weights as safetensors, atomically; metadata values are stored as JSON strings."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, safetensors_save(tensors, metadata=meta or None))


def load_safetensors(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Weights and metadata from a safetensors file, with a clear error if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise WeightsError(f"{path}: not a readable safetensors file ({exc}); "
                           "restore it from the release bundle or re-download it") from exc
    return tensors, metadata


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
              source: str = "weights") -> None:
    """Strict load with an error that names missing and unexpected keys."""
    try:
        result = module.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as exc:  # size mismatches
        raise WeightsError(f"{source} do not fit the model: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{source} do not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}")
