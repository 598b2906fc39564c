"""Self-supervised pretraining methods, registered by name (``ssl.method`` in the config)."""

from __future__ import annotations

from shared_model.config import FedCMRConfig, SSLMethod
from shared_model.encoders import build_encoder
from shared_model.ssl.base import SSLModel


def build_ssl_model(cfg: FedCMRConfig) -> SSLModel:
    """The configured method around a freshly initialised encoder."""
    encoder = build_encoder(cfg.model.preset, drop_path_rate=cfg.model.drop_path_rate)
    if cfg.ssl.method == SSLMethod.mae:
        from shared_model.config import MAEDecoderKind
        from shared_model.ssl.mae import MAE, DenseMAE

        if cfg.ssl.mae.decoder == MAEDecoderKind.dense:
            return DenseMAE(encoder, cfg.ssl.mae, cfg.tasks.decoder_width)
        return MAE(encoder, cfg.ssl.mae)
    if cfg.ssl.method == SSLMethod.dino:
        from shared_model.ssl.dino import DINO

        return DINO(encoder, cfg.ssl.dino)
    raise ValueError(f"ssl.method={cfg.ssl.method.value} has no implementation")


def federated_keys(model: SSLModel, keep_head_local: bool = False) -> list[str]:
    """State-dict keys that travel between nodes and server (encoder, SSL head, ...), in order.

    With ``keep_head_local`` the SSL head (``head.*``) stays at each site.
    """
    prefixes = tuple(p for p in model.federated_prefixes()
                     if not (keep_head_local and p == "head."))
    return [k for k in model.state_dict() if k.startswith(prefixes)]
