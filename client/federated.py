"""What a node does in each phase of a federation: pretrain, fine-tune, evaluate.

The server's plan says what to train; the node's store says on what. Anything a node keeps
between rounds (an SSL head that stays local, a DINO teacher in local-EMA mode, task heads kept
local for personalisation, the run's DP history) lives in the node's state folder, one snapshot
per run and round (``client.run_local``), so a resumed run continues exactly; never in module
globals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.common import Scalar

from client.finetune import held_out, series_from_store, task_series
from client.store import LocalStore
from client.node_privacy import ACCOUNTANT_FILE, NodeAccountant
from client.node_settings import NodePolicy, check_privacy_plan
from client.run_local import RunLocalState, Snapshot
from shared_model.config import (
    FedCMRConfig,
    HeadSharing,
    PrivacyMode,
    SSLMethod,
    TeacherMode,
    config_from_yaml,
    secagg_enabled,
    ssl_head_stays_local,
)
from shared_model.encoders import Encoder, get_preset
from shared_model.finetune import evaluate, finetune
from shared_model.phase_models import initial_ssl_model, initial_task_model, task_keys
from shared_model.privacy import DPSettings, epsilon_for, make_private
from shared_model.ssl import federated_keys
from shared_model.ssl.base import SSLModel
from shared_model.ssl.dino import DINO
from shared_model.tasks import Task, TaskData, TaskDataError, get_task
from shared_model.tasks.models import TaskModel
from shared_model.distributed import pretrain_data_parallel
from shared_model.train import Span, derive_seed, make_generator, make_optimizer, pretrain_local, resolve_device
from shared_model.weights import arrays_to_state_dict, load_into, state_dict_to_arrays, strip_opacus
from shared_model.wire import (
    FINETUNE,
    PHASE_KEY,
    PLAN_KEY,
    PRETRAIN,
    ROUND_KEY,
    RUN_KEY,
    SPAN_END_KEY,
    SPAN_START_KEY,
    TASK_KEY,
    outgoing_metrics,
)

FitReply = tuple[list[np.ndarray], int, dict[str, Scalar]]  # weights, example count, metrics

LOCAL_TEACHER = "teacher"
LOCAL_HEAD = "head/"  # + task name
LOCAL_SSL_HEAD = "ssl_head"


class BudgetError(RuntimeError):
    """A round this node will not train: it would exceed the node's privacy budget."""


def plan_from_config(config: Mapping[str, object]) -> FedCMRConfig:
    text = config.get(PLAN_KEY)
    if not isinstance(text, str):
        raise ValueError(f"instruction carries no '{PLAN_KEY}'; is the server a FedCMR server?")
    return config_from_yaml(text, source="server plan")




def store_holdout(store: LocalStore, plan: FedCMRConfig) -> list[str]:
    """This node's evaluation-only subjects: fixed by ``tasks.split_seed``, the same for every
    phase, task and seed, and never used for pretraining or fine-tuning."""
    subjects = sorted({r.subject for r in store.manifest.series.values()})
    return held_out(subjects, plan.tasks.test_fraction, plan.tasks.split_seed) if len(subjects) > 1 else []


def split_task_data(data: TaskData, plan: FedCMRConfig, holdout: list[str]) -> tuple[TaskData, TaskData]:
    """Train on at most ``tasks.label_budget`` labelled subjects outside the hold-out (drawn by
    the plan's seed); test on the held-out subjects."""
    pool = sorted(set(data.subjects) - set(holdout))
    order = [pool[i] for i in torch.randperm(len(pool), generator=make_generator(plan.seed, "draw")).tolist()]
    train_ids = set(order[:plan.tasks.label_budget] if plan.tasks.label_budget > 0 else order)
    train = data.subset([i for i, s in enumerate(data.subjects) if s in train_ids])
    test = data.subset([i for i, s in enumerate(data.subjects) if s in holdout])
    return train, test


def site_task_split(store: LocalStore, plan: FedCMRConfig, task: Task) -> tuple[TaskData, TaskData]:
    """This node's (train, test) samples for a task: the series the task can use, split by
    :func:`split_task_data` around the node's fixed hold-out (either may be empty)."""
    data = task.build(series_from_store(store, task_series(store, task)),
                      get_preset(plan.model.preset).image_size)
    return split_task_data(data, plan, store_holdout(store, plan))


def ssl_frames(store: LocalStore, size: int, exclude: list[str]) -> torch.Tensor:
    """Every frame of every series outside ``exclude`` as (N, 1, size, size) for pretraining."""
    from shared_model.tasks.base import resize_frames

    frames = [store.load(key).reshape(-1, store.manifest.crop_px, store.manifest.crop_px)
              for key, record in sorted(store.manifest.series.items()) if record.subject not in exclude]
    if not frames:
        raise TaskDataError("no unlabelled frames left for pretraining after the hold-out")
    return resize_frames(np.concatenate(frames), size)


PROBE_FRAMES = 64  # labelled frames a probe reads at most


def blood_pool_probe(encoder: Encoder, store: LocalStore, plan: FedCMRConfig) -> dict[str, float]:
    """Health of the representation, measured where the labels are: a k-NN probe on frozen patch
    tokens telling LV blood-pool patches from the rest, fitted on half of the node's labelled
    frames (by subject) and scored on the other half. Labels only read here, never trained on;
    {} where the node has too few labelled frames."""
    from shared_model.ssl.health import patch_labels, patch_probe_dice, patch_tokens
    from shared_model.tasks.base import evenly_spaced

    frames = [f for f in store.iter_labeled_frames(("lv_blood",), include_partial=True)]
    if len(frames) < 4:
        return {}
    frames = evenly_spaced(frames, PROBE_FRAMES)
    subjects = [store.manifest.series[f.key].subject for f in frames]
    order = sorted(set(subjects))
    first = set(order[: max(1, len(order) // 2)]) if len(order) > 1 else set()
    fit = [i for i, s in enumerate(subjects) if s in first] if first else list(range(0, len(frames), 2))
    score = [i for i in range(len(frames)) if i not in set(fit)]
    size = get_preset(plan.model.preset).image_size
    from shared_model.tasks.base import resize_frames, resize_labels

    images = resize_frames(np.stack([store.load(f.key)[f.slice, f.phase] for f in frames]).astype(np.float32), size)
    masks = resize_labels(np.stack([store.load_mask(f.key)[f.slice, f.phase] for f in frames]), size)
    patch = int(encoder.patch_embed.patch_size[0])
    tokens = patch_tokens(encoder, images.to(next(encoder.parameters()).device)).cpu()
    labels = patch_labels(masks, patch)
    return {"probe_dice": patch_probe_dice(tokens[fit], labels[fit], tokens[score], labels[score])}


class FedCMRClient(NumPyClient):
    """One node, one message: dispatch on the phase the server names."""

    def __init__(self, store: Path, device: str, site_index: int, context: Context,
                 policy: NodePolicy = NodePolicy(), node_state: Path | None = None) -> None:
        self.store_path = store
        self.policy = policy
        # the node's own accountant, across runs and restarts (client.node_privacy)
        self.node_state = node_state if node_state is not None else store / "node-state"
        self.accountant_path = self.node_state / ACCOUNTANT_FILE
        # "cuda:0,cuda:1": local pretraining runs data-parallel over those devices (torch DDP)
        self.devices = [d.strip() for d in device.split(",") if d.strip()] or ["auto"]
        self.device = resolve_device(self.devices[0])
        self.site_index = site_index
        self.context = context
        self.local = Snapshot()  # what this node kept from earlier rounds of the run

    def _run_local(self, config: Mapping[str, object]) -> RunLocalState:
        token = config.get(RUN_KEY)
        return RunLocalState(self.node_state, str(token) if token else f"flower-{self.context.run_id}")

    # ------------------------------------------------------------------ Flower entry points

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        raise RuntimeError("FedCMR servers send initial weights; nodes never supply them")

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]
            ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        plan = plan_from_config(config)
        check_privacy_plan(plan.privacy.mode.value, plan.privacy.noise_multiplier, self.policy)
        span = Span(float(config.get(SPAN_START_KEY, 0.0)), float(config.get(SPAN_END_KEY, 1.0)))
        global_round = int(config.get(ROUND_KEY, 0))
        gen = make_generator(plan.seed, "site", self.site_index, "round", global_round)
        mu = float(config.get("proximal_mu", 0.0))
        local = self._run_local(config)
        self.local = local.load(global_round - 1)
        if config.get(PHASE_KEY) == FINETUNE:
            reply = self._finetune(parameters, plan, get_task(str(config[TASK_KEY])), span, gen, mu)
        elif config.get(PHASE_KEY, PRETRAIN) == PRETRAIN:
            probe = plan.ssl.probe_every > 0 and (global_round % plan.ssl.probe_every == 0 or span.end >= 1.0)
            reply = self._pretrain(parameters, plan, span, gen, mu, probe)
        else:
            raise ValueError(f"unknown phase {config.get(PHASE_KEY)!r}")
        if self.local.groups or self.local.dp_history:
            local.save(global_round, self.local)
        return reply

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]
                 ) -> tuple[float, int, dict[str, Scalar]]:
        plan = plan_from_config(config)
        task = get_task(str(config[TASK_KEY]))
        self.local = self._run_local(config).load(int(config.get(ROUND_KEY, 0)))
        model = self._task_model(parameters, plan, task)
        _, test = self._split(plan, task)
        metrics = evaluate(model, task, test, self.device)
        return float(metrics.pop("loss", 0.0)), max(len(test), 1), dict(outgoing_metrics(
            {**metrics, "site_index": self.site_index}))

    # ------------------------------------------------------------------ phases

    def _pretrain(self, parameters: list[np.ndarray], plan: FedCMRConfig, span: Span,
                  gen: torch.Generator, mu: float, probe: bool = False) -> FitReply:
        model = initial_ssl_model(plan)  # the server's initial weights, for whatever stays local
        local_head = ssl_head_stays_local(plan)
        keys = federated_keys(model, local_head)
        load_into(model, {**model.state_dict(), **arrays_to_state_dict(parameters, keys, model.state_dict())},
                  "global weights")
        if local_head:
            self._restore_local(model, LOCAL_SSL_HEAD)
        self._restore_teacher(model, plan)
        model.to(self.device)
        store = LocalStore.open(self.store_path)
        images = ssl_frames(store, get_preset(plan.model.preset).image_size, store_holdout(store, plan))
        optimizer = make_optimizer(model, plan.ssl.lr, plan.ssl.weight_decay)
        private = None
        if plan.privacy.mode == PrivacyMode.sample:
            # the plan's config refuses DP-SGD pretraining of DINO and the token MAE
            # (shared_model.config.validate_config, run on the plan as it arrives)
            dp = self._dp_settings(plan)
            self._check_budget(plan, dp, plan.ssl.batch_size / len(images), plan.ssl.local_steps)
            private = make_private(model, optimizer, torch.utils.data.TensorDataset(images),
                                   plan.ssl.batch_size, dp, gen, self._dp_history())
        try:
            if len(self.devices) > 1 and private is None and mu == 0:
                result = pretrain_data_parallel(model.cpu(), images, self.devices, plan,
                                                steps=plan.ssl.local_steps, span=span,
                                                seed=derive_seed(plan.seed, "site", self.site_index,
                                                                 "span", f"{span.start:.6f}"))
                model.to(self.device)
            else:
                result = pretrain_local(model, images, steps=plan.ssl.local_steps,
                                        batch_size=plan.ssl.batch_size, optimizer=optimizer, gen=gen,
                                        device=self.device, base_lr=plan.ssl.lr, span=span,
                                        proximal_mu=mu, private=private)
        finally:
            if private is not None:
                private.close()
        self._keep_teacher(model, plan)
        if local_head:
            self._keep_local(model, LOCAL_SSL_HEAD, "head.")
        metrics = {**asdict(result), **result.stats, "num_images": len(images)}
        if probe and isinstance(model.encoder, Encoder):
            metrics.update(blood_pool_probe(model.encoder, store, plan))
        if private is not None:
            metrics.update(self._record_dp(private.accountant_state(), plan))
        return self._reply(model.state_dict(), keys, len(images), plan, metrics)

    def _finetune(self, parameters: list[np.ndarray], plan: FedCMRConfig, task: Task, span: Span,
                  gen: torch.Generator, mu: float) -> FitReply:
        model = self._task_model(parameters, plan, task)
        train, _ = self._split(plan, task)
        dp = self._dp_settings(plan) if plan.privacy.mode == PrivacyMode.sample else None
        if dp is not None:
            self._check_budget(plan, dp, min(1.0, plan.tasks.batch_size / max(len(train), 1)),
                               plan.tasks.steps)
        result = finetune(model, task, train, plan.tasks, gen=gen, device=self.device, span=span,
                          dp=dp, dp_history=self._dp_history() if dp else None, proximal_mu=mu)
        if plan.federation.heads == HeadSharing.local:
            self._keep_local(model, LOCAL_HEAD + task.name, "head.")
        metrics = {**asdict(result.local), "num_samples": len(train)}
        if dp is not None and result.dp_history is not None:
            metrics.update(self._record_dp(result.dp_history, plan))
        return self._reply(model.state_dict(), task_keys(model, plan), len(train), plan, metrics)

    # ------------------------------------------------------------------ helpers

    def _reply(self, state: dict[str, torch.Tensor], keys: list[str], count: int, plan: FedCMRConfig,
               metrics: dict[str, object]) -> FitReply:
        state = strip_opacus(state)  # weights leave without any DP-SGD wrapper's key prefix
        arrays = state_dict_to_arrays({k: state[k].detach().to("cpu", torch.float32) for k in keys}, keys)
        # Under user-level DP every site weighs the same (the noise is calibrated to that);
        # under SecAgg+ example weights are capped at max_weight (the masking scales by them).
        weight = 1 if plan.privacy.mode == PrivacyMode.user else count
        if secagg_enabled(plan):
            weight = min(weight, plan.federation.secagg.max_weight)
        return arrays, weight, dict(outgoing_metrics({**metrics, "site_index": self.site_index}))

    def _split(self, plan: FedCMRConfig, task: Task) -> tuple[TaskData, TaskData]:
        train, test = site_task_split(LocalStore.open(self.store_path), plan, task)
        if len(train) + len(test) == 0:
            raise TaskDataError(f"this node has no labelled samples for task '{task.name}'")
        return train, test

    def _task_model(self, parameters: list[np.ndarray], plan: FedCMRConfig, task: Task) -> TaskModel:
        model = initial_task_model(plan, task)
        keys = task_keys(model, plan)
        load_into(model, {**model.state_dict(), **arrays_to_state_dict(parameters, keys, model.state_dict())},
                  "global weights")
        if plan.federation.heads == HeadSharing.local:
            self._restore_local(model, LOCAL_HEAD + task.name)
        return model

    def _restore_local(self, model: torch.nn.Module, group: str) -> bool:
        """Weights this node kept from an earlier round (the model keeps its seeded initial ones
        where there are none yet); whether there were."""
        saved = self.local.groups.get(group)
        if saved is not None:
            load_into(model, {**model.state_dict(), **saved}, f"local weights '{group}'")
        return saved is not None

    def _keep_local(self, model: torch.nn.Module, group: str, *prefixes: str) -> None:
        self.local.groups[group] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                                    if k.startswith(prefixes)}

    def _restore_teacher(self, model: SSLModel, plan: FedCMRConfig) -> None:
        """DINO local-EMA: continue this node's teacher; the first round starts it from the student."""
        if plan.ssl.method != SSLMethod.dino or plan.ssl.dino.teacher != TeacherMode.local_ema:
            return
        if not self._restore_local(model, LOCAL_TEACHER):
            assert isinstance(model, DINO)
            model.reset_teacher()

    def _keep_teacher(self, model: torch.nn.Module, plan: FedCMRConfig) -> None:
        if plan.ssl.method != SSLMethod.dino or plan.ssl.dino.teacher != TeacherMode.local_ema:
            return
        self._keep_local(model, LOCAL_TEACHER, "teacher.", "center")

    # ------------------------------------------------------------------ sample-level DP

    @staticmethod
    def _dp_settings(plan: FedCMRConfig) -> DPSettings:
        p = plan.privacy
        return DPSettings(p.noise_multiplier, p.max_grad_norm, p.delta, p.accountant,
                      p.reproducible_noise)

    def _dp_history(self) -> list[list[float]]:
        return [list(row) for row in self.local.dp_history]

    def _check_budget(self, plan: FedCMRConfig, dp: DPSettings, sample_rate: float, steps: int) -> None:
        NodeAccountant(self.accountant_path, dp.accountant).check(
            dp.noise_multiplier, sample_rate, steps, self.policy.max_epsilon, self.policy.delta)
        budget = plan.privacy.epsilon_budget
        if budget is None:
            return
        planned = self._dp_history() + [[dp.noise_multiplier, sample_rate, steps]]
        eps = epsilon_for(planned, dp.delta, dp.accountant)
        if eps > budget:
            raise BudgetError(f"this round would take the node to epsilon={eps:.3g}, over its "
                              f"budget of {budget:g}; the node does not train it")

    def _record_dp(self, history: list[list[float]], plan: FedCMRConfig) -> dict[str, float]:
        previous = self._dp_history()
        self.local.dp_history = [[float(n), float(q), int(s)] for n, q, s in history]
        # Opacus merges consecutive steps with the same (noise, rate) into one history row.
        steps = int(sum(row[2] for row in history) - sum(row[2] for row in previous))
        NodeAccountant(self.accountant_path, plan.privacy.accountant).record(
            float(history[-1][0]), float(history[-1][1]), steps)
        return {"dp_epsilon": epsilon_for(history, plan.privacy.delta, plan.privacy.accountant),
                "dp_sample_rate": float(history[-1][1]), "dp_steps": steps}
