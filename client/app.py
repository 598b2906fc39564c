"""The hospital node's Flower ClientApp.

It runs on Flower's legacy path (``client_fn`` + NumPyClient) because SecAgg+ needs it in
flwr 1.42. What to train comes from the server, as the resolved run config in every instruction
(the *plan*); where the node's data lives, which device it uses and what it accepts are the
node's own settings (Flower ``node_config``), never the server's.

Mods, outermost first:

- ``audit``: the node's append-only audit log (``client.audit``): one JSON line per reply, with
  what it carries (array names, shapes, bytes; metric names and values), written before it
  leaves; a reply that cannot be logged is withheld.
0. ``redact_errors``: an exception leaves the node as its type only (plus the fixed-form message
   of the node's own refusals: policy, settings, privacy), never free text that
   could carry a path or a header value; the traceback stays in the node's own log.
1. ``node_guard``: the node's own policy — refuses SecAgg+ settings weaker than it accepts (and
   any threshold of at most half the shares), an unmask request naming a node both as active
   and as dropped (which would let the server unmask an individual update), if the node
   requires it any round without SecAgg+, and instructions or replies above its message size.
2. ``secure_aggregation``: Flower's ``secaggplus_mod`` for SecAgg+ rounds; plain rounds pass.
3. ``secagg_update_encoding``: under SecAgg+ the node sends its update, not its weights: the
   difference from the round's global weights, clipped to the consortium's norm bound and
   divided by the round's scale so that it fits SecAgg+'s clipping range
   (:func:`shared_model.wire.encode_update`); trained weights of any size pass.
4. ``update_clipping``: Flower's ``fixedclipping_mod`` when the server runs user-level DP.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import Client
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.audit import AUDIT_FILE, audit_mod
from client.federated import FedCMRClient
from client.node_settings import (
    NodeConfigError,
    NodePolicy,
    NodePolicyError,
    NodeSettings,
    node_settings_from_context,
)
from shared_model.masks import sha256_ctr_masks
from shared_model.privacy import PrivacyError
from shared_model.wire import UPDATE_NORM_KEY, UPDATE_SCALE_KEY, encode_update

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
log = logging.getLogger(__name__)
SECAGG_MOD_MODULE = "flwr.client.mod.secure_aggregation.secaggplus_mod"


def use_whole_seed_masks() -> None:
    """This node's SecAgg+ masks come from the whole 32-byte seed (``shared_model.masks``),
    not Flower's 32-bit fold of it; the ServerApp installs the same generator."""
    flower: Any = importlib.import_module(SECAGG_MOD_MODULE)
    flower.pseudo_rand_gen = sha256_ctr_masks


use_whole_seed_masks()


# Refusals whose messages are composed from numbers and setting names only: they may leave.
PUBLIC_ERRORS: tuple[type[Exception], ...] = (NodePolicyError, NodeConfigError, PrivacyError)


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


def content_bytes(content: RecordDict) -> int:
    """What a message's content weighs: its arrays' buffers and its config values' bytes."""
    size = sum(len(array.data) for arrays in content.array_records.values() for array in arrays.values())
    for configs in content.config_records.values():
        for value in configs.values():
            for item in value if isinstance(value, list) else [value]:
                size += len(item) if isinstance(item, (bytes, str)) else 8
    return size


def check_message_size(what: str, content: RecordDict, policy: NodePolicy) -> None:
    """Refuse an instruction, or withhold a reply, above the node's [max-message-mb]."""
    if policy.max_message_mb <= 0:
        return
    size = content_bytes(content)
    if size > policy.max_message_mb * 1e6:
        raise NodePolicyError(f"{what} of {size / 1e6:.1f} MB exceeds this node's limit of "
                              f"{policy.max_message_mb:g} MB (max-message-mb)")


def node_guard(policy: NodePolicy) -> Mod:
    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        check_message_size("an instruction", msg.content, policy)
        if msg.metadata.message_type == MessageType.TRAIN:
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is None and policy.require_secagg:
                raise NodePolicyError("this node trains only under SecAgg+ (require-secagg)")
            if configs is not None:
                check_secagg_request(dict(configs), policy)
        reply = call_next(msg, context)
        if not reply.has_error():
            check_message_size("a reply", reply.content, policy)  # withheld: the error goes instead
        return reply

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
        if 2 * threshold <= shares:
            raise NodePolicyError(
                f"SecAgg+ with threshold {threshold} of {shares} shares: a threshold of at most "
                "half the shares would let the server reconstruct both of a site's masks")
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


def secagg_update_encoding(msg: Message, context: Context,
                            call_next: Callable[[Message, Context], Message]) -> Message:
    """Under SecAgg+, the reply's weights become the encoded update SecAgg+ masks."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, context)
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    missing = [k for k in (UPDATE_SCALE_KEY, UPDATE_NORM_KEY) if k not in fit_ins.config]
    if missing:
        raise NodePolicyError(f"the SecAgg+ round's plan carries no {', '.join(missing)}; "
                              "this node sends updates only as the plan scales them")
    scale, bound = float(fit_ins.config[UPDATE_SCALE_KEY]), float(fit_ins.config[UPDATE_NORM_KEY])
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(bound) and bound > 0):
        raise NodePolicyError(f"the SecAgg+ round's update scale {scale:g} or norm bound {bound:g} "
                              "is not a positive number")
    global_arrays = parameters_to_ndarrays(fit_ins.parameters)
    reply = call_next(msg, context)
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if reply.has_error() or state is None:
        return reply
    fit_res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    encoded = encode_update(parameters_to_ndarrays(fit_res.parameters), global_arrays, scale, bound,
                            float(cast(float, state["clipping_range"])))
    if encoded.shrink < 1.0:
        log.info("SecAgg+: update of norm %.4g shrunk by %.4g to fit the norm bound %g and the "
                 "clipping range", encoded.norm, encoded.shrink, bound)
    fit_res.parameters = ndarrays_to_parameters(encoded.arrays)
    reply.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
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
        return FedCMRClient(settings.store, settings.device, settings.site_index, context,
                            settings.policy, settings.node_state).to_client()

    def guard(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        return node_guard(settings_fn(context).policy)(msg, context, call_next)

    audit = audit_mod(lambda context: settings_fn(context).node_state / AUDIT_FILE)
    mods = [audit, redact_errors, *(extra_mods or []), guard, secure_aggregation,
            secagg_update_encoding, update_clipping]
    return ClientApp(client_fn=client_fn, mods=mods)


app = build_client_app()
