"""Data-parallel local pretraining over several devices of one node (torch DDP).

A hospital node with several GPUs trains one local session on all of them: one process per
device, each drawing its own batches (its own sampling seed) of ``batch_size`` images, gradients
averaged by DDP's all-reduce (NCCL on CUDA, gloo on CPU) so every process takes the same step,
and the weights leave rank 0. The effective batch is ``len(devices) x batch_size``. Processes
talk over loopback only. Model, images and results cross the process boundary as safetensors
files and the config as YAML (never pickled objects).
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shared_model.config import FedCMRConfig, config_from_yaml, config_to_yaml
from shared_model.ssl.base import SSLModel
from shared_model.train import LocalResult, Span, TensorBatches, make_generator, make_optimizer, run_steps
from shared_model.weights import load_safetensors, save_safetensors


class TrainingStep(torch.nn.Module):
    """``forward`` is the SSL model's training step, so DDP sees (and syncs) the whole of it."""

    def __init__(self, model: SSLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, gen: torch.Generator
                ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.training_step(images, gen)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pretrain_data_parallel(model: SSLModel, images: torch.Tensor, devices: Sequence[str], cfg: FedCMRConfig,
                           *, steps: int, span: Span, seed: int) -> LocalResult:
    """``steps`` optimiser steps of ``cfg.ssl`` on ``images`` over ``devices``; ``model`` ends
    with rank 0's weights (all ranks hold the same). ``images`` stay on the CPU."""
    import torch.multiprocessing as mp

    world = len(devices)
    with tempfile.TemporaryDirectory(prefix="fedcmr-ddp-") as tmp:
        folder = Path(tmp)
        save_safetensors(folder / "model.safetensors", {k: v.detach().cpu().contiguous()
                                                        for k, v in model.state_dict().items()})
        save_safetensors(folder / "images.safetensors", {"images": images.contiguous()})
        mp.start_processes(_worker, nprocs=world, start_method="spawn", join=True, args=(
            world, free_loopback_port(), list(devices), config_to_yaml(cfg), str(folder), steps,
            span.start, span.end, seed))
        state, _ = load_safetensors(folder / "rank-0.safetensors")
        model.load_state_dict(state)
        return LocalResult(**json.loads((folder / "rank-0.json").read_text()))


def rank_spread(model: torch.nn.Module, world: int) -> float:
    """Largest difference between ranks of any parameter tensor's sum: ~0 when DDP kept every
    rank's weights the same (a health check the session reports as ``rank_spread``)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


def _worker(rank: int, world: int, port: int, devices: list[str], config_yaml: str, folder_text: str,
            steps: int, span_start: float, span_end: float, seed: int) -> None:
    from shared_model.phase_models import initial_ssl_model

    folder = Path(folder_text)
    device = torch.device(devices[rank])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = config_from_yaml(config_yaml, "data-parallel session")
        model = initial_ssl_model(cfg)
        model.load_state_dict(load_safetensors(folder / "model.safetensors")[0])
        model.to(device).train()
        if device.type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        step = DistributedDataParallel(TrainingStep(model),
                                       device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = make_optimizer(model, cfg.ssl.lr, cfg.ssl.weight_decay)
        gen = make_generator(seed, "data-parallel rank", rank)
        images = load_safetensors(folder / "images.safetensors")[0]["images"]

        def step_fn(batch: tuple[torch.Tensor, ...], progress: float) -> tuple[torch.Tensor, dict[str, float]]:
            model.set_progress(progress)
            loss, stats = step(batch[0], gen)
            return loss, stats

        result = run_steps(step, TensorBatches([images], cfg.ssl.batch_size, gen), step_fn,
                           optimizer=optimizer, steps=steps, base_lr=cfg.ssl.lr, device=device,
                           gen=gen, span=Span(span_start, span_end),
                           after_step=lambda s, p: model.after_optimizer_step())
        spread = rank_spread(model, world)
        if rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_safetensors(folder / "rank-0.safetensors", state)
            totals = asdict(result)
            totals["images_seen"] = result.images_seen * world  # every rank's batches
            totals["stats"] = {**result.stats, "rank_spread": spread}
            (folder / "rank-0.json").write_text(json.dumps(totals))
    finally:
        dist.destroy_process_group()
