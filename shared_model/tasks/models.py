"""Task models: the shared encoder plus one head per task kind.

Every model has an ``encoder`` (the federated ViT) and a ``head`` (task-specific), so weights
split cleanly into ``encoder.*`` and ``head.*``. No BatchNorm anywhere (GroupNorm and LayerNorm
only), so Opacus' ``ModuleValidator.validate(..., strict=True)`` accepts every model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from shared_model.encoders import Encoder

from shared_model.tasks.base import Task, TaskKind


def depth_indices(depth: int, count: int = 4) -> list[int]:
    """``count`` block indices spread over the encoder, always ending with the last block."""
    count = min(count, depth)
    return sorted({round((i + 1) * depth / count) - 1 for i in range(count)})


def pooled_features(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """[CLS, mean of patch tokens] after the final norm: (..., 2 * embed_dim).

    Frames (B, 1, H, W) give (B, 2D); bags (B, K, 1, H, W) give (B, K, 2D).
    """
    tokens = encoder(images)
    prefix = encoder.num_prefix_tokens
    return torch.cat([tokens[..., 0, :], tokens[..., prefix:, :].mean(dim=-2)], dim=-1)


class TaskModel(nn.Module):
    """A task model: the encoder and the task's head (``encoder.*`` and ``head.*`` weights).

    ``forward`` is ``decode(images, encode(images))``: ``encode`` is what the encoder hands the
    head (tensors with the batch first), so a frozen encoder's part can be computed once and
    reused (shared_model.feature_bank)."""

    encoder: Encoder
    head: nn.Module

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def decode(self, images: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(images, self.encode(images))


class PooledClassifier(TaskModel):
    """Class logits from the pooled encoder features (the head is the subclass's)."""

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (pooled_features(self.encoder, images),)

    def decode(self, images: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(features[0])


class FrameClassifier(PooledClassifier):
    """Frame -> class logits, from the pooled encoder features."""

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        width = 2 * encoder.embed_dim
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))


class AttentionPool(nn.Module):
    """Gated attention pooling over a bag of embeddings (Ilse et al., ICML 2018)."""

    def __init__(self, width: int, hidden: int = 128) -> None:
        super().__init__()
        self.value = nn.Linear(width, hidden)
        self.gate = nn.Linear(width, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, D)."""
        weights = self.score(torch.tanh(self.value(bag)) * torch.sigmoid(self.gate(bag)))
        return (torch.softmax(weights, dim=1) * bag).sum(dim=1)


class BagHead(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.pool = AttentionPool(width)
        self.classify = nn.Linear(width, num_classes)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(self.norm(bag)))


class BagClassifier(PooledClassifier):
    """(B, K, 1, H, W) frames of a series or study -> class logits."""

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = BagHead(2 * encoder.embed_dim, num_classes)


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                         nn.GroupNorm(min(8, c_out), c_out), nn.GELU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1),
                         nn.GroupNorm(min(8, c_out), c_out), nn.GELU())


class DenseDecoder(nn.Module):
    """Token features from several depths, upsampled to the input size with image skips.

    The ViT sees the image in patches (8 or 16 px). The skips at 1, 1/2, 1/4 ... of the input
    resolution come from the encoder's convolutional stem when it has one (pretrained with it,
    ``stem_widths``), else from a light convolutional stem of the decoder's own on the raw image,
    so borders are drawn at pixel precision rather than at patch precision.
    """

    def __init__(self, embed_dim: int, patch_size: int, num_depths: int, out_channels: int,
                 base_width: int = 16, stem_widths: list[int] | None = None) -> None:
        super().__init__()
        levels = int(round(math.log2(patch_size)))
        if 2**levels != patch_size:
            raise ValueError(f"patch size {patch_size} is not a power of two")
        if stem_widths is None:
            widths = [min(base_width * 2**i, 256) for i in range(levels + 1)]  # full res ... tokens
            self.stems: nn.ModuleList | None = nn.ModuleList([conv_block(1, widths[0])] + [
                conv_block(widths[i - 1], widths[i], stride=2) for i in range(1, levels)])
            skip_widths = widths[:levels]
        else:
            self.stems = None
            skip_widths = list(stem_widths)
            widths = skip_widths + [min(2 * skip_widths[-1], 256)]
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, widths[-1], 1) for _ in range(num_depths))
        self.fuse = nn.Sequential(nn.GroupNorm(8, widths[-1]), nn.GELU())
        self.ups = nn.ModuleList(conv_block(widths[i + 1] + skip_widths[i], widths[i])
                                 for i in reversed(range(len(skip_widths))))
        # a stem that starts at 1/2 leaves full resolution without a skip: one more block there
        self.last = conv_block(widths[0], widths[0]) if len(skip_widths) < levels else None
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, images: torch.Tensor, token_maps: list[torch.Tensor],
                skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.stems is not None:
            skips = []
            x = images
            for stem in self.stems:
                x = stem(x)
                skips.append(x)
        assert skips is not None, "a decoder without stems of its own needs the encoder's skips"
        y = self.fuse(sum(p(t) for p, t in zip(self.project, token_maps, strict=True)))
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        if self.last is not None:
            y = self.last(F.interpolate(y, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return self.out(y)


class DensePredictor(TaskModel):
    """Per-pixel outputs (segmentation logits or landmark heatmap logits) at input size."""

    def __init__(self, encoder: Encoder, out_channels: int, width: int = 16) -> None:
        super().__init__()
        self.encoder = encoder
        encoder.taps = tuple(depth_indices(len(encoder.blocks)))
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        stem_widths = encoder.patch_embed.widths if encoder.has_conv_stem else None
        self.head = DenseDecoder(encoder.embed_dim, self.patch_size, len(encoder.taps), out_channels,
                                 base_width=width, stem_widths=stem_widths)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tapped blocks' tokens (B, T, N, D), then the conv stem's skips (if any)."""
        taps = self.encoder(images)
        self.last_tokens = taps[:, -1].detach()  # health signals of pretraining read these
        return (taps, *self.encoder.skips)

    def decode(self, images: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        taps, skips = features[0], list(features[1:])
        b, t, n, d = taps.shape
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        maps = taps.permute(1, 0, 3, 2).reshape(t, b, d, h, w)
        return self.head(images, list(maps.unbind(0)), skips or None)


def build_task_model(task: Task, encoder: Encoder, decoder_width: int = 16) -> TaskModel:
    """The encoder with the head of the task's kind (``decoder_width``: dense tasks' channels at
    full resolution, doubling per level)."""
    if task.kind == TaskKind.frame_classification:
        return FrameClassifier(encoder, task.num_outputs)
    if task.kind == TaskKind.bag_classification:
        return BagClassifier(encoder, task.num_outputs)
    return DensePredictor(encoder, task.num_outputs, decoder_width)
