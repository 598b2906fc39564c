"""The server's checkpoint: everything needed to continue a federation at the next round.

One safetensors file, rewritten atomically after every round (temp file, fsync, rename):

- ``phase/<key>``: the global weights of the phase in progress (order in metadata)
- ``fm/<key>``: the pretrained encoder, once pretraining is done
- ``task/<task>/<key>``: the finished task models (encoder + head)
- ``opt/<name>/<i>``: the server optimiser's state (FedAdam moments, FedAvgM momentum)

plus JSON metadata: progress (global round, phase, round within phase), the privacy ledger, a
fingerprint of the run's config, and the SHA-256 of the phase weights. Loading checks all of it:
a truncated file, a hash that does not match, or another run's config is an error — never a
silent fresh start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared_model.config import FedCMRConfig, OutputConfig, config_to_yaml
from shared_model.errors import UserError
from shared_model.weights import WeightsError, load_safetensors, save_safetensors

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedcmr-server-checkpoint"


class ResumeError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def weights_hash(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(str(a.dtype).encode())
        digest.update(str(a.shape).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def config_fingerprint(cfg: FedCMRConfig) -> str:
    """Hash of everything that shapes the run except where it writes (``output``).

    Written with every round's checkpoint: the YAML (~30 ms) is made once per config (its
    dataclass ``repr`` names every value, and costs a fraction of a millisecond)."""
    shaping = dataclasses.replace(cfg, output=OutputConfig())
    return _fingerprint(repr(shaping), shaping)


_FINGERPRINTS: dict[str, str] = {}  # repr of a config -> its fingerprint (a few per run)


def _fingerprint(key: str, shaping: FedCMRConfig) -> str:
    if key not in _FINGERPRINTS:
        if len(_FINGERPRINTS) >= 16:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[key] = hashlib.sha256(config_to_yaml(shaping).encode()).hexdigest()[:16]
    return _FINGERPRINTS[key]


def new_run_token() -> str:
    return secrets.token_hex(16)


@dataclass
class ServerState:
    global_round: int = 0  # rounds completed, all phases
    phase: str = ""  # phase in progress ("" before the first)
    phase_round: int = 0  # rounds completed in that phase
    phase_keys: list[str] = field(default_factory=list)
    phase_arrays: list[np.ndarray] = field(default_factory=list)
    foundation: dict[str, torch.Tensor] = field(default_factory=dict)  # pretrained encoder
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)  # pretrained dense decoder
    tasks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer: dict[str, list[np.ndarray]] = field(default_factory=dict)
    ledger_json: str = ""
    phases_done: list[str] = field(default_factory=list)
    # drawn when the run starts, kept across resumes: nodes key what they keep between the
    # run's rounds (local heads, teachers) by it (client.run_local)
    run_token: str = field(default_factory=new_run_token)


def save_state(run_dir: Path, state: ServerState, cfg: FedCMRConfig) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for key, array in zip(state.phase_keys, state.phase_arrays, strict=True):
        tensors[f"phase/{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    tensors.update({f"fm/{k}": v for k, v in state.foundation.items()})
    tensors.update({f"dec/{k}": v for k, v in state.decoder.items()})
    for task, weights in state.tasks.items():
        tensors.update({f"task/{task}/{k}": v for k, v in weights.items()})
    for name, arrays in state.optimizer.items():
        tensors.update({f"opt/{name}/{i}": torch.from_numpy(np.ascontiguousarray(a))
                        for i, a in enumerate(arrays)})
    meta = {"format": FORMAT, "global_round": state.global_round, "phase": state.phase,
            "phase_round": state.phase_round, "phase_keys": state.phase_keys,
            "phases_done": state.phases_done, "ledger": state.ledger_json, "run_token": state.run_token,
            "optimizer": {k: len(v) for k, v in state.optimizer.items()},
            "fingerprint": config_fingerprint(cfg), "weights_sha256": weights_hash(state.phase_arrays)}
    return save_safetensors(run_dir / CHECKPOINT_FILE, tensors, {"fedcmr": json.dumps(meta)})


def _damaged(path: Path, what: str) -> ResumeError:
    return ResumeError(f"{path}: damaged checkpoint ({what}); restore it from a backup or start "
                       "a new run in another folder")


def _meta_field(meta: dict, name: str, kind: type, path: Path):  # noqa: ANN202 - kind's type
    value = meta.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _damaged(path, f"metadata field '{name}' is missing or not a {kind.__name__}")
    return value


def _tensor(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise _damaged(path, f"tensor '{key}' is missing")
    return tensors[key]


def load_state(run_dir: Path, cfg: FedCMRConfig) -> ServerState:
    from server.ledger import LedgerError, PrivacyLedger

    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ResumeError(f"{path}: no checkpoint to resume from; start without --resume")
    try:
        tensors, raw = load_safetensors(path)
        meta = json.loads(raw["fedcmr"])
    except (WeightsError, KeyError, json.JSONDecodeError) as exc:
        raise _damaged(path, str(exc)) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ResumeError(f"{path}: not a FedCMR server checkpoint")
    if _meta_field(meta, "fingerprint", str, path) != config_fingerprint(cfg):
        raise ResumeError(f"{path} was written by a run with another config; resume with the "
                          f"run's own config ({run_dir / 'config.yaml'}) or start a new run")
    phase_keys = _meta_field(meta, "phase_keys", list, path)
    if not all(isinstance(k, str) for k in phase_keys):
        raise _damaged(path, "metadata field 'phase_keys' holds a non-string")
    arrays = [_tensor(tensors, f"phase/{k}", path).numpy() for k in phase_keys]
    if weights_hash(arrays) != _meta_field(meta, "weights_sha256", str, path):
        raise ResumeError(f"{path}: global weights do not match their recorded hash; the file "
                          "is damaged")
    tasks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("task/"):
            parts = key.split("/", 2)
            if len(parts) != 3:
                raise _damaged(path, f"tensor name '{key}' is not task/<task>/<name>")
            tasks.setdefault(parts[1], {})[parts[2]] = value
    counts = _meta_field(meta, "optimizer", dict, path)
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts.values()):
        raise _damaged(path, "metadata field 'optimizer' holds a count that is not a whole number")
    optimizer = {name: [_tensor(tensors, f"opt/{name}/{i}", path).numpy() for i in range(count)]
                 for name, count in counts.items()}
    ledger_json = _meta_field(meta, "ledger", str, path)
    if ledger_json:
        try:
            PrivacyLedger.from_json(ledger_json)
        except LedgerError as exc:
            raise _damaged(path, f"metadata field 'ledger': {exc}") from exc
    phases_done = _meta_field(meta, "phases_done", list, path)
    # a checkpoint of an earlier version has no token: the nodes' local weights start afresh
    run_token = _meta_field(meta, "run_token", str, path) if "run_token" in meta else new_run_token()
    return ServerState(
        global_round=_meta_field(meta, "global_round", int, path),
        phase=_meta_field(meta, "phase", str, path),
        phase_round=_meta_field(meta, "phase_round", int, path), phase_keys=list(phase_keys),
        phase_arrays=arrays, foundation={k[3:]: v for k, v in tensors.items() if k.startswith("fm/")},
        decoder={k[4:]: v for k, v in tensors.items() if k.startswith("dec/")},
        tasks=tasks, optimizer=optimizer, ledger_json=ledger_json,
        phases_done=[str(p) for p in phases_done], run_token=run_token)
