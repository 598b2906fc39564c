"""Aggregation rules: Flower's strategies, built from the config, with checkpointable state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters
from flwr.server.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)

from shared_model.config import Aggregator, FedCMRConfig

MetricsFn = Callable[[list[tuple[int, dict]]], dict]


def build_aggregator(cfg: FedCMRConfig, initial: list[np.ndarray], metrics_fn: MetricsFn,
                     evaluate: bool) -> FedAvg:
    """The configured Flower strategy; it samples sites and combines their weights."""
    fed = cfg.federation
    assert fed.min_sites is not None
    common: dict[str, Any] = dict(
        fraction_fit=fed.fraction_fit, fraction_evaluate=1.0 if evaluate else 0.0,
        min_fit_clients=fed.min_sites, min_evaluate_clients=fed.min_sites,
        min_available_clients=fed.min_sites, initial_parameters=ndarrays_to_parameters(initial),
        accept_failures=True, fit_metrics_aggregation_fn=metrics_fn,
        evaluate_metrics_aggregation_fn=metrics_fn,
    )
    rule = fed.aggregator
    if rule == Aggregator.fedavg:
        return FedAvg(**common)
    if rule == Aggregator.fedprox:
        return FedProx(proximal_mu=fed.proximal_mu, **common)
    if rule == Aggregator.fedadam:
        return FedAdam(eta=fed.adam_lr, eta_l=cfg.ssl.lr, tau=1e-6, **common)
    if rule == Aggregator.fedavgm:
        return FedAvgM(server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum, **common)
    if rule == Aggregator.trimmed_mean:
        return FedTrimmedAvg(beta=fed.trim_fraction, **common)
    if rule == Aggregator.median:
        return FedMedian(**common)
    if rule == Aggregator.krum:
        return Krum(num_malicious_clients=fed.krum_byzantine, num_clients_to_keep=0, **common)
    raise ValueError(f"no aggregator for {rule}")


def optimizer_state(strategy: FedAvg) -> dict[str, list[np.ndarray]]:
    """What a server optimiser carries between rounds (empty for stateless rules)."""
    if isinstance(strategy, FedAdam):
        return {k: list(getattr(strategy, k)) for k in ("m_t", "v_t") if getattr(strategy, k)}
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector:
        return {"momentum": list(strategy.momentum_vector)}
    return {}


def restore_optimizer_state(strategy: FedAvg, state: dict[str, list[np.ndarray]],
                            current: list[np.ndarray]) -> None:
    """Put a checkpoint's optimiser state back; ``current`` are the global weights now."""
    if isinstance(strategy, FedAdam):
        strategy.current_weights = list(current)
        strategy.m_t = state.get("m_t")
        strategy.v_t = state.get("v_t")
    elif isinstance(strategy, FedAvgM):
        strategy.initial_parameters = ndarrays_to_parameters(current)
        strategy.momentum_vector = state.get("momentum")


def set_current(strategy: FedAvg, current: list[np.ndarray]) -> Parameters:
    """Tell a stateful rule what the global weights are after outside changes (DP noise)."""
    parameters = ndarrays_to_parameters(current)
    if isinstance(strategy, FedAdam):
        strategy.current_weights = list(current)
    elif isinstance(strategy, FedAvgM):
        strategy.initial_parameters = parameters
    return parameters
