"""Encoder presets: named ViT architectures (plain data, importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EncoderPreset:
    """A named ViT architecture; ``image_size`` in pixels, ``patch_size`` in pixels."""

    name: str
    timm_name: str
    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    # "patch": timm's linear patch embedding; "conv": a convolutional stem whose feature maps
    # at 1, 1/2, ... 1/(patch/2) of the input serve dense heads as skips (pretrained with it)
    stem: str = "patch"
    stem_width: int = 16  # conv stem channels at its first level, doubling per level
    # the conv stem's first level: full resolution, or (as in a U-Net) half of it, where the
    # first convolution already strides; dense decoders then finish the last level skip-free
    stem_full_res: bool = True

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def timm_kwargs(self) -> dict[str, Any]:
        """The architecture arguments timm needs besides the name (for documentation)."""
        kwargs: dict[str, Any] = dict(img_size=self.image_size, patch_size=self.patch_size,
                                      embed_dim=self.embed_dim, depth=self.depth,
                                      num_heads=self.num_heads)
        if self.stem != "patch":
            kwargs.update(stem=self.stem, stem_width=self.stem_width)
            if not self.stem_full_res:
                kwargs.update(stem_full_res=False)
        return kwargs


PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        # CPU presets: ViT-tiny width, patch 8, shallow; fit 2 CPU cores.
        EncoderPreset("vit-tiny-p8-64", "fedcmr_vit_tiny_p8_64", 64, 8, 192, 4, 3),
        EncoderPreset("vit-tiny-p8-96", "fedcmr_vit_tiny_p8_96", 96, 8, 192, 6, 3),
        # Hybrid: a convolutional stem (16-128 channels, GroupNorm) under a ViT-tiny at 1/8 or
        # 1/16; dense heads take the stem's maps as skips (see shared_model.encoders.ConvStem).
        EncoderPreset("hybrid-tiny-p8-96", "fedcmr_hybrid_tiny_p8_96", 96, 8, 192, 6, 3, "conv"),
        EncoderPreset("hybrid-tiny-p16-96", "fedcmr_hybrid_tiny_p16_96", 96, 16, 192, 4, 3, "conv"),
        # U-Net-shaped: the stem starts at 1/2 (16, 32, 64 channels at 1/2, 1/4, 1/8), the ViT
        # runs on the 6 x 6 grid at 1/16
        EncoderPreset("hybrid-unet-p16-96", "fedcmr_hybrid_unet_p16_96", 96, 16, 192, 6, 3, "conv",
                      stem_full_res=False),
        # The paper's encoder: DINO ViT-S/8 at 224 px.
        EncoderPreset("vit-small-p8-224", "vit_small_patch8_224", 224, 8, 384, 12, 6),
    )
}
