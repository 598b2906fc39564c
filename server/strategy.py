"""The server's strategy: FedAvg on the legacy path, plus the FedCMR plan and bookkeeping.

It sends the resolved run config to every site with each fit instruction, records per-site and
aggregated metrics every round, and keeps the latest global weights as float32 (SecAgg+ hands
back a float64 aggregate; keeping that would double the model in memory and on the wire).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from client.app import PLAN_KEY, ROUND_KEY
from server.metrics import MetricsLog, RoundRecord, weighted_mean
from shared_model.config import FedCMRConfig, config_to_yaml

log = logging.getLogger(__name__)


def as_float32(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [a.astype(np.float32, copy=False) if a.dtype != np.float32 else a for a in arrays]


class PretrainStrategy(FedAvg):
    """FedAvg of encoder + SSL head updates, one record per round in ``metrics``."""

    def __init__(self, cfg: FedCMRConfig, initial: list[np.ndarray], metrics: MetricsLog) -> None:
        fed = cfg.federation
        super().__init__(
            fraction_fit=fed.fraction_fit,
            fraction_evaluate=0.0,
            min_fit_clients=fed.min_sites,
            min_evaluate_clients=fed.min_sites,
            min_available_clients=fed.min_sites,
            on_fit_config_fn=self.fit_config,
            initial_parameters=ndarrays_to_parameters(initial),
            fit_metrics_aggregation_fn=weighted_mean,
            accept_failures=True,
        )
        self.plan_yaml = config_to_yaml(cfg)
        self.metrics = metrics
        self.latest: list[np.ndarray] = initial
        self._round_started = time.perf_counter()

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        self._round_started = time.perf_counter()
        return {PLAN_KEY: self.plan_yaml, ROUND_KEY: server_round}

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        if len(results) < self.min_fit_clients:
            log.warning("round %d: %d replies (%d failures), fewer than min_sites=%d; "
                        "global model unchanged", server_round, len(results), len(failures),
                        self.min_fit_clients)
            self._record(server_round, results, failures, {}, "skipped")
            return None, {}
        parameters, aggregate = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, {}
        self.latest = as_float32(parameters_to_ndarrays(parameters))
        self._record(server_round, results, failures, aggregate, "aggregated")
        return ndarrays_to_parameters(self.latest), aggregate

    def _record(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                failures: list, aggregate: dict[str, Scalar], status: str) -> None:
        sites = {}
        for proxy, res in results:
            metrics = dict(res.metrics)
            name = f"site-{metrics['site_index']}" if "site_index" in metrics else f"node-{proxy.cid}"
            sites[name] = {"num_examples": res.num_examples, **metrics}
        self.metrics.add(RoundRecord(
            round=server_round, phase="pretrain", status=status,
            seconds=time.perf_counter() - self._round_started, sites=sites,
            aggregate=aggregate,
            excluded={f"failure-{i}": type(f).__name__ for i, f in enumerate(failures)},
        ))
