"""The hospital node's Flower ClientApp.

It runs on Flower's legacy path (``client_fn`` + NumPyClient) because SecAgg+ needs it in
flwr 1.42. What to train comes from the server, as the resolved run config in every instruction
(the *plan*); where the node's data lives, which device it uses and what it accepts are the
node's own settings (Flower ``node_config``), never the server's.

Mods, outermost first:

0. ``redact_errors``: an exception leaves the node as its type only (plus the fixed-form message
   of the node's own refusals: policy, settings, clipping range, privacy), never free text that
   could carry a path or a header value; the traceback stays in the node's own log.
1. ``node_guard``: the node's own policy — refuses SecAgg+ settings weaker than it accepts, an
   unmask request naming a node both as active and as dropped (which would let the server
   unmask an individual update), and, if the node requires it, any round without SecAgg+.
2. ``secure_aggregation``: Flower's ``secaggplus_mod`` for SecAgg+ rounds; plain rounds pass.
3. ``clipping_range_check``: before masking, every weight must lie inside SecAgg+'s clipping
   range; a weight outside it is an error naming the range, never a silent clip.
4. ``update_clipping``: Flower's ``fixedclipping_mod`` when the server runs user-level DP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client import Client
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.federated import FedCMRClient
from client.node_settings import NodeConfigError, NodePolicy, NodeSettings, node_settings_from_context
from shared_model.errors import UserError
from shared_model.privacy import PrivacyError

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
log = logging.getLogger(__name__)


class NodePolicyError(UserError, PermissionError):
    """The server asked for something this node's policy does not allow."""


class ClippingRangeError(UserError, ValueError):
    """An outgoing weight lies outside SecAgg+'s clipping range."""


# Refusals whose messages are composed from numbers and setting names only: they may leave.
PUBLIC_ERRORS: tuple[type[Exception], ...] = (NodePolicyError, NodeConfigError, ClippingRangeError,
                                              PrivacyError)


def public_reason(error: Exception) -> str:
    """What the server may learn of a node's failure."""
    if isinstance(error, PUBLIC_ERRORS):
        return f"{type(error).__name__}: {error}"
    return f"{type(error).__name__} (details in the node's log)"


def redact_errors(msg: Message, context: Context,
                  call_next: Callable[[Message, Context], Message]) -> Message:
    """Outermost mod: a failure is logged here in full and replied as ``public_reason`` only."""
    try:
        return call_next(msg, context)
    except Exception as error:  # noqa: BLE001  (the node keeps running; the server sees a failure)
        log.exception("this node failed on a %s message", msg.metadata.message_type)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=public_reason(error)),
                       reply_to=msg)


def node_guard(policy: NodePolicy) -> Mod:
    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is None and policy.require_secagg:
                raise NodePolicyError("this node trains only under SecAgg+ (require-secagg)")
            if configs is not None:
                check_secagg_request(dict(configs), policy)
        return call_next(msg, context)

    return mod


def check_secagg_request(configs: dict, policy: NodePolicy) -> None:
    """Refuse SecAgg+ set-ups below the node's policy and self-contradicting unmask requests."""
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        threshold, shares = int(configs[Key.THRESHOLD]), int(configs[Key.SHARE_NUMBER])
        if threshold < policy.min_secagg_threshold or shares < policy.min_secagg_shares:
            raise NodePolicyError(
                f"SecAgg+ with threshold {threshold} and {shares} shares is below this node's "
                f"policy (threshold >= {policy.min_secagg_threshold}, shares >= "
                f"{policy.min_secagg_shares})")
    elif stage == Stage.UNMASK:
        both = set(configs.get(Key.ACTIVE_NODE_ID_LIST, [])) & set(configs.get(Key.DEAD_NODE_ID_LIST, []))
        if both:
            raise NodePolicyError(f"unmask request names {len(both)} node(s) both as active and "
                                  "as dropped; refusing (it would reveal an individual update)")


def secure_aggregation(msg: Message, context: Context,
                       call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's SecAgg+ for SecAgg+ rounds; plain rounds pass straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def clipping_range_check(msg: Message, context: Context,
                         call_next: Callable[[Message, Context], Message]) -> Message:
    """Under SecAgg+, every outgoing weight must lie within +-clipping_range (checked, not clipped)."""
    reply = call_next(msg, context)
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if (msg.metadata.message_type != MessageType.TRAIN or reply.has_error() or state is None
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return reply
    limit = float(cast(float, state["clipping_range"]))
    arrays = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)
    for index, array in enumerate(arrays):
        peak = float(np.abs(array).max()) if array.size else 0.0
        if peak > limit:
            raise ClippingRangeError(f"weight array {index} reaches {peak:.3g}, outside SecAgg+'s clipping "
                             f"range +-{limit:g}; raise federation.secagg.clipping_range on the "
                             "server (SecAgg+ would otherwise clip it silently)")
    return reply


def update_clipping(msg: Message, context: Context,
                    call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's fixed update clipping when the server runs user-level DP."""
    if msg.metadata.message_type == MessageType.TRAIN and msg.content.array_records:
        config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        if KEY_CLIPPING_NORM in config:
            return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(settings_fn: Callable[[Context], NodeSettings] = node_settings_from_context,
                     extra_mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp whose nodes find their settings with ``settings_fn(context)``.

    ``extra_mods`` go right inside ``redact_errors`` (simulations use this to inject faults).
    """

    def client_fn(context: Context) -> Client:
        settings = settings_fn(context)
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        return FedCMRClient(settings.store, settings.device, settings.site_index, context).to_client()

    def guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        return node_guard(settings_fn(context).policy)(msg, context, call_next)

    mods = [redact_errors, *(extra_mods or []), guard, secure_aggregation, clipping_range_check, update_clipping]
    return ClientApp(client_fn=client_fn, mods=mods)


app = build_client_app()
