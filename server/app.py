"""The consortium's Flower ServerApp: phases of federated rounds, then a release.

Phases, in order: ``pretrain`` (``federation.rounds`` rounds of the configured SSL method), then
for each task in ``tasks.names`` a ``finetune:<task>`` phase of ``federation.finetune_rounds``
rounds, each evaluated at every site on its held-out subjects. Each phase runs Flower's legacy
DefaultWorkflow (the only path on which SecAgg+ works in flwr 1.42) with a
:class:`server.strategy.PhaseStrategy`. After every round the server writes a checkpoint; a run
resumes from it with ``output.resume=true``. At the end it writes the release bundle.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from server.aggregators import build_aggregator, optimizer_state, restore_optimizer_state
from server.ledger import PrivacyLedger
from server.metrics import MetricsLog, RecordKind, RoundRecord, RoundStatus, weighted_mean
from server.progress import RunProgress
from server.release import write_release
from server.run_status import Outcome, RunStatus, write_outcome
from server.state import ServerState, load_state, save_state
from server.strategy import BudgetExceeded, PhaseInfo, PhaseStrategy, RunPaused
from server.workflows import (
    BoundedClientManager,
    DropoutSafeSecAggPlusWorkflow,
    Workflow,
    current_round,
    timed_evaluate_workflow,
    timed_fit_workflow,
)
from shared_model.config import (
    ConfigError,
    FedCMRConfig,
    load_config,
    save_resolved_config,
    secagg_enabled,
    ssl_head_stays_local,
    with_overrides,
)
from shared_model.masks import sha256_ctr_masks
from shared_model.phase_models import initial_ssl_model, initial_task_model, task_keys
from shared_model.bundle import load_bundle, start_from_decoder
from shared_model.ssl import federated_keys
from shared_model.ssl.mae import DenseMAE
from shared_model.tasks import get_task
from shared_model.weights import (
    arrays_to_state_dict,
    load_into,
    load_safetensors,
    select_prefix,
    state_dict_to_arrays,
)
from shared_model.wire import FINETUNE, PRETRAIN

log = logging.getLogger(__name__)


def config_from_run_config(run_config: dict[str, object]) -> FedCMRConfig:
    """The one place Flower's run_config is read (``flwr run`` path; see pyproject.toml)."""
    overrides = str(run_config.get("overrides", "")).split()
    if "out-dir" in run_config:
        overrides.append(f"output.dir={run_config['out-dir']}")
    return load_config(str(run_config.get("preset", "demo-cpu")), overrides)


@dataclass(frozen=True)
class PhaseSpec:
    """One phase: its kind, task, length and unique label; optional plan overrides (e.g. another
    seed or label budget) and an encoder to start from instead of the run's own foundation."""

    name: str  # PRETRAIN | FINETUNE
    task: str
    rounds: int
    label: str
    overrides: tuple[str, ...] = ()
    init_encoder: str = ""  # a safetensors file of encoder weights; "" = the run's foundation


SECAGG_WORKFLOW_MODULE = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"


def use_whole_seed_masks() -> None:
    """The server removes SecAgg+ masks made from the whole seed (``shared_model.masks``), as
    FedCMR's nodes make them, not from Flower's 32-bit fold of it."""
    flower: Any = importlib.import_module(SECAGG_WORKFLOW_MODULE)
    flower.pseudo_rand_gen = sha256_ctr_masks


use_whole_seed_masks()

def plan_phases(cfg: FedCMRConfig) -> list[PhaseSpec]:
    """The default plan: pretraining, then one fine-tuning phase per task in tasks.names."""
    phases = [PhaseSpec(PRETRAIN, "", cfg.federation.rounds, PRETRAIN)] if cfg.federation.rounds > 0 else []
    if cfg.federation.finetune_rounds > 0:
        phases += [PhaseSpec(FINETUNE, task, cfg.federation.finetune_rounds, f"{FINETUNE}:{task}")
                   for task in cfg.tasks.names]
    return phases


def run_federation(grid: Grid, context: Context, cfg: FedCMRConfig,
                   phases: list[PhaseSpec] | None = None, release: bool = True) -> Outcome:
    if cfg.federation.min_sites is None:
        raise ConfigError("key 'federation.min_sites': a deployment must say how many sites a "
                          "round waits for, e.g. federation.min_sites=3")
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(run_dir, cfg) if cfg.output.resume else ServerState()
    if cfg.federation.foundation and not state.foundation:
        start_from_foundation(state, cfg)
    save_resolved_config(cfg, run_dir)
    ledger = (PrivacyLedger.from_json(state.ledger_json) if state.ledger_json
              else PrivacyLedger(cfg.privacy.delta, cfg.privacy.accountant))
    metrics = MetricsLog(run_dir, resume=cfg.output.resume)
    metrics.truncate_after(state.global_round)
    phases = plan_phases(cfg) if phases is None else phases
    progress = RunProgress(sum(p.rounds for p in phases), state.global_round)
    log.info("federation: %d phases, %d rounds; SecAgg+ %s; privacy %s", len(phases),
             sum(p.rounds for p in phases), "on" if secagg_enabled(cfg) else "off",
             cfg.privacy.mode.value)
    try:
        for spec in phases:
            if spec.label not in state.phases_done:
                run_phase(grid, context, cfg, spec, state, ledger, metrics, progress)
        if idle := untrained_phases(phases, metrics.records):
            detail = (f"no round of {', '.join(idle)} aggregated an update (every site's reply "
                      "failed or was excluded: see metrics.json and the nodes' logs), so its model "
                      "is the untrained start; nothing released. Fix what the sites report and "
                      "start the run again")
            log.error("%s", detail)
            return write_outcome(Outcome(run_dir, RunStatus.failed, detail))
        if not release:
            return write_outcome(Outcome(run_dir, RunStatus.finished))
        bundle = write_release(run_dir, cfg, state, ledger, metrics.records)
        return write_outcome(Outcome(run_dir, RunStatus.released, str(bundle)))
    except RunPaused as exc:
        return write_outcome(Outcome(run_dir, RunStatus.paused, str(exc)))
    except BudgetExceeded as exc:
        log.error("%s", exc)
        return write_outcome(Outcome(run_dir, RunStatus.stopped, str(exc)))
    finally:
        progress.close()
        metrics.close()


def start_from_foundation(state: ServerState, cfg: FedCMRConfig) -> None:
    """The run's foundation is a released bundle (``federation.foundation``): its encoder, and
    its dense decoder, which fine-tuning's dense heads start from."""
    bundle = load_bundle(cfg.federation.foundation)
    preset = bundle.config.model.preset
    if preset != cfg.model.preset:
        raise ConfigError(f"key 'federation.foundation': {bundle.root} holds a {preset} encoder, "
                          f"the run's model.preset is {cfg.model.preset}; set model.preset={preset}")
    state.foundation = dict(bundle.encoder)
    state.decoder = dict(bundle.decoder)


def untrained_phases(phases: list[PhaseSpec], records: list[RoundRecord]) -> list[str]:
    """The phases (labels) that had rounds but aggregated none of them."""
    trained = {r.phase for r in records if r.kind == RecordKind.fit and r.status == RoundStatus.aggregated}
    return [spec.label for spec in phases if spec.rounds > 0 and spec.label not in trained]


def phase_model(cfg: FedCMRConfig, spec: PhaseSpec, state: ServerState) -> tuple[torch.nn.Module, list[str]]:
    """The model a phase trains, at its starting point, and its federated keys."""
    if spec.name == PRETRAIN:
        ssl_model = initial_ssl_model(cfg)
        return ssl_model, federated_keys(ssl_model, ssl_head_stays_local(cfg))
    model = initial_task_model(cfg, get_task(spec.task))
    if spec.init_encoder:
        load_into(model.encoder, load_safetensors(spec.init_encoder)[0], spec.init_encoder)
    elif state.foundation:  # start from the federated foundation encoder
        model.encoder.load_state_dict(state.foundation)
        if state.decoder:
            start_from_decoder(model, state.decoder)
    return model, task_keys(model, cfg)


def build_workflow(cfg: FedCMRConfig, strategy: PhaseStrategy | None = None) -> DefaultWorkflow:
    timeout = cfg.federation.round_timeout_s
    fit: Workflow
    if secagg_enabled(cfg):
        sa = cfg.federation.secagg
        fit = DropoutSafeSecAggPlusWorkflow(num_shares=sa.num_shares,
                                            reconstruction_threshold=sa.reconstruction_threshold,
                                            clipping_range=sa.clipping_range,
                                            quantization_range=sa.quantization_range,
                                            max_weight=float(sa.max_weight), timeout=sa.timeout_s)
        if strategy is not None:
            fit = counting_halts(fit, strategy)
    else:
        fit = timed_fit_workflow(timeout)
    return DefaultWorkflow(fit_workflow=fit, evaluate_workflow=timed_evaluate_workflow(timeout))


def counting_halts(fit: Workflow, strategy: PhaseStrategy) -> Workflow:
    """SecAgg+'s fit step, after which a round the strategy never saw (the workflow halted it
    before aggregation) is recorded as halted. A round after the phase stopped (paused, out of
    budget) sent no instructions and is not a round: nothing is recorded."""
    def run(grid: Grid, context: Context) -> None:
        server_round = current_round(context)
        stopped = strategy.halt is not None
        fit(grid, context)
        if not stopped and strategy.last_recorded != server_round:
            strategy.record_halted(server_round)

    return run


def run_phase(grid: Grid, context: Context, run_cfg: FedCMRConfig, spec: PhaseSpec, state: ServerState,
              ledger: PrivacyLedger, metrics: MetricsLog, progress: RunProgress) -> None:
    cfg = with_overrides(run_cfg, spec.overrides, f"phase {spec.label}") if spec.overrides else run_cfg
    phase = PhaseInfo(spec.name, spec.task, spec.rounds, spec.label,
                      state.phase_round if state.phase == spec.label else 0, state.global_round,
                      state.run_token)
    model, keys = phase_model(cfg, spec, state)
    reference = {k: v.detach().float() for k, v in model.state_dict().items() if k in keys}
    resuming = phase.done_before > 0
    initial = state.phase_arrays if resuming else state_dict_to_arrays(reference, keys)
    inner = build_aggregator(cfg, initial, weighted_mean, evaluate=bool(phase.task))
    if resuming:
        restore_optimizer_state(inner, state.optimizer, initial)

    def on_round(global_round: int, arrays: list[np.ndarray]) -> RunPaused | None:
        state.global_round, state.phase = global_round, phase.label
        state.phase_round = global_round - phase.global_before + phase.done_before
        state.phase_keys, state.phase_arrays = keys, arrays
        state.optimizer, state.ledger_json = optimizer_state(inner), ledger.to_json()
        save_state(Path(cfg.output.dir), state, run_cfg)
        progress.advance(phase.label, state.phase_round, phase.rounds, metrics.records[-1])
        if cfg.output.stop_after_round is not None and global_round >= cfg.output.stop_after_round:
            return RunPaused(f"paused after round {global_round}; continue with output.resume=true")
        return None

    strategy = PhaseStrategy(cfg, phase, inner, initial, ledger, on_round, metrics.add,
                             evaluate_each_round=True)
    remaining = phase.rounds - phase.done_before
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=remaining), strategy=strategy,
                           client_manager=BoundedClientManager(cfg.federation.site_wait_s))
    if remaining > 0:
        build_workflow(cfg, strategy)(grid, legacy)
    if strategy.halt is not None:
        raise strategy.halt
    final = arrays_to_state_dict(strategy.current, keys, reference)
    model.load_state_dict({**model.state_dict(), **final})
    _finish_phase(phase, model, state, keys)
    save_state(Path(cfg.output.dir), state, run_cfg)


def _finish_phase(phase: PhaseInfo, model: torch.nn.Module, state: ServerState,
                  federated: list[str]) -> None:
    weights = {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items()}
    if phase.name == PRETRAIN:
        state.foundation = select_prefix(weights, "encoder.")
        # a dense MAE's decoder is what dense task heads start from, when it was aggregated; a
        # decoder that stayed at the sites (federation.ssl_head) is not the server's to
        # release: its copy here is the untrained initial one
        if isinstance(model, DenseMAE) and any(k.startswith("head.") for k in federated):
            state.decoder = select_prefix(weights, "head.")
    else:
        key = phase.task if phase.label == f"{FINETUNE}:{phase.task}" else phase.label
        state.tasks[key] = {k: v for k, v in weights.items() if k.startswith(("encoder.", "head."))}
    state.phases_done.append(phase.label)
    state.phase, state.phase_round = "", 0


def build_server_app(cfg: FedCMRConfig | None = None, phases: list[PhaseSpec] | None = None,
                     release: bool = True) -> ServerApp:
    """A ServerApp for ``cfg`` (and an explicit phase plan); without ``cfg`` it reads Flower's
    run_config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        run_federation(grid, context, run_cfg, phases, release)

    return app


app = build_server_app()
