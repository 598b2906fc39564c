"""GPU check: the project's DINO pretraining loop against a plain PyTorch loop, and its MFU.

ViT-S/8 at 224 px (the paper's encoder), bf16 autocast on CUDA, the same model, batch and views
for both loops:

- ``project``: ``shared_model.train.pretrain_local`` (the node's engine: schedule, health
  signals, EMA teacher, seeded batches);
- ``plain``: a bare loop over the same ``training_step``, optimiser step and teacher update.

Prints images/s of both, their ratio (goal >= 0.9), the FLOPs of one training step (counted by
``torch.utils.flop_counter`` on the real step), the bf16 matrix-multiply rate measured in this
run, and the model FLOP utilisation = achieved FLOP/s / that rate (goal >= 35 %).
``--cpu-smoke`` runs the same path with a tiny encoder on the CPU (fp32) in seconds.

    python benchmarks/gpu_check.py [--cpu-smoke] [--steps 30] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Measured dense matrix-multiply FLOP/s for ``size`` x ``size`` operands."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(smoke: bool, device: torch.device):  # noqa: ANN201 - (model, optimizer, images, cfg)
    from shared_model.config import load_config
    from shared_model.ssl import build_ssl_model
    from shared_model.train import make_optimizer

    overrides = ["ssl.method=dino", "device=" + device.type]
    if smoke:
        overrides += ["model.preset=vit-tiny-p8-64", "ssl.dino.out_dim=256",
                      "ssl.dino.hidden_dim=128", "ssl.dino.local_crops=2"]
    cfg = load_config(None if smoke else "paper-vit-s8", overrides)
    torch.manual_seed(0)
    model = build_ssl_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg.ssl.lr, cfg.ssl.weight_decay)
    from shared_model.encoders import get_preset

    size = get_preset(cfg.model.preset).image_size
    images = torch.rand(512 if not smoke else 32, 1, size, size)
    return model, optimizer, images, cfg


def project_loop(model, optimizer, images, batch: int, steps: int, device: torch.device) -> float:  # noqa: ANN001
    from shared_model.train import make_generator, pretrain_local

    pretrain_local(model, images, steps=2, batch_size=batch, optimizer=optimizer,
                   gen=make_generator(0), device=device, base_lr=1e-4)  # warm-up
    _sync(device)
    start = time.perf_counter()
    pretrain_local(model, images, steps=steps, batch_size=batch, optimizer=optimizer,
                   gen=make_generator(1), device=device, base_lr=1e-4)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def plain_loop(model, optimizer, images, batch: int, steps: int, device: torch.device) -> float:  # noqa: ANN001
    gen = torch.Generator().manual_seed(2)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        x = images[torch.randint(0, len(images), (batch,), generator=gen)].to(device, non_blocking=True)
        with autocast:
            loss, _ = model.training_step(x, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_optimizer_step()

    model.train()
    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def step_flops(model, images, batch: int, device: torch.device) -> float:  # noqa: ANN001
    """FLOPs of one training step (forward and backward), counted on the real step."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(3)
    x = images[:batch].to(device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = model.training_step(x, gen)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    steps = args.steps or (3 if smoke else 30)
    batch = args.batch or (4 if smoke else 64)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model, optimizer, images, cfg = build(smoke, device)
    rate = matmul_rate(device, torch.float32 if smoke else torch.bfloat16, 512 if smoke else 8192,
                       5 if smoke else 50)
    flops = step_flops(model, images, batch, device)
    project = project_loop(model, optimizer, images, batch, steps, device)
    plain = plain_loop(model, optimizer, images, batch, steps, device)
    mfu = project / batch * flops / rate
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": name, "preset": cfg.model.preset, "batch": batch, "steps": steps,
              "dtype": "fp32" if smoke else "bf16", "project_images_per_s": round(project, 2),
              "plain_images_per_s": round(plain, 2), "ratio": round(project / plain, 3),
              "step_tflop": round(flops / 1e12, 4), "matmul_tflops": round(rate / 1e12, 2),
              "mfu": round(mfu, 4)}
    print(f"gpu_check on {name} ({result['dtype']}, {cfg.model.preset}, batch {batch}, {steps} steps)")
    print(f"  project loop   {project:10.1f} images/s")
    print(f"  plain loop     {plain:10.1f} images/s")
    print(f"  ratio          {project / plain:10.3f}   (goal >= 0.9)")
    print(f"  step           {flops / 1e12:10.4f} TFLOP; matmul rate {rate / 1e12:.2f} TFLOP/s")
    print(f"  MFU            {100 * mfu:9.1f} %   (goal >= 35 % on a GPU in bf16)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
