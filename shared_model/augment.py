"""Batch augmentations that suit cardiac MR, each drawing from an explicit torch.Generator.

Images are (B, 1, H, W) float tensors scaled so that the 1st..99th intensity percentiles map to
0..1 (the store's normalisation). Random parameters are drawn on the CPU from the generator and
moved to the images' device, so a seed gives the same views on any device.

Pretraining views use no left-right flips (the encoder should tell the left-sided anatomy from
its mirror image); segmentation fine-tuning does flip, since a short-axis stack may be viewed
from the base or from the apex (see :data:`SEGMENTATION_GEOMETRY`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewSpec:
    """One kind of view: output size (px), crop scale range (area fraction), rotation (deg)."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    max_rotation_deg: float = 15.0
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.1
    noise_std: float = 0.03
    blur_prob: float = 0.0


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def random_resized_crop(images: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """Crop a random square covering ``spec.scale`` of the area, rotate, resample to size."""
    b = images.shape[0]
    side = _uniform(gen, b, *spec.scale).sqrt()  # crop side as a fraction of the image side
    angle = _uniform(gen, b, -spec.max_rotation_deg, spec.max_rotation_deg) * math.pi / 180
    max_shift = (1 - side).clamp(min=0)
    tx = _uniform(gen, b, -1, 1) * max_shift
    ty = _uniform(gen, b, -1, 1) * max_shift
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], spec.size, spec.size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_intensity(images: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """Gamma, contrast and brightness changes as between scanners, plus a little noise."""
    b = images.shape[0]
    shape = (b, 1, 1, 1)
    gamma = _uniform(gen, b, *spec.gamma).view(shape).to(images)
    contrast = _uniform(gen, b, *spec.contrast).view(shape).to(images)
    brightness = _uniform(gen, b, -spec.brightness, spec.brightness).view(shape).to(images)
    out = images.clamp(min=0).pow(gamma)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    if spec.noise_std > 0:
        noise = torch.randn(images.shape, generator=gen).to(images)
        out = out + spec.noise_std * noise
    if spec.blur_prob > 0:
        blur = (torch.rand(b, generator=gen) < spec.blur_prob).view(shape).to(images)
        out = blur * gaussian_blur(out, sigma=1.0) + (1 - blur) * out
    return out


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    kx = kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), ky, groups=c)


def make_view(images: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    return random_intensity(random_resized_crop(images, spec, gen), spec, gen)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, 1, H, W) to (B, 1, size, size) with antialiasing when shrinking."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


@dataclass(frozen=True)
class GeometrySpec:
    """Random in-plane geometry for fine-tuning: rotation (deg), zoom range (log-uniform),
    shift (fraction of the half-width) and mirror flips."""

    max_rotation_deg: float = 12.0
    scale: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.06
    flips: bool = False


# Segmentation of the heart in any in-plane orientation, at any size: a short-axis slice seen
# from base or apex is mirrored, patients' hearts differ by ~2x in diameter (a hypertrophied LV
# cavity vs a dilated one), and exports are not centred on the heart. Measured on real patients
# of other pathology groups than the labelled one: +4 to +44 Dice points over mild augmentation.
SEGMENTATION_GEOMETRY = GeometrySpec(max_rotation_deg=180.0, scale=(0.7, 1.4), max_shift=0.1,
                                     flips=True)
# Landmarks have sides (anterior/inferior insertion, hinge 1/2): rotations and zoom, no mirror.
LANDMARK_GEOMETRY = GeometrySpec(max_rotation_deg=180.0, scale=(0.8, 1.25), max_shift=0.08)
CLASSIFICATION_GEOMETRY = GeometrySpec()


def random_affine_theta(batch: int, gen: torch.Generator, max_rotation_deg: float = 12.0,
                        scale: tuple[float, float] = (0.9, 1.1), max_shift: float = 0.06,
                        flips: bool = False) -> torch.Tensor:
    """(B, 2, 3) affine matrices in normalised coordinates: output point -> input point."""
    angle = _uniform(gen, batch, -max_rotation_deg, max_rotation_deg) * math.pi / 180
    zoom = 1.0 / torch.exp(_uniform(gen, batch, math.log(scale[0]), math.log(scale[1])))
    tx = _uniform(gen, batch, -max_shift, max_shift)
    ty = _uniform(gen, batch, -max_shift, max_shift)
    mirror = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0) if flips \
        else torch.ones(batch)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    return torch.stack([torch.stack([cos * mirror, -sin, tx], 1),
                        torch.stack([sin * mirror, cos, ty], 1)], 1)


def random_geometry(batch: int, spec: GeometrySpec, gen: torch.Generator) -> torch.Tensor:
    return random_affine_theta(batch, gen, spec.max_rotation_deg, spec.scale, spec.max_shift,
                               spec.flips)


def apply_affine(images: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample (B, C, H, W) with ``theta``; ``mode="nearest"`` for label maps."""
    theta = theta.to(images.device, torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.to(images.dtype)


def affine_points(coords: torch.Tensor, theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Move (B, L, 2) (row, col) pixel points the way :func:`apply_affine` moves the image."""
    theta = theta.to(coords.device, torch.float32)
    x = (2 * coords[..., 1] + 1) / width - 1  # pixel centre -> normalised, align_corners=False
    y = (2 * coords[..., 0] + 1) / height - 1
    a, t = theta[:, :, :2], theta[:, :, 2]
    p_in = torch.stack([x, y], dim=-1) - t[:, None, :]
    p_out = torch.linalg.solve(a[:, None].expand(-1, coords.shape[1], -1, -1), p_in[..., None])[..., 0]
    col = ((p_out[..., 0] + 1) * width - 1) / 2
    row = ((p_out[..., 1] + 1) * height - 1) / 2
    return torch.stack([row, col], dim=-1)
