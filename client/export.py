"""A fine-tuned task model as ONNX, so a hospital can deploy it without PyTorch.

The graph takes what the model takes (``image``: (batch, 1, S, S) frames on the model grid,
normalised as the store normalises; bag tasks (batch, K, 1, S, S)) and returns the raw
``logits``; the export is checked against PyTorch with onnxruntime on random inputs and the
largest absolute difference is reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ONNX_OPSET = 18  # scaled-dot-product attention and GroupNorm as plain ops


@dataclass
class OnnxExport:
    path: Path
    input_shape: tuple[int, ...]
    max_abs_difference: float


def export_onnx(task_name: str, bundle_path: Path, out: Path, batch: int = 2) -> OnnxExport:
    """Write ``out`` and compare onnxruntime's outputs with PyTorch's on ``batch`` inputs."""
    import onnxruntime

    from shared_model.bundle import load_bundle, task_model_from_bundle
    from shared_model.encoders import get_preset
    from shared_model.tasks import TaskKind, get_task

    task = get_task(task_name)
    bundle = load_bundle(bundle_path)
    model = task_model_from_bundle(bundle, task, require_head=True).eval()
    size = get_preset(bundle.config.model.preset).image_size
    bag = getattr(task, "bag_size", 0) if task.kind == TaskKind.bag_classification else 0
    shape = (batch, bag, 1, size, size) if bag else (batch, 1, size, size)
    example = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on shape arithmetic
        torch.onnx.export(model, (example,), str(out), opset_version=ONNX_OPSET, dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        reference = model(example).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    produced = session.run(None, {"image": example.numpy()})[0]
    return OnnxExport(out, shape, float(np.abs(produced - reference).max()))
