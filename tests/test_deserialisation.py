"""Unsafe deserialisation (reliability check 13): a pickle payload that would create a file is
fed to every loader of the project, and the code is scanned for loaders that could run one."""

from __future__ import annotations

import ast
import io
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Parameters, parameters_to_ndarrays

ROOT = Path(__file__).resolve().parents[1]
CODE = ("client", "server", "shared_model", "sim", "benchmarks")


class _Touch:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def _payload(sentinel: Path) -> bytes:
    return pickle.dumps({"weights": _Touch(sentinel)})


def _pickled_npy(sentinel: Path) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Touch(sentinel)], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_the_payload_is_live(tmp_path: Path) -> None:
    # the payload does what it says when something unpickles it (so the cases below mean it)
    pickle.loads(_payload(tmp_path / "proof"))  # noqa: S301 - the point of the test
    assert (tmp_path / "proof").exists()


def _safetensors_file(tmp_path: Path, sentinel: Path) -> Path:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(_payload(sentinel))
    return path


def _load_weights(tmp_path: Path, sentinel: Path) -> None:
    from shared_model.weights import load_safetensors
    load_safetensors(_safetensors_file(tmp_path, sentinel))


def _torch_load(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(_payload(sentinel))
    torch.load(path, weights_only=True)  # the only way the project may call it


def _server_checkpoint(tmp_path: Path, sentinel: Path) -> None:
    from server.state import CHECKPOINT_FILE, load_state
    from shared_model.config import load_config
    (tmp_path / CHECKPOINT_FILE).write_bytes(_payload(sentinel))
    load_state(tmp_path, load_config("demo-cpu"))


def _loop_checkpoint(tmp_path: Path, sentinel: Path) -> None:
    from shared_model.checkpoint import load_loop_state
    load_loop_state(_safetensors_file(tmp_path, sentinel))


def _bundle(tmp_path: Path, sentinel: Path) -> None:
    from shared_model.bundle import load_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "models" / "fedcmr-hybrid-sunnybrook", bundle)
    (bundle / "encoder.safetensors").write_bytes(_payload(sentinel))
    load_bundle(bundle).encoder  # noqa: B018 - loading is the point


def _store_array(tmp_path: Path, sentinel: Path) -> None:
    from client.node_settings import simulated_site_store
    from client.store import LocalStore
    from sim.sites import site_spec, write_site_frames
    root = simulated_site_store(tmp_path, 0)
    write_site_frames(root, site_spec(0, 1.5, 64), 1, seed=0)
    store = LocalStore.open(root)
    record = store.records()[0]
    (root / record.array).write_bytes(_pickled_npy(sentinel))
    store.load(record.key)


def _config(tmp_path: Path, sentinel: Path) -> None:
    from shared_model.config import load_config
    path = tmp_path / "config.yaml"
    path.write_text(f"seed: !!python/object/apply:builtins.open ['{sentinel}', 'w']\n")
    load_config(path)


def _incoming_message(tmp_path: Path, sentinel: Path) -> None:
    parameters_to_ndarrays(Parameters(tensors=[_pickled_npy(sentinel)], tensor_type="numpy.ndarray"))


def _overlay(tmp_path: Path, sentinel: Path) -> None:
    from sim.report.plots import load_overlay
    path = tmp_path / "overlay.npz"
    np.savez(path, image=np.array([_Touch(sentinel)], dtype=object))
    load_overlay(path)


# loader: (what feeds it the payload, the refusal it must raise)
LOADERS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "weights (safetensors)": (_load_weights, "WeightsError"),
    "torch.load(weights_only=True)": (_torch_load, "UnpicklingError"),
    "server checkpoint": (_server_checkpoint, "ResumeError"),
    "training checkpoint": (_loop_checkpoint, "CheckpointError"),
    "model bundle": (_bundle, "BundleError"),
    "store array": (_store_array, "StoreError"),
    "config YAML": (_config, "ConfigError"),
    "incoming Flower message": (_incoming_message, "ValueError"),
    "scenario overlay": (_overlay, "ValueError"),
}


@pytest.mark.reliability(13)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_pickle_payload_is_refused_by_every_loader(tmp_path: Path, loader: str) -> None:
    feed, refusal = LOADERS[loader]
    sentinel = tmp_path / "sentinel"
    with pytest.raises(Exception) as refused:  # noqa: PT011 - each loader has its own error type
        feed(tmp_path, sentinel)
    assert not sentinel.exists(), f"{loader} ran the payload"
    assert type(refused.value).__name__ == refusal, refused.value


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom)
                                                    and node.module else [])
            found += [f"line {node.lineno}: imports {n}" for n in names
                      if n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "shelve")]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        flag = keywords.get
        if owner == "torch" and node.func.attr == "load":
            value = flag("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if owner in ("np", "numpy") and node.func.attr == "load":
            value = flag("allow_pickle")
            if isinstance(value, ast.Constant) and value.value is True:
                found.append(f"line {node.lineno}: np.load(allow_pickle=True)")
        if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load", "load_all"):
            found.append(f"line {node.lineno}: yaml.{node.func.attr}")
    return found


@pytest.mark.reliability(13)
def test_no_code_could_unpickle() -> None:
    offences = {str(p.relative_to(ROOT)): calls for d in CODE for p in (ROOT / d).rglob("*.py")
                if (calls := _unsafe_calls(ast.parse(p.read_text(), str(p))))}
    assert offences == {}


@pytest.mark.reliability(13)
def test_the_scan_finds_each_unsafe_loader() -> None:
    code = ("import pickle\nimport torch, numpy as np, yaml\ntorch.load(f)\n"
            "torch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\nyaml.load(s)\n")
    assert len(_unsafe_calls(ast.parse(code))) == 5
    safe = "import torch, numpy as np\ntorch.load(f, weights_only=True)\nnp.load(f, allow_pickle=False)\n"
    assert _unsafe_calls(ast.parse(safe)) == []
