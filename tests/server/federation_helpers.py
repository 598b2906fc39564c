"""Small simulated federations for server tests: stores, config, and a fault-injecting mod."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.node_settings import simulated_site_store
from server.run_status import Outcome
from shared_model.config import FedCMRConfig, load_config
from sim.runner import run_federation
from sim.sites import site_spec, write_site_frames

TINY = ["ssl.local_steps=1", "ssl.batch_size=8", "ssl.mae.decoder_depth=1", "ssl.mae.decoder_dim=32",
        "device=cpu", "federation.round_timeout_s=300", "federation.secagg.timeout_s=300",
        "federation.finetune_rounds=0"]


def make_sites(root: Path, sites: int) -> Path:
    for index in range(sites):
        write_site_frames(simulated_site_store(root, index), site_spec(index, 1.5, 128), 16, seed=0)
    return root


def federate(out: Path, sites_root: Path, sites: int, overrides: list[str],
             extra_mods: list | None = None) -> tuple[FedCMRConfig, Outcome]:
    cfg = load_config("demo-cpu", [*TINY, f"sim.sites={sites}", f"federation.min_sites={sites}",
                                   f"output.dir={out}", *overrides])
    return cfg, run_federation(cfg, sites_root, extra_mods)


Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def corrupt_reply(site: int, round_: int, change: Callable[[list[np.ndarray]], list[np.ndarray]]) -> Mod:
    """A mod that alters the weights one site sends in one round (a faulty or hostile node)."""
    def mod(msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if (msg.metadata.message_type == MessageType.TRAIN and not reply.has_error()
                and int(context.node_config["partition-id"]) == site
                and int(compat.recorddict_to_fitins(msg.content, True).config.get("round", -1)) == round_):
            res = compat.recorddict_to_fitres(reply.content, keep_input=True)
            res.parameters = ndarrays_to_parameters(change(parameters_to_ndarrays(res.parameters)))
            reply.content = compat.fitres_to_recorddict(res, keep_input=True)
        return reply
    return mod


def drop_during_masking(site: int, round_: int | None = None) -> Mod:
    """A mod that makes one site vanish after key sharing, when it should upload masked weights
    (in every round, or in global round ``round_`` only)."""
    return drop_at_stage(site, "collect_masked_vectors", round_)


def drop_at_stage(site: int, stage: str, round_: int | None = None) -> Mod:
    """A mod that makes one site vanish at a SecAgg+ stage (setup, share_keys,
    collect_masked_vectors, unmask), in every round or in global round ``round_`` only."""
    def mod(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (configs is not None and configs.get("stage") == stage
                and int(context.node_config["partition-id"]) == site
                and (round_ is None
                     or int(compat.recorddict_to_fitins(msg.content, True).config.get("round", -1)) == round_)):
            raise ConnectionError(f"site went offline at {stage}")
        return call_next(msg, context)
    return mod


def record_stages(site: int, path: Path) -> Mod:
    """A mod that appends every SecAgg+ stage one site is asked for to ``path``, a line each."""
    def mod(msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and int(context.node_config["partition-id"]) == site:
            with path.open("a") as handle:
                handle.write(f"{configs.get('stage')}\n")
        return call_next(msg, context)
    return mod


def record_sent(path: Path) -> Mod:
    """A mod that appends the raw bytes of everything each reply carries to ``path`` (every
    array's buffer, every config and metric value), as the node sends it (after masking)."""
    def mod(msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if not reply.has_error():
            with path.open("ab") as handle:
                for arrays in reply.content.array_records.values():
                    for array in arrays.values():
                        handle.write(array.data)
                for records in (*reply.content.config_records.values(), *reply.content.metric_records.values()):
                    for key, value in records.items():
                        for item in value if isinstance(value, list) else [value]:
                            handle.write(key.encode() + (item if isinstance(item, bytes) else str(item).encode()))
        return reply
    return mod


def fail_plain_fit(site: int) -> Mod:
    """A mod that makes one site fail every plain (non-SecAgg+) training round."""
    def mod(msg: Message, context: Context, call_next):
        if (msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS not in msg.content.config_records
                and int(context.node_config["partition-id"]) == site):
            raise ConnectionError("site went offline")
        return call_next(msg, context)
    return mod
