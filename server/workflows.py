"""Fit and evaluate rounds for Flower's legacy DefaultWorkflow, bounded in time.

Flower 1.42's default fit/evaluate workflows wait for replies without a timeout, so one silent
node would stall the federation forever. These are the same steps (configure, send, receive,
aggregate) with ``send_and_receive(..., timeout=round_timeout_s)``: a node that does not answer in
time counts as a failure, in fit and evaluate rounds alike, and the round goes on with the
others. SecAgg+ rounds use Flower's ``SecAggPlusWorkflow`` with its own timeout, with its handling
of drop-outs fixed (:class:`DropoutSafeSecAggPlusWorkflow`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from logging import INFO
from typing import TypeVar, cast

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters
from flwr.server import LegacyContext
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore import log

Workflow = Callable[[Grid, Context], None]
Ins = TypeVar("Ins", FitIns, EvaluateIns)
Res = TypeVar("Res", FitRes, EvaluateRes)


def _current(context: LegacyContext) -> tuple[int, Parameters]:
    cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
    parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD],
                                                  keep_input=True)
    return cast(int, cfg[Key.CURRENT_ROUND]), parameters


def current_round(context: Context) -> int:
    """The round the DefaultWorkflow is in (1-based, within the phase)."""
    return _current(cast(LegacyContext, context))[0]


class BoundedClientManager(SimpleClientManager):
    """Flower's client manager with the wait for enough connected nodes bounded by
    ``wait_s`` (Flower's default waits 24 h, so a federation missing a node would hang for a
    day); after it, sampling returns no sites and the strategy halts the round."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self.wait_s = wait_s

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        return super().wait_for(num_clients, timeout=min(timeout, self.wait_s))  # type: ignore[arg-type]


def send_and_collect(grid: Grid, instructions: Sequence[tuple[ClientProxy, Ins]], message_type: str,
                     server_round: int, timeout_s: float, to_content: Callable[[Ins], RecordDict],
                     from_content: Callable[[RecordDict], Res],
                     ) -> tuple[list[tuple[ClientProxy, Res]], list[tuple[ClientProxy, Res] | BaseException]]:
    """Send each site its instruction; (replies with status OK, failures) within ``timeout_s``.

    A failure is a reply with another status, an error reply, or a site that did not reply in
    time (a ``TimeoutError``).
    """
    proxies = {proxy.node_id: proxy for proxy, _ in instructions}
    messages = [Message(content=to_content(ins), dst_node_id=proxy.node_id, message_type=message_type,
                        group_id=str(server_round))
                for proxy, ins in instructions]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    results: list[tuple[ClientProxy, Res]] = []
    failures: list[tuple[ClientProxy, Res] | BaseException] = []
    for reply in replies:
        if reply.has_content():
            res = from_content(reply.content)
            proxy = proxies[reply.metadata.src_node_id]
            (results if res.status.code == Code.OK else failures).append((proxy, res))
        else:
            failures.append(Exception(reply.error))
    missing = len(instructions) - len(replies)
    failures += [TimeoutError(f"no reply within {timeout_s:g} s")] * missing
    return results, failures


def timed_fit_workflow(timeout_s: float) -> Workflow:
    def fit(grid: Grid, context: Context) -> None:
        assert isinstance(context, LegacyContext)
        server_round, parameters = _current(context)
        instructions = context.strategy.configure_fit(server_round=server_round, parameters=parameters,
                                                      client_manager=context.client_manager)
        if not instructions:
            log(INFO, "configure_fit: no sites selected, round skipped")
            return
        results, failures = send_and_collect(
            grid, instructions, MessageType.TRAIN, server_round, timeout_s,
            lambda ins: compat.fitins_to_recorddict(ins, True),
            lambda content: compat.recorddict_to_fitres(content, False))
        params, metrics = context.strategy.aggregate_fit(server_round, results, failures)
        if params:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
            context.history.add_metrics_distributed_fit(server_round=server_round, metrics=metrics)

    return fit


def timed_evaluate_workflow(timeout_s: float) -> Workflow:
    def evaluate(grid: Grid, context: Context) -> None:
        assert isinstance(context, LegacyContext)
        server_round, parameters = _current(context)
        instructions = context.strategy.configure_evaluate(
            server_round=server_round, parameters=parameters, client_manager=context.client_manager)
        if not instructions:
            return
        results, failures = send_and_collect(
            grid, instructions, MessageType.EVALUATE, server_round, timeout_s,
            lambda ins: compat.evaluateins_to_recorddict(ins, True), compat.recorddict_to_evaluateres)
        loss, metrics = context.strategy.aggregate_evaluate(server_round, results, failures)
        if loss is not None:
            context.history.add_loss_distributed(server_round=server_round, loss=loss)
            context.history.add_metrics_distributed(server_round=server_round, metrics=metrics)

    return evaluate


class DropoutSafeSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower 1.42's SecAgg+ with a node lost *during key sharing* handled on the server's side
    (the nodes run Flower's unchanged client protocol).

    Such a node's shares were never forwarded, so no survivor masked with it or holds its
    secret; Flower still lists it as dropped at the unmask stage (``sampled - active``), every
    survivor fails looking up its share (KeyError) and the round halts. Here only the nodes
    whose shares went out can count as dropped later, so the round ends with the survivors'
    sum, as it does for a node lost after key sharing.
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)  # whose shares were forwarded
        for nid in state.nid_to_neighbours:
            state.nid_to_neighbours[nid] &= state.sampled_node_ids | {nid}
        return ok
