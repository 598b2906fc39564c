"""DINO: self-distillation with no labels (Caron et al., ICCV 2021), as the paper's pretraining.

Head: a projection MLP, L2 normalisation and a weight-normalised prototype layer (the DINO head),
for the student and for an EMA teacher. Loss: cross-entropy between the centred, sharpened
teacher distribution of each global view and the student distribution of every *other* view.
Views: two global crops at the encoder's input size and several smaller local crops, with CMR-
suited intensity and geometry augmentations (no left-right flips, see shared_model.augment).

Health signals: the teacher's mean entropy (collapse to one prototype -> 0; to uniform ->
log(out_dim)), its KL to the batch's mean distribution (0 under either collapse), and the spread
and effective rank of the student's CLS embeddings.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared_model.augment import ViewSpec, make_view
from shared_model.config import DINOConfig, TeacherMode
from shared_model.encoders import Encoder
from shared_model.ssl.base import SSLModel
from shared_model.ssl.health import embedding_std, rankme

# ---------------------------------------------------------------------------- pure functions


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1, cosine in between."""
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (1 + math.cos(math.pi * progress)) / 2


def teacher_temperature(cfg: DINOConfig, progress: float) -> float:
    """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_fraction``."""
    if cfg.warmup_fraction <= 0 or progress >= cfg.warmup_fraction:
        return cfg.teacher_temp
    w = progress / cfg.warmup_fraction
    return cfg.warmup_teacher_temp + w * (cfg.teacher_temp - cfg.warmup_teacher_temp)


@torch.no_grad()
def update_momentum(model: nn.Module, ema: nn.Module, momentum: float) -> None:
    """``ema <- momentum * ema + (1 - momentum) * model``, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.mul_(momentum).add_(p.detach(), alpha=1 - momentum)


def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """Centred and sharpened teacher distribution (no gradient flows to the teacher)."""
    return F.softmax((teacher_logits.detach().float() - center) / temperature, dim=-1)


def dino_cross_entropy(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
                       student_temp: float) -> torch.Tensor:
    """Mean over (teacher view i, student view v != i) of H(teacher_i, student_v).

    Student views are ordered global views first, so index i pairs the same global view.
    """
    total = student_logits[0].new_zeros(())
    terms = 0
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    for i, q in enumerate(teacher_probs):
        for v, log_p in enumerate(log_probs):
            if v == i:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            terms += 1
    return total / max(terms, 1)


def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor,
                   momentum: float) -> torch.Tensor:
    """EMA of the teacher's mean logit: the centring that keeps one prototype from winning."""
    batch_center = teacher_logits.detach().float().mean(dim=0, keepdim=True)
    return center * momentum + batch_center * (1 - momentum)


def mean_entropy(probs: torch.Tensor) -> float:
    return float(-(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1).mean())


def kl_to_center(probs: torch.Tensor) -> float:
    """Mean KL(teacher distribution of an image || the batch's mean distribution), nats.

    The batch mean is where centring pulls the teacher; this is the information the teacher's
    output carries about the image: 0 under either collapse (one prototype for all, or the
    same uniform output for all), up to log(out_dim) when every image gets its own prototype.
    """
    mean = probs.mean(dim=0, keepdim=True).clamp(min=1e-12)
    log_ratio = probs.clamp(min=1e-12).log() - mean.log()
    return float((probs * log_ratio).sum(dim=-1).mean())


# ---------------------------------------------------------------------------- modules


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> prototypes with unit-norm weights (``norm_last_layer``).

    The prototype layer normalises its weight rows in the forward pass instead of using
    weight_norm hooks, which keeps the head a plain nn.Linear for Opacus and for timm loading.
    """

    def __init__(self, in_dim: int, cfg: DINOConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(cfg.head_layers - 1, 0)):
            layers += [nn.Linear(dim, cfg.hidden_dim), nn.GELU()]
            dim = cfg.hidden_dim
        layers.append(nn.Linear(dim, cfg.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(features), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


def dino_view_specs(image_size: int, cfg: DINOConfig) -> tuple[ViewSpec, ViewSpec]:
    """(global, local) crop specifications; the local side is a whole number of patches."""
    global_spec = ViewSpec(size=image_size, scale=(cfg.global_crop_scale[0], cfg.global_crop_scale[1]),
                           blur_prob=0.5)
    local_size = max(16, int(round(image_size * cfg.local_crop_fraction / 8)) * 8)
    local_spec = ViewSpec(size=local_size, scale=(cfg.local_crop_scale[0], cfg.local_crop_scale[1]),
                          blur_prob=0.3)
    return global_spec, local_spec


class DINO(SSLModel):
    """Student (``encoder``, ``head``) and EMA teacher (``teacher.encoder``, ``teacher.head``)."""

    center: torch.Tensor  # running mean of the teacher's logits, a buffer

    def __init__(self, encoder: Encoder, cfg: DINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.head = DINOHead(encoder.embed_dim, cfg)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder),
                                      "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.image_size = int(encoder.patch_embed.img_size[0])
        self.progress = 0.0

    def federated_prefixes(self) -> tuple[str, ...]:
        """What the server averages: the student always, the teacher and centre if configured."""
        if self.cfg.teacher == TeacherMode.aggregated:
            return ("encoder.", "head.", "teacher.", "center")
        return ("encoder.", "head.")

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Teacher := student (at the start of pretraining, or of a round in local-EMA mode)."""
        self.teacher["encoder"].load_state_dict(self.encoder.state_dict())
        self.teacher["head"].load_state_dict(self.head.state_dict())

    def set_progress(self, progress: float) -> None:
        """Fraction of all pretraining steps done (drives temperature and momentum schedules)."""
        self.progress = progress

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        return self

    def training_step(self, images: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        global_spec, local_spec = dino_view_specs(self.image_size, self.cfg)
        global_views = torch.cat([make_view(images, global_spec, gen) for _ in range(2)])
        with torch.no_grad():
            teacher_logits = self.teacher["head"](self.teacher["encoder"](global_views)[:, 0])
        student_global = self.encoder(global_views)[:, 0]  # CLS token
        student_logits = list(self.head(student_global).chunk(2))
        if self.cfg.local_crops > 0:
            local_views = torch.cat([make_view(images, local_spec, gen)
                                     for _ in range(self.cfg.local_crops)])
            local_cls = self.encoder(local_views)[:, 0]
            student_logits += list(self.head(local_cls).chunk(self.cfg.local_crops))
        temperature = teacher_temperature(self.cfg, self.progress)
        probs = teacher_probabilities(teacher_logits, self.center, temperature)
        loss = dino_cross_entropy(student_logits, list(probs.chunk(2)), self.cfg.student_temp)
        with torch.no_grad():
            self.center.copy_(updated_center(self.center, teacher_logits, self.cfg.center_momentum))
        return loss, {"teacher_entropy": mean_entropy(probs),
                      "kl_to_center": kl_to_center(probs),
                      "embed_std": embedding_std(student_global), "rankme": rankme(student_global)}

    def after_optimizer_step(self) -> None:
        momentum = cosine_schedule(self.cfg.momentum_start, 1.0, self.progress)
        update_momentum(self.encoder, self.teacher["encoder"], momentum)
        update_momentum(self.head, self.teacher["head"], momentum)
