"""MAE: masked autoencoder pretraining (He et al., CVPR 2022) on a timm ViT encoder.

Head: a light transformer decoder that sees the encoded visible patches plus mask tokens and
predicts the pixels of every patch. Loss: mean squared error on the masked patches only, against
per-patch normalised pixels when ``norm_pix_loss``. Views: one mildly augmented crop per image.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from shared_model.augment import (
    SEGMENTATION_GEOMETRY,
    ViewSpec,
    apply_affine,
    make_view,
    random_geometry,
    random_intensity,
)
from shared_model.config import MAEConfig
from shared_model.encoders import Encoder
from shared_model.ssl.base import SSLModel
from shared_model.ssl.health import embedding_std, rankme


def mae_view_spec(image_size: int) -> ViewSpec:
    return ViewSpec(size=image_size, scale=(0.6, 1.0), max_rotation_deg=10.0, noise_std=0.02)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order as timm's patch embedding."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 1) -> torch.Tensor:
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def random_masking(batch: int, num_patches: int, mask_ratio: float,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random subsets: (keep indices, restore order, mask with 1 = hidden)."""
    num_keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    noise = torch.rand(batch, num_patches, generator=gen)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, num_patches)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, restore)
    return shuffle[:, :num_keep], restore, mask


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      norm_pix: bool) -> torch.Tensor:
    """MSE per patch, averaged over the hidden patches (mask == 1)."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


class MAEDecoder(nn.Module):
    pos_embed: torch.Tensor  # fixed sin-cos, a buffer

    """Light decoder: embed, add mask tokens, a few transformer blocks, predict pixels."""

    def __init__(self, embed_dim: int, num_patches: int, num_prefix: int, patch_size: int,
                 cfg: MAEConfig) -> None:
        super().__init__()
        d = cfg.decoder_dim
        self.num_prefix = num_prefix
        self.embed = nn.Linear(embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        grid = int(round(num_patches**0.5))
        pos = build_sincos2d_pos_embed([grid, grid], dim=d)  # fixed, (grid*grid, d)
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(d, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(d)
        self.pred = nn.Linear(d, patch_size * patch_size)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent[:, self.num_prefix:])
        b, kept, d = x.shape
        n = restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - kept, d)], dim=1)
        index = restore.to(x.device).unsqueeze(-1).expand(-1, -1, d)
        x = torch.gather(x, 1, index) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


class MAE(SSLModel):
    """Encoder + MAE decoder head; see the module docstring."""

    def __init__(self, encoder: Encoder, cfg: MAEConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.image_size = int(encoder.patch_embed.img_size[0])
        self.num_patches = cast(int, encoder.patch_embed.num_patches)
        self.head = MAEDecoder(encoder.embed_dim, self.num_patches,
                               encoder.num_prefix_tokens, self.patch_size, cfg)

    def forward(self, images: torch.Tensor, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, predicted patches, mask, encoded visible tokens) for already-made views."""
        keep, restore, mask = random_masking(images.shape[0], self.num_patches,
                                             self.cfg.mask_ratio, gen)
        visible = images
        if self.encoder.has_conv_stem:  # a conv stem sees neighbours: hide the masked pixels
            rows, cols = self.encoder.patch_embed.grid_size  # type: ignore[union-attr, misc]
            hidden = mask.view(-1, 1, rows, cols).repeat_interleave(self.patch_size, 2)
            visible = images * (1 - hidden.repeat_interleave(self.patch_size, 3).to(images))
        latent = self.encoder(visible, keep)
        pred = self.head(latent, restore)
        mask = mask.to(images.device)
        target = patchify(images, self.patch_size)
        loss = masked_patch_loss(pred.float(), target.float(), mask, self.cfg.norm_pix_loss)
        return loss, pred, mask, latent

    def training_step(self, images: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        views = make_view(images, mae_view_spec(self.image_size), gen)
        loss, _, _, latent = self(views, gen)
        # The CLS token receives no MAE gradient; pooled patch tokens show collapse instead.
        pooled = latent[:, self.encoder.num_prefix_tokens:].mean(dim=1)
        return loss, {"embed_std": embedding_std(pooled), "rankme": rankme(pooled)}

    def federated_prefixes(self) -> tuple[str, ...]:
        return ("encoder.", "head.")

    def set_progress(self, progress: float) -> None:
        """MAE has no schedule of its own (the optimiser's learning rate is the loop's)."""

    def after_optimizer_step(self) -> None:
        """Nothing outside the gradient to update."""


DENSE_MAE_INTENSITY = ViewSpec(size=0, gamma=(0.7, 1.5), contrast=(0.75, 1.25), brightness=0.1,
                               noise_std=0.03)


def dense_mae_views(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Views for inpainting pretraining: the geometry and intensity range segmentation
    fine-tuning sees (any rotation, mirror, 0.7-1.4 zoom), so no part of it is new there."""
    theta = random_geometry(images.shape[0], SEGMENTATION_GEOMETRY, gen)
    return random_intensity(apply_affine(images, theta), DENSE_MAE_INTENSITY, gen)


class DenseMAE(SSLModel):
    """Masked image modelling of the whole dense network: encoder + the dense tasks' decoder.

    Hidden patches (``mask_ratio`` of the patch grid) are zeroed in the input; the encoder sees
    every token, the decoder (``shared_model.tasks.models.DenseDecoder``, one output channel)
    paints the image back, and the loss is the per-patch normalised MSE on the hidden patches.
    ``head.*`` is then the pretrained decoder a segmentation task starts from (all but its
    output layer). Measured on real patients of other pathology groups, fine-tuned on one
    labelled patient: blood-pool Dice 0.74, against 0.47 from scratch and 0.41 after
    transformer-decoder MAE of the same length.
    """

    def __init__(self, encoder: Encoder, cfg: MAEConfig, decoder_width: int = 16) -> None:
        super().__init__()
        from shared_model.tasks.models import DensePredictor

        predictor = DensePredictor(encoder, 1, decoder_width)
        self.encoder = encoder
        self.head = predictor.head
        self._predictor = [predictor]  # not a submodule: its weights are encoder.* and head.*
        self.cfg = cfg
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.image_size = int(encoder.patch_embed.img_size[0])

    def forward(self, images: torch.Tensor, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, reconstruction (B, 1, H, W), patch mask (B, N) with 1 = hidden)."""
        b = images.shape[0]
        grid = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        hidden = (torch.rand(b, grid[0] * grid[1], generator=gen) < self.cfg.mask_ratio).float()
        pixels = hidden.view(b, 1, *grid).repeat_interleave(self.patch_size, 2)
        pixels = pixels.repeat_interleave(self.patch_size, 3).to(images)
        reconstruction = self._predictor[0](images * (1 - pixels))
        target = patchify(images, self.patch_size).float()
        pred = patchify(reconstruction, self.patch_size).float()
        mask = hidden.to(images.device)
        loss = masked_patch_loss(pred, target, mask, self.cfg.norm_pix_loss)
        return loss, reconstruction, mask

    def training_step(self, images: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _, _ = self(dense_mae_views(images, gen), gen)
        # the deepest token map (the encoder's last tapped block), pooled over patches
        pooled = self._last_tokens().mean(dim=1)
        return loss, {"embed_std": embedding_std(pooled), "rankme": rankme(pooled)}

    def _last_tokens(self) -> torch.Tensor:
        return self._predictor[0].last_tokens

    def federated_prefixes(self) -> tuple[str, ...]:
        return ("encoder.", "head.")

    def set_progress(self, progress: float) -> None:
        """No schedule of its own (the optimiser's learning rate is the loop's)."""

    def after_optimizer_step(self) -> None:
        """Nothing outside the gradient to update."""
