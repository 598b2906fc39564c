"""The consortium's Flower ServerApp: federated self-supervised pretraining of the encoder.

Runs on Flower's legacy path (LegacyContext + DefaultWorkflow + a flwr.server.strategy), the
only one on which SecAgg+ works in flwr 1.42. At the end it writes the aggregated encoder as
safetensors (loadable by timm), the resolved config and per-round metrics into the run folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from server.metrics import MetricsLog
from server.strategy import PretrainStrategy
from shared_model.config import (
    ConfigError,
    FedCMRConfig,
    SecAggMode,
    load_config,
    save_resolved_config,
)
from shared_model.encoders import get_preset
from shared_model.ssl import build_ssl_model, federated_keys
from shared_model.weights import arrays_to_state_dict, save_safetensors, select_prefix, state_dict_to_arrays

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"


def config_from_run_config(run_config: dict[str, object]) -> FedCMRConfig:
    """The one place Flower's run_config is read (``flwr run`` path; see pyproject.toml)."""
    overrides = str(run_config.get("overrides", "")).split()
    if "out-dir" in run_config:
        overrides.append(f"output.dir={run_config['out-dir']}")
    return load_config(str(run_config.get("preset", "demo-cpu")), overrides)


def secagg_enabled(cfg: FedCMRConfig) -> bool:
    """SecAgg+ is on by default whenever a round needs at least 3 sites."""
    mode = cfg.federation.secagg.mode
    return mode == SecAggMode.on or (mode == SecAggMode.auto and (cfg.federation.min_sites or 0) >= 3)


@dataclass
class PretrainOutcome:
    run_dir: Path
    encoder_path: Path
    rounds: int


def initial_weights(cfg: FedCMRConfig) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The seeded initial SSL model (all sites start from exactly these weights)."""
    torch.manual_seed(cfg.seed)
    model = build_ssl_model(cfg)
    keys = federated_keys(model)
    state = model.state_dict()
    return keys, {k: state[k].detach().float() for k in keys}


def build_workflow(cfg: FedCMRConfig) -> DefaultWorkflow:
    if not secagg_enabled(cfg):
        return DefaultWorkflow()
    sa = cfg.federation.secagg
    return DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
        clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
        timeout=sa.timeout_s))


def run_pretraining(grid: Grid, context: Context, cfg: FedCMRConfig) -> PretrainOutcome:
    if cfg.federation.min_sites is None:
        raise ConfigError("key 'federation.min_sites': a deployment must say how many sites a "
                          "round waits for, e.g. federation.min_sites=3")
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir)
    keys, reference = initial_weights(cfg)
    strategy = PretrainStrategy(cfg, state_dict_to_arrays(reference, keys), MetricsLog(run_dir))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.federation.rounds,
                                                        round_timeout=cfg.federation.round_timeout_s),
                           strategy=strategy)
    log.info("pretraining: %d rounds, SecAgg+ %s", cfg.federation.rounds,
             "on" if secagg_enabled(cfg) else "off")
    build_workflow(cfg)(grid, legacy)
    final = arrays_to_state_dict(strategy.latest, keys, reference)
    encoder_path = save_encoder(run_dir / ENCODER_FILE, final, cfg)
    return PretrainOutcome(run_dir=run_dir, encoder_path=encoder_path, rounds=cfg.federation.rounds)


def save_encoder(path: Path, ssl_state: dict[str, torch.Tensor], cfg: FedCMRConfig) -> Path:
    """The bare ViT encoder as safetensors, with what timm needs to load it in the metadata."""
    encoder = select_prefix(ssl_state, "encoder.")
    bad = [k for k, v in encoder.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"aggregated encoder has non-finite values in {bad[:3]}")
    preset = get_preset(cfg.model.preset)
    return save_safetensors(path, encoder, metadata={
        "format": "pt", "fedcmr_preset": preset.name, "timm_name": preset.timm_name,
        "timm_kwargs": preset.timm_kwargs(), "ssl_method": cfg.ssl.method.value,
    })


def build_server_app(cfg: FedCMRConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one it reads Flower's run_config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        run_pretraining(grid, context, run_cfg)

    return app


app = build_server_app()
