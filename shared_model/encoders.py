"""Encoder presets: timm Vision Transformers with one input channel and no classifier.

Presets that timm does not know by name are registered with timm under ``fedcmr_*`` names when
this module is imported, so a saved encoder loads with plain timm:
``timm.create_model(preset.timm_name, in_chans=1, num_classes=0, checkpoint_path=file)``.
"""

from __future__ import annotations

from typing import Any, cast

import timm
import torch
import torch.nn as nn
from timm.models import PretrainedCfg
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from shared_model.presets import PRESETS, EncoderPreset  # noqa: F401  (re-exported)


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
                                    **dict(preset.timm_kwargs(), **kwargs))

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
      (B, prefix + K, D)
    - with ``taps`` set: token maps of those blocks, before the final norm, (B, T, N, D)
    - bags of frames (B, K, 1, H, W) give (B, K, ...): under DP-SGD a bag (a series or a
      study) is then one sample, as it must be
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.taps: tuple[int, ...] = ()

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
    return Encoder(**p.timm_kwargs(), in_chans=1, num_classes=0, drop_path_rate=drop_path_rate,
                   dynamic_img_size=True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
