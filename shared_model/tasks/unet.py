"""The supervised baseline a hospital would otherwise train: MONAI's 2-D U-Net, from scratch.

Channels 16-128 with residual units and instance norm, as in the project's anchor measurements
(ANCHORS.md); per-pixel outputs at the input size, so it serves the dense tasks (segmentation and
landmark heatmaps) with the same losses, metrics, augmentation and budget as the foundation
model. It has no foundation encoder: everything in it trains, and nothing of it is federated.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from shared_model.tasks.base import Task, TaskKind

UNET_CHANNELS = (16, 32, 64, 128)
UNET_STRIDES = (2, 2, 2)


class SupervisedUNet(nn.Module):
    """(B, 1, H, W) -> (B, out_channels, H, W); H and W divisible by 8."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        self.net = UNet(spatial_dims=2, in_channels=1, out_channels=out_channels,
                        channels=UNET_CHANNELS, strides=UNET_STRIDES, num_res_units=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def build_unet(task: Task) -> SupervisedUNet:
    if task.kind not in (TaskKind.segmentation, TaskKind.landmarks):
        raise ValueError(f"tasks.arch=unet serves per-pixel tasks (segmentation, landmarks); "
                         f"'{task.name}' is a {task.kind.value} task: use tasks.arch=fm")
    return SupervisedUNet(task.num_outputs)
