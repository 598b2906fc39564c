"""One phase of the federation as a Flower strategy: plan out, validation, DP, bookkeeping in.

``PhaseStrategy`` wraps the configured aggregation rule (a Flower strategy, see
server.aggregators). Around it, per round:

- ``configure_fit``: refuse to start a round that would exceed the privacy budget; send every
  site the plan, the phase, the task, the global round and the run's schedule position (and the
  update clipping norm under user-level DP; the update scale and norm bound under SecAgg+).
- ``aggregate_fit``: without SecAgg+, validate each reply (server.validation) and drop bad ones;
  under SecAgg+, decode the unmasked mean update onto the global weights (shared_model.wire)
  and check it (finite, within the norm bound; else the round keeps the global model);
  aggregate when at least ``min_replies`` remain (else keep the global model); add Gaussian noise
  under user-level DP; cast back to float32 (SecAgg+ returns float64); record the ledger, the
  metrics and a checkpoint.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from server.aggregators import set_current
from server.ledger import LedgerEntry, PrivacyLedger
from server.metrics import RecordKind, RoundRecord, RoundStatus
from server.validation import (
    UpdateBounds,
    capped_examples,
    norm_outliers,
    size_limit_bytes,
    size_problem,
    update_norm,
    update_problem,
)
from shared_model.config import FedCMRConfig, PrivacyMode, config_to_yaml, secagg_enabled
from shared_model.wire import (
    PHASE_KEY,
    PLAN_KEY,
    ROUND_KEY,
    RUN_KEY,
    SPAN_END_KEY,
    SPAN_START_KEY,
    TASK_KEY,
    UPDATE_NORM_KEY,
    UPDATE_SCALE_KEY,
    decode_update,
    outgoing_metrics,
    update_scale,
)

log = logging.getLogger(__name__)

ALL_SITES = "all-sites"  # ledger key of the user-level history every site shares


class BudgetExceeded(RuntimeError):
    """The next round (or the release) would take a site past the privacy budget."""


class RunPaused(RuntimeError):
    """The run stopped after ``output.stop_after_round``; the checkpoint is written."""


class TooFewSites(RunPaused):
    """Fewer than ``federation.min_sites`` nodes were connected within ``site_wait_s``: the
    round is recorded as halted, the model stays, and the run pauses (resumable)."""


@dataclass(frozen=True)
class PhaseInfo:
    """Where a phase sits in the run: its name, task, length, and what came before it."""

    name: str  # "pretrain" or "finetune"
    task: str  # "" for pretraining
    rounds: int  # rounds in this phase
    label: str  # unique name of the phase in the run
    done_before: int  # rounds of this phase completed before this run of it (resume)
    global_before: int  # global rounds completed before this run of the phase
    run_token: str = ""  # the run's token (server.state.ServerState.run_token)


def site_name(proxy: ClientProxy, metrics: dict[str, Scalar]) -> str:
    """``site-<i>`` from the allow-listed ``site_index`` metric, else the Flower node id."""
    return f"site-{int(metrics['site_index'])}" if "site_index" in metrics else f"node-{proxy.node_id}"


class PhaseStrategy(Strategy):
    """See the module docstring.

    ``on_round(global round, global arrays)`` runs after every round (checkpointing); it returns
    a :class:`RunPaused` to stop the phase. A stopped phase (paused, or out of privacy budget)
    keeps the workflow running but sends no more instructions; ``halt`` then says why, and the
    caller raises it once Flower's workflow has returned cleanly.
    """

    def __init__(self, cfg: FedCMRConfig, phase: PhaseInfo, inner: FedAvg, initial: list[np.ndarray],
                 ledger: PrivacyLedger, on_round: Callable[[int, list[np.ndarray]], RunPaused | None],
                 on_record: Callable[[RoundRecord], None], evaluate_each_round: bool) -> None:
        self.cfg = cfg
        self.phase = phase
        self.inner = inner
        self.current = initial
        self.ledger = ledger
        self.on_round = on_round
        self.on_record = on_record
        self.evaluate_each_round = evaluate_each_round
        self.secure = secagg_enabled(cfg)
        self.plan_yaml = config_to_yaml(cfg)
        fed = cfg.federation
        self.bounds = UpdateBounds(fed.max_update_norm, fed.min_examples, fed.max_examples,
                                   fed.max_update_norm_ratio, fed.max_examples_ratio)
        sa = cfg.federation.secagg
        self.update_scale = update_scale(sa.max_weight_change, sa.clipping_range)
        self.noise_rng = np.random.default_rng(secrets.randbits(128))  # never predictable
        self.halt: RuntimeError | None = None
        self.last_recorded: int | None = None  # the last fit round recorded (any status)
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ round numbering

    def _phase_round(self, server_round: int) -> int:
        return self.phase.done_before + server_round

    def _global_round(self, server_round: int) -> int:
        return self.phase.global_before + server_round

    # ------------------------------------------------------------------ Strategy API

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.current)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        if self.halt is None:
            self.halt = self._budget_problem(server_round)
        if self.halt is not None:
            return []
        self._started = time.perf_counter()
        instructions = self.inner.configure_fit(self._phase_round(server_round), parameters, client_manager)
        if not instructions:  # the client manager's wait for min_sites ran out
            self._too_few_sites(server_round, client_manager)
            return []
        extra = self._round_config(server_round)
        if self.cfg.privacy.mode == PrivacyMode.user:
            extra[KEY_CLIPPING_NORM] = float(self.cfg.privacy.update_clip_norm)
        if self.secure:
            extra[UPDATE_SCALE_KEY] = self.update_scale
            extra[UPDATE_NORM_KEY] = float(self.cfg.federation.max_update_norm)
        for _, ins in instructions:
            ins.config.update(extra)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        _keep_allowed_metrics(results)
        excluded = {f"failure-{i}": _describe(f) for i, f in enumerate(failures)}
        valid = self._decoded(results, excluded) if self.secure else self._validated(results, excluded)
        if self.cfg.privacy.mode == PrivacyMode.user:
            for _, res in valid:
                res.num_examples = 1  # uniform weights: the noise is calibrated to them
        needed = max(self.cfg.federation.min_replies,
                     self.cfg.federation.secagg.reconstruction_threshold if self.secure else 0)
        if len(valid) < needed:
            log.warning("round %d: %d valid replies, fewer than %d; global model unchanged",
                        self._global_round(server_round), len(valid), needed)
            return self._skip(server_round, valid, excluded)
        params, aggregate = self.inner.aggregate_fit(self._phase_round(server_round), valid, [])
        if params is None:
            return self._skip(server_round, valid, excluded)
        arrays = [a.astype(np.float32, copy=False) for a in parameters_to_ndarrays(params)]
        if self.cfg.privacy.mode == PrivacyMode.user:
            arrays = self._add_noise(arrays, len(valid))
            set_current(self.inner, arrays)
        self._account(server_round, valid)
        self.current = arrays
        self._record(server_round, valid, excluded, dict(aggregate), RoundStatus.aggregated)
        self.halt = self.on_round(self._global_round(server_round), arrays)
        return ndarrays_to_parameters(arrays), aggregate

    def record_halted(self, server_round: int) -> None:
        """A SecAgg+ round that ended without an aggregate (Flower's workflow halted it): it is
        counted, checkpointed and shown like any other round; the global model stays."""
        log.warning("round %d: secure aggregation halted; global model unchanged",
                    self._global_round(server_round))
        self._record(server_round, [], {"secagg": "halted: too few sites finished the round"}, {},
                     RoundStatus.halted)
        self.halt = self.on_round(self._global_round(server_round), self.current)

    def _too_few_sites(self, server_round: int, client_manager: ClientManager) -> None:
        fed = self.cfg.federation
        connected = client_manager.num_available()
        why = (f"{connected} of the {fed.min_sites} sites a round needs were connected within "
               f"federation.site_wait_s={fed.site_wait_s:g} s")
        log.warning("round %d: %s; global model unchanged", self._global_round(server_round), why)
        self._record(server_round, [], {"sites": why}, {}, RoundStatus.halted)
        self.on_round(self._global_round(server_round), self.current)
        self.halt = TooFewSites(f"round {self._global_round(server_round)} halted: {why}; the "
                                "checkpoint is kept: start the missing nodes and continue with "
                                "output.resume=true")

    def _skip(self, server_round: int, valid: list[tuple[ClientProxy, FitRes]],
              excluded: dict[str, str]) -> tuple[None, dict[str, Scalar]]:
        self._record(server_round, valid, excluded, {}, RoundStatus.skipped)
        self.halt = self.on_round(self._global_round(server_round), self.current)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        last = self._phase_round(server_round) == self.phase.rounds
        if self.halt is not None or not self.phase.task or not (self.evaluate_each_round or last):
            return []
        instructions = self.inner.configure_evaluate(self._phase_round(server_round), parameters,
                                                     client_manager)
        for _, ins in instructions:
            ins.config.update(self._round_config(server_round))
        return instructions

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        _keep_allowed_metrics(results)
        loss, aggregate = self.inner.aggregate_evaluate(self._phase_round(server_round), results, failures)
        sites = {site_name(p, r.metrics): {"num_examples": r.num_examples, "loss": r.loss,
                                           **outgoing_metrics(r.metrics)} for p, r in results}
        self.on_record(RoundRecord(
            round=self._global_round(server_round), phase=self.phase.label, status=RoundStatus.evaluated,
            seconds=0.0, sites=sites, aggregate={**dict(aggregate), **({"loss": loss} if loss is not None else {})},
            excluded={f"failure-{i}": _describe(f) for i, f in enumerate(failures)}, kind=RecordKind.evaluate))
        return loss, aggregate

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None

    # ------------------------------------------------------------------ pieces

    def _round_config(self, server_round: int) -> dict[str, Scalar]:
        done = self._phase_round(server_round) - 1
        return {PLAN_KEY: self.plan_yaml, PHASE_KEY: self.phase.name, TASK_KEY: self.phase.task,
                ROUND_KEY: self._global_round(server_round), RUN_KEY: self.phase.run_token,
                SPAN_START_KEY: done / self.phase.rounds, SPAN_END_KEY: (done + 1) / self.phase.rounds}

    def _validated(self, results: list[tuple[ClientProxy, FitRes]],
                   excluded: dict[str, str]) -> list[tuple[ClientProxy, FitRes]]:
        passed: list[tuple[str, ClientProxy, FitRes]] = []
        norms: dict[str, float] = {}  # keyed by reply, not by the name a site reports
        limit = size_limit_bytes(self.cfg.federation.max_update_mb, self.current)
        for proxy, res in results:
            name = site_name(proxy, res.metrics)
            problem = size_problem(res.parameters.tensors, limit)
            if problem is not None:  # never decoded
                log.warning("excluding the update of %s: %s", name, problem)
                excluded[name] = problem
                continue
            arrays = parameters_to_ndarrays(res.parameters)
            problem = update_problem(arrays, res.num_examples, self.current, self.bounds)
            if problem is None:
                norms[str(len(passed))] = update_norm(arrays, self.current)
                passed.append((name, proxy, res))
            else:
                log.warning("excluding the update of %s: %s", name, problem)
                excluded[name] = problem
        # against the round: norms relative to the median, example claims capped
        outliers = norm_outliers(norms, self.bounds)
        kept = []
        for i, (name, proxy, res) in enumerate(passed):
            if str(i) in outliers:
                log.warning("excluding the update of %s: %s", name, outliers[str(i)])
                excluded[name] = outliers[str(i)]
            else:
                kept.append((name, proxy, res))
        counted = capped_examples({str(i): res.num_examples for i, (_, _, res) in enumerate(kept)},
                                  self.bounds)
        for i, (name, _, res) in enumerate(kept):
            if counted[str(i)] < res.num_examples:
                log.warning("%s claims %d examples; it counts as %d (federation.max_examples_ratio "
                            "x the round's median)", name, res.num_examples, counted[str(i)])
                res.num_examples = counted[str(i)]
        return [(proxy, res) for _, proxy, res in kept]

    def _decoded(self, results: list[tuple[ClientProxy, FitRes]],
                 excluded: dict[str, str]) -> list[tuple[ClientProxy, FitRes]]:
        """SecAgg+: every result carries the same unmasked mean of the sites' encoded updates;
        it becomes the new global weights, or nothing when the aggregate fails its checks."""
        if not results:
            return results
        mean = [a.astype(np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)]
        problem = None
        if len(mean) != len(self.current) or any(m.shape != g.shape for m, g in zip(mean, self.current)):
            problem = "the aggregate does not match the global model's arrays"
        elif not all(np.isfinite(m).all() for m in mean):
            problem = "the aggregate holds NaN or Inf"
        if problem is None:
            arrays = decode_update(mean, self.current, self.update_scale)
            bound = self.cfg.federation.max_update_norm
            norm = update_norm(arrays, self.current)
            # a weighted mean of updates each clipped to the bound, plus quantisation error
            if norm > bound * (1 + 1e-3) + 1e-6:
                problem = (f"the aggregate update's norm {norm:.3g} exceeds "
                           f"federation.max_update_norm={bound:g}")
        if problem is not None:
            log.warning("excluding the SecAgg+ aggregate: %s", problem)
            excluded["secagg-aggregate"] = problem
            return []
        params = ndarrays_to_parameters(arrays)
        for _, res in results:
            res.parameters = params
        return results

    def _add_noise(self, arrays: list[np.ndarray], num_sites: int) -> list[np.ndarray]:
        """Gaussian mechanism on the mean of clipped updates: std = sigma * C / n."""
        std = self.cfg.privacy.noise_multiplier * self.cfg.privacy.update_clip_norm / num_sites
        return [(a + self.noise_rng.normal(0.0, std, a.shape)).astype(np.float32) for a in arrays]

    def _planned_entries(self, server_round: int) -> dict[str, list[LedgerEntry]]:
        g = self._global_round(server_round)
        p = self.cfg.privacy
        if p.mode == PrivacyMode.user:
            return {ALL_SITES: [LedgerEntry(g, self.phase.label, "user", p.noise_multiplier,
                                            self.cfg.federation.fraction_fit, 1)]}
        if p.mode == PrivacyMode.sample:  # assume each known site repeats its last round
            planned = {}
            for site, entries in self.ledger.entries.items():
                last = [e for e in entries if e.mechanism == "sample"][-1:]
                if last:
                    planned[site] = [LedgerEntry(g, self.phase.label, "sample", p.noise_multiplier,
                                                 last[0].sample_rate, last[0].steps)]
            return planned
        return {}

    def _budget_problem(self, server_round: int) -> BudgetExceeded | None:
        budget = self.cfg.privacy.epsilon_budget
        if budget is None or self.cfg.privacy.mode == PrivacyMode.none:
            return None
        over = self.ledger.first_site_over(budget, self._planned_entries(server_round))
        if over is None:
            return None
        site, mechanism, eps = over
        return BudgetExceeded(
                f"round {self._global_round(server_round)} ({self.phase.label}) would take {site} "
            f"to {mechanism}-level epsilon={eps:.3g} > privacy.epsilon_budget={budget:g}; "
            "the run stops here and nothing is released")

    def _account(self, server_round: int, valid: list[tuple[ClientProxy, FitRes]]) -> None:
        g = self._global_round(server_round)
        p = self.cfg.privacy
        if p.mode == PrivacyMode.user:
            for site, entries in self._planned_entries(server_round).items():
                for entry in entries:
                    self.ledger.record(site, entry)
        elif p.mode == PrivacyMode.sample:
            for proxy, res in valid:
                if "dp_steps" in res.metrics:
                    self.ledger.record(site_name(proxy, res.metrics), LedgerEntry(
                        g, self.phase.label, "sample", p.noise_multiplier,
                        float(res.metrics["dp_sample_rate"]), int(res.metrics["dp_steps"])))

    def _record(self, server_round: int, valid: list[tuple[ClientProxy, FitRes]],
                excluded: dict[str, str], aggregate: dict[str, Scalar], status: RoundStatus) -> None:
        sites = {site_name(p, r.metrics): {"num_examples": r.num_examples, **outgoing_metrics(r.metrics)}
                 for p, r in valid}
        self.last_recorded = server_round
        self.on_record(RoundRecord(
            round=self._global_round(server_round), phase=self.phase.label, status=status,
            seconds=time.perf_counter() - self._started, sites=sites, aggregate=aggregate,
            excluded=excluded, kind=RecordKind.fit))


def _keep_allowed_metrics(results: Sequence[tuple[ClientProxy, FitRes | EvaluateRes]]) -> None:
    """Whatever a node sent, only allow-listed finite scalars are kept, logged or aggregated."""
    for _, res in results:
        res.metrics = dict(outgoing_metrics(dict(res.metrics)))


def _describe(failure: object) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {str(failure)[:200]}"
    if isinstance(failure, tuple) and len(failure) == 2:
        return f"status {getattr(failure[1], 'status', '?')}"
    return type(failure).__name__
