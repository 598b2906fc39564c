"""Health signals of self-supervised pretraining: is the representation alive, and useful?

- :func:`embedding_std`: spread of the embeddings around their mean, ~1/sqrt(D) when the
  variance is spread over all D dimensions, -> 0 at collapse. Measured on *centred* features:
  an MAE encoder's pooled tokens share a large common component (LayerNorm outputs averaged over
  patches point the same way), so the std of the raw normalised vectors is near zero (0.001 to
  0.005 measured) although the frames are well told apart.
- :func:`rankme`: effective rank of the (centred) embedding matrix (Garrido et al., ICML
  2023), ~1 at collapse, up to min(N - 1, D).
- :func:`patch_probe_dice`: a class-balanced k-nearest-neighbour probe on frozen patch tokens:
  how well do they tell the LV blood pool from the rest on frames held aside? A cheap, dense read of usefulness
  that never feeds back into training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shared_model.encoders import Encoder


def embedding_std(features: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of centred, L2-normalised embeddings."""
    x = features.detach().float().flatten(1)
    if x.shape[0] < 2:
        return math.nan
    centred = x - x.mean(dim=0, keepdim=True)
    scale = centred.norm(dim=1).mean()
    if scale <= 1e-6 * max(float(x.norm(dim=1).mean()), 1e-12):
        return 0.0  # every input gives the same embedding: collapsed
    return float(F.normalize(centred, dim=1).std(dim=0).mean())


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy of the normalised singular values) of the (N, D) embedding matrix, centred.

    Centred for the same reason as :func:`embedding_std`: the raw matrix of pooled MAE tokens
    has one singular value for the shared component that dwarfs the rest (RankMe ~1.1 measured
    for an encoder whose frames are well told apart).
    """
    x = features.detach().float().flatten(1)
    if x.shape[0] < 2:
        return math.nan
    singular = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    p = singular / singular.sum().clamp(min=eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def patch_tokens(encoder: Encoder, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(N, P, D) patch tokens of the encoder's last block (normed), whatever taps it has set."""
    taps = encoder.taps
    was_training = encoder.training
    encoder.taps = ()
    encoder.eval()
    try:
        prefix = int(encoder.num_prefix_tokens)
        out = torch.cat([encoder(images[i:i + batch])[:, prefix:] for i in range(0, len(images), batch)])
    finally:
        encoder.taps = taps
        encoder.train(was_training)
    return out


def patch_labels(masks: torch.Tensor, patch: int, value: int = 1) -> torch.Tensor:
    """(N, H, W) label maps -> (N, h*w) bool: does a patch lie mostly in structure ``value``?"""
    inside = (masks == value).float()[:, None]
    share = F.avg_pool2d(inside, patch)
    return (share > 0.5).flatten(1)


@torch.no_grad()
def patch_probe_dice(train_tokens: torch.Tensor, train_labels: torch.Tensor,
                     test_tokens: torch.Tensor, test_labels: torch.Tensor, k: int = 10) -> float:
    """Dice of a class-balanced cosine k-NN vote over patch tokens: (N, P, D) tokens, (N, P)
    bool labels.

    Each neighbour votes with the inverse of its class's share of the fitted patches, so the
    blood pool (~5 % of 8-px patches) is not outvoted by prevalence alone: a plain majority vote
    predicts almost no positives whatever the tokens carry.
    """
    keys = F.normalize(train_tokens.flatten(0, 1).float(), dim=1)
    positive = train_labels.flatten()
    share = float(positive.float().mean())
    if share in (0.0, 1.0):  # one class only: nothing to tell apart
        return float("nan")
    votes = torch.where(positive, 1.0 / share, -1.0 / (1.0 - share))
    queries = F.normalize(test_tokens.flatten(0, 1).float(), dim=1)
    predicted = []
    for chunk in queries.split(2048):
        nearest = (chunk @ keys.T).topk(min(k, len(keys)), dim=1).indices
        predicted.append(votes[nearest].sum(dim=1) > 0)
    pred = torch.cat(predicted)
    truth = test_labels.flatten()
    total = int(pred.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * float((pred & truth).sum()) / total
