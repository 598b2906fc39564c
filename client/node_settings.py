"""What only a node decides — its store, device, index, CPU threads and policy — and where a
simulated site keeps its store.

A deployed node reads its settings from Flower's ``node_config``, never from the server. A
simulated site (``fedcmr-sim``, ``flwr run`` with ``sim-root``, the benchmarks) is an ordinary
node whose store lives at ``<sites root>/site-<i>/store``; :func:`simulated_node_settings` is the
one place that layout and those settings are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared_model.errors import UserError

if TYPE_CHECKING:
    from flwr.app import Context


class NodeConfigError(UserError, ValueError):
    """The node's own settings are missing or wrong."""


@dataclass(frozen=True)
class NodePolicy:
    """What a node accepts from any server (``node_config`` keys in brackets)."""

    min_secagg_threshold: int = 2  # [min-secagg-threshold]
    min_secagg_shares: int = 2  # [min-secagg-shares]
    require_secagg: bool = False  # [require-secagg]
    # [min-noise-multiplier] > 0: this node trains only with DP-SGD noise it adds itself
    # (privacy.mode=sample) of at least this multiplier; any other plan is refused
    min_noise_multiplier: float = 0.0
    # [max-epsilon] > 0: the node's own budget over every DP round it trains, across runs and
    # restarts (client.node_privacy), at [privacy-delta]
    max_epsilon: float = 0.0
    delta: float = 1.0e-5
    # [max-message-mb] > 0: the largest instruction this node processes and the largest reply it
    # sends, in MB (arrays and config bytes); 0: Flower's own transport limit only
    max_message_mb: float = 0.0


class NodePolicyError(UserError, PermissionError):
    """The server asked for something this node's policy does not allow."""


def check_privacy_plan(mode: str, noise_multiplier: float, policy: NodePolicy) -> None:
    """Refuse a plan whose DP noise is below what this node requires (``mode``: the plan's
    privacy.mode)."""
    if policy.min_noise_multiplier <= 0:
        return
    if mode != "sample":
        raise NodePolicyError(
            f"this node trains only with DP-SGD noise of at least {policy.min_noise_multiplier:g} "
            f"(min-noise-multiplier); the plan's privacy.mode is '{mode}'")
    if noise_multiplier < policy.min_noise_multiplier:
        raise NodePolicyError(
            f"the plan's noise multiplier {noise_multiplier:g} is below this node's minimum "
            f"{policy.min_noise_multiplier:g} (min-noise-multiplier)")


@dataclass(frozen=True)
class NodeSettings:
    """What only the node decides: its store, its device, its index, its policy."""

    store: Path
    device: str = "auto"
    site_index: int = 0
    policy: NodePolicy = NodePolicy()
    threads: int = 0  # CPU threads for torch (0: torch's default, all cores)
    state_dir: Path | None = None  # [state-dir] the node's own records; None: <store>/node-state

    @property
    def node_state(self) -> Path:
        """Where the node keeps its own records (the audit log)."""
        return self.state_dir if self.state_dir is not None else self.store / "node-state"


def simulated_site_name(index: int) -> str:
    return f"site-{index}"


def simulated_site_store(sites_root: Path, index: int) -> Path:
    """The store of simulated site ``index`` under the folder of all sites."""
    return sites_root / simulated_site_name(index) / "store"


def simulated_node_settings(sites_root: Path, index: int, device: str = "auto", threads: int = 1,
                            policy: NodePolicy = NodePolicy()) -> NodeSettings:
    """A simulated site's settings: its store under ``sites_root``, one CPU thread by default."""
    return NodeSettings(store=simulated_site_store(sites_root, index), device=device,
                        site_index=index, policy=policy, threads=threads)


def _number_setting(node: Mapping[str, object], key: str, default: float, kind: type) -> float:
    """``node[key]`` as ``kind`` (int or float), or an error naming the key."""
    value = node.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node_config '{key}' must be {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r}") from None


def _int_setting(node: Mapping[str, object], key: str, default: int) -> int:
    return int(_number_setting(node, key, default, int))


def _float_setting(node: Mapping[str, object], key: str, default: float) -> float:
    return _number_setting(node, key, default, float)


def _policy(node: Mapping[str, object]) -> NodePolicy:
    return NodePolicy(min_secagg_threshold=_int_setting(node, "min-secagg-threshold", 2),
                      min_secagg_shares=_int_setting(node, "min-secagg-shares", 2),
                      require_secagg=str(node.get("require-secagg", "false")).lower() in ("1", "true"),
                      min_noise_multiplier=_float_setting(node, "min-noise-multiplier", 0.0),
                      max_epsilon=_float_setting(node, "max-epsilon", 0.0),
                      delta=_float_setting(node, "privacy-delta", 1.0e-5),
                      max_message_mb=_float_setting(node, "max-message-mb", 0.0))


def node_settings_from_context(context: Context) -> NodeSettings:
    """Read the node's settings from Flower's ``node_config`` (or the simulation's run_config).

    Deployment: ``flower-supernode --node-config "store='/data/fedcmr-store' device='cuda'"``.
    Simulation under ``flwr run``: the store of partition ``i`` is ``<sim-root>/site-<i>/store``.
    """
    node = dict(context.node_config)
    if "store" in node:
        return NodeSettings(store=Path(str(node["store"])), device=str(node.get("device", "auto")),
                            site_index=_int_setting(node, "site-index", 0), policy=_policy(node),
                            threads=_int_setting(node, "threads", 0),
                            state_dir=Path(str(node["state-dir"])) if "state-dir" in node else None)
    if "partition-id" in node and "sim-root" in context.run_config:
        return simulated_node_settings(Path(str(context.run_config["sim-root"])),
                                       _int_setting(node, "partition-id", 0), policy=_policy(node))
    raise NodeConfigError("node_config has no 'store'; start the SuperNode with "
                          "--node-config \"store='/path/to/fedcmr-store'\"")
