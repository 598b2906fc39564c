"""Encoder presets: timm Vision Transformers with one input channel and no classifier.

Presets that timm does not know by name are registered with timm under ``fedcmr_*`` names when
this module is imported, so a saved encoder loads with plain timm:
``timm.create_model(preset.timm_name, in_chans=1, num_classes=0, checkpoint_path=file)``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, cast

import timm
import torch
import torch.nn as nn
from timm.models import PretrainedCfg
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from shared_model.presets import PRESETS, EncoderPreset  # noqa: F401  (re-exported)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm (Opacus-safe: no BatchNorm) and a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(c_out)
        self.shortcut = nn.Identity() if c_in == c_out and stride == 1 else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), _group_norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.gelu(self.norm1(self.conv1(x)))
        return nn.functional.gelu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ConvStem(nn.Module):
    """A convolutional patch embedding for timm's ViT (its ``embed_layer``).

    Stages at 1, 1/2, ... 1/(patch/2) of the input (``width`` channels, doubling, at most 256),
    or from 1/2 with ``full_res=False`` (the first convolution strides, as a U-Net's does), then
    a stride-2 convolution to the token grid at 1/patch. The stages' outputs of the last
    forward pass stay in ``skips``: the decoder of a dense task takes them, so fine borders come
    from pretrained features rather than from a decoder trained on a few labelled frames.
    """

    def __init__(self, img_size: int | tuple[int, int] = 96, patch_size: int | tuple[int, int] = 8,
                 in_chans: int = 1, embed_dim: int = 192, bias: bool = True, width: int = 16,
                 full_res: bool = True, output_fmt: str = "NCHW", **_: Any) -> None:
        super().__init__()
        patch = patch_size[0] if isinstance(patch_size, tuple) else patch_size
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        levels = int(round(math.log2(patch)))
        if 2**levels != patch or levels < 1:
            raise ValueError(f"a conv stem needs a power-of-two patch size, not {patch}")
        self.img_size = size
        self.patch_size = (patch, patch)
        self.grid_size = (size[0] // patch, size[1] // patch)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt = output_fmt
        first = 0 if full_res else 1  # the level of the first stage (0: full resolution)
        self.widths = [min(width * 2**i, 256) for i in range(levels - first)]
        stage0: nn.Module = ResidualBlock(in_chans, self.widths[0], stride=2)
        if full_res:
            stage0 = nn.Sequential(nn.Conv2d(in_chans, self.widths[0], 3, 1, 1, bias=False),
                                   _group_norm(self.widths[0]), nn.GELU(),
                                   ResidualBlock(self.widths[0], self.widths[0]))
        stages = [stage0]
        stages += [ResidualBlock(self.widths[i - 1], self.widths[i], stride=2)
                   for i in range(1, len(self.widths))]
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Conv2d(self.widths[-1], embed_dim, 3, 2, 1, bias=bias)
        self.skips: list[torch.Tensor] = []
        # True while only the stem trains (tasks.mode=stem): the stages then learn through the
        # skips alone, and the tokens carry no gradient into the frozen transformer
        self.detach_tokens = False

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return self.patch_size[0]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        self.skips = skips
        x = self.proj(x.detach() if self.detach_tokens else x)
        if self.output_fmt == "NHWC":  # timm's dynamic image size defers the flattening
            return x.permute(0, 2, 3, 1)
        return x.flatten(2).transpose(1, 2)


def model_kwargs(preset: EncoderPreset) -> dict[str, Any]:
    """What VisionTransformer takes to build the preset (its stem as a module class)."""
    kwargs = preset.timm_kwargs()
    if kwargs.pop("stem", "patch") == "conv":
        kwargs["embed_layer"] = partial(ConvStem, width=kwargs.pop("stem_width"),
                                        full_res=kwargs.pop("stem_full_res", True))
    return kwargs


def _register_with_timm(preset: EncoderPreset) -> None:
    if preset.timm_name in timm.list_models(preset.timm_name):
        return

    def create(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"{preset.timm_name} has no downloadable weights; "
                             "pass checkpoint_path= to load a FedCMR encoder")
        if kwargs.get("pretrained_cfg") is None:
            # Store images are single-channel and already normalised to zero mean, unit std.
            kwargs["pretrained_cfg"] = PretrainedCfg(
                architecture=preset.timm_name, input_size=(1, preset.image_size, preset.image_size),
                mean=(0.0,), std=(1.0,), num_classes=0, first_conv="patch_embed.proj",
                license="apache-2.0")
        return build_model_with_cfg(VisionTransformer, preset.timm_name, pretrained=False,
                                    **dict(model_kwargs(preset), **kwargs))

    create.__name__ = preset.timm_name
    create.__qualname__ = preset.timm_name
    register_model(create)


for _preset in PRESETS.values():
    if _preset.timm_name.startswith("fedcmr_"):
        _register_with_timm(_preset)


def get_preset(name: str) -> EncoderPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown encoder preset '{name}'; known: {', '.join(PRESETS)}") from None


class Encoder(VisionTransformer):
    """timm's ViT whose ``__call__`` returns what FedCMR's heads consume.

    Every use of the encoder goes through ``__call__`` (never ``forward_features`` from outside)
    so that Opacus' per-sample gradient hooks, which wrap the encoder as one module because it
    owns ``cls_token`` and ``pos_embed`` directly, see the complete computation. The weights are
    plain timm ViT weights (same keys), so they load into ``timm.create_model``.

    - ``encoder(images)``: all tokens after the final norm, (B, prefix + N, D)
    - ``encoder(images, keep)``: only the patches indexed by ``keep`` (B, K) are encoded (MAE),
      (B, prefix + K, D); a conv stem sees the whole (masked) image
    - ``skips``: with a conv stem, its feature maps of the last call (dense heads use them)
    - with ``taps`` set: token maps of those blocks, before the final norm, (B, T, N, D)
    - bags of frames (B, K, 1, H, W) give (B, K, ...): under DP-SGD a bag (a series or a
      study) is then one sample, as it must be
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.taps: tuple[int, ...] = ()

    @property
    def has_conv_stem(self) -> bool:
        return isinstance(self.patch_embed, ConvStem)

    @property
    def skips(self) -> list[torch.Tensor]:
        return self.patch_embed.skips if isinstance(self.patch_embed, ConvStem) else []

    # Not timm's forward(x, attn_mask): FedCMR's heads pass a mask of the patches to keep.
    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if images.ndim == 5:
            out = self.forward(images.flatten(0, 1))
            return out.view(*images.shape[:2], *out.shape[1:])
        if keep is not None:
            return self._encode_visible(images, keep)
        if self.taps:
            maps = self.forward_intermediates(images, indices=list(self.taps), norm=False,
                                              output_fmt="NLC", intermediates_only=True)
            return torch.stack(cast(list[torch.Tensor], maps), dim=1)  # intermediates_only: a list
        return self.forward_features(images)

    def _encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(images))
        prefix = self.num_prefix_tokens
        tokens = x[:, prefix:]
        index = keep.to(images.device).long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        x = torch.cat([x[:, :prefix], torch.gather(tokens, 1, index)], dim=1)
        return self.norm(self.blocks(self.norm_pre(x)))


def build_encoder(preset: str | EncoderPreset, drop_path_rate: float = 0.0) -> Encoder:
    """A freshly initialised encoder (1 channel in, no classifier), see :class:`Encoder`.

    ``dynamic_img_size`` lets the same weights take smaller inputs (DINO's local crops); it only
    changes the forward pass, so the weights still load into plain timm models.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    return Encoder(**model_kwargs(p), in_chans=1, num_classes=0, drop_path_rate=drop_path_rate,
                   dynamic_img_size=True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
