"""The hospital node's Flower ClientApp.

It runs on Flower's legacy path (``client_fn`` + NumPyClient) because SecAgg+ needs it in
flwr 1.42. What to train comes from the server, as the resolved run config in every fit
instruction (the *plan*); where the node's data lives and which device it uses are the node's
own settings (Flower ``node_config``), never the server's.

Only allow-listed scalar metrics leave the node (see :data:`ALLOWED_METRICS`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.store import LocalStore
from shared_model.config import FedCMRConfig, config_from_yaml
from shared_model.encoders import get_preset
from shared_model.ssl import build_ssl_model, federated_keys
from shared_model.train import (
    Span,
    make_generator,
    make_optimizer,
    pretrain_local,
    resolve_device,
)
from shared_model.weights import arrays_to_state_dict, load_into, state_dict_to_arrays

log = logging.getLogger(__name__)

PLAN_KEY = "plan"  # fit-config entry holding the resolved run config as YAML
ROUND_KEY = "round"

# The only metrics a node reports: numbers about training, never about patients or headers.
ALLOWED_METRICS = frozenset({
    "site_index", "num_images", "steps", "images_seen", "seconds",
    "loss_first", "loss_last", "loss_mean", "embed_std",
})


class NodeConfigError(ValueError):
    """The node's own settings are missing or wrong."""


@dataclass(frozen=True)
class NodeSettings:
    """What only the node decides: its store, its device, its index in a simulation."""

    store: Path
    device: str = "auto"
    site_index: int = 0


def node_settings_from_context(context: Context) -> NodeSettings:
    """Read the node's settings from Flower's ``node_config`` (or the simulation's run_config).

    Deployment: ``flower-supernode --node-config "store='/data/fedcmr-store' device='cuda'"``.
    Simulation under ``flwr run``: the store of partition ``i`` is ``<sim-root>/site-<i>/store``.
    """
    node = context.node_config
    if "store" in node:
        return NodeSettings(store=Path(str(node["store"])), device=str(node.get("device", "auto")),
                            site_index=int(node.get("site-index", 0)))
    if "partition-id" in node and "sim-root" in context.run_config:
        index = int(node["partition-id"])
        return NodeSettings(store=Path(str(context.run_config["sim-root"])) / f"site-{index}" / "store",
                            site_index=index)
    raise NodeConfigError("node_config has no 'store'; start the SuperNode with "
                          "--node-config \"store='/path/to/fedcmr-store'\"")


def outgoing_metrics(values: dict[str, object]) -> dict[str, float | int]:
    """Keep allow-listed numeric metrics only; anything else never leaves the node."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if key not in ALLOWED_METRICS or isinstance(value, bool):
            continue
        if isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)) and np.isfinite(value):
            out[key] = float(value)
    return out


def plan_from_fit_config(config: dict[str, object]) -> FedCMRConfig:
    text = config.get(PLAN_KEY)
    if not isinstance(text, str):
        raise ValueError(f"fit instruction carries no '{PLAN_KEY}'; is the server a FedCMR server?")
    return config_from_yaml(text, source="server plan")


class PretrainClient(NumPyClient):
    """One round of local self-supervised pretraining on the node's store."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings

    def get_parameters(self, config: dict[str, object]) -> list[np.ndarray]:
        raise RuntimeError("FedCMR servers send initial weights; nodes never supply them")

    def fit(self, parameters: list[np.ndarray], config: dict[str, object]
            ) -> tuple[list[np.ndarray], int, dict[str, float | int]]:
        plan = plan_from_fit_config(config)
        server_round = int(config.get(ROUND_KEY, 0))
        model = build_ssl_model(plan)
        keys = federated_keys(model)
        load_into(model, arrays_to_state_dict(parameters, keys, model.state_dict()),
                  source="global weights")
        device = resolve_device(self.settings.device)
        model.to(device)
        images = LocalStore.open(self.settings.store).unlabeled_frames(
            get_preset(plan.model.preset).image_size)
        gen = make_generator(plan.seed, "site", self.settings.site_index, "round", server_round)
        optimizer = make_optimizer(model, plan.ssl.lr, plan.ssl.weight_decay)
        rounds = plan.federation.rounds
        span = Span((server_round - 1) / rounds, server_round / rounds)
        result = pretrain_local(model, images, steps=plan.ssl.local_steps,
                                batch_size=plan.ssl.batch_size, optimizer=optimizer, gen=gen,
                                device=device, base_lr=plan.ssl.lr, span=span)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
        metrics = {**asdict(result), **result.stats, "num_images": images.shape[0],
                   "site_index": self.settings.site_index}
        return state_dict_to_arrays(state, keys), int(images.shape[0]), outgoing_metrics(metrics)


def secure_aggregation_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201
    """Hand SecAgg+ rounds to Flower's ``secaggplus_mod``; plain rounds pass straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(settings_fn=node_settings_from_context) -> ClientApp:  # noqa: ANN001
    """A ClientApp whose nodes find their settings with ``settings_fn(context)``."""

    def client_fn(context: Context) -> Client:
        return PretrainClient(settings_fn(context)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])


app = build_client_app()
