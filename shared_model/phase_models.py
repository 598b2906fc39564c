"""The model each phase of a federation trains: its seeded starting point and its federated keys.

Server and nodes build a phase's starting model each on their own, from the plan alone: the
server to send the first global weights, a node for what never travels (an SSL head or a task
head kept at the site, a DINO teacher). Both must get the same numbers, so both build it here;
the simulation's baselines start from the same models.
"""

from __future__ import annotations

import torch

from shared_model.config import FedCMRConfig, HeadSharing
from shared_model.encoders import build_encoder
from shared_model.ssl import build_ssl_model
from shared_model.ssl.base import SSLModel
from shared_model.tasks import Task
from shared_model.tasks.models import TaskModel, build_task_model
from shared_model.train import derive_seed


def initial_ssl_model(plan: FedCMRConfig) -> SSLModel:
    """The seeded SSL model (encoder and method head) pretraining starts from."""
    torch.manual_seed(plan.seed)
    return build_ssl_model(plan)


def initial_task_model(plan: FedCMRConfig, task: Task) -> TaskModel:
    """The seeded task model (encoder, head) a fine-tuning phase starts from."""
    torch.manual_seed(derive_seed(plan.seed, "head", task.name) % (2**31))
    return build_task_model(task, build_encoder(plan.model.preset), plan.tasks.decoder_width)


def task_keys(model: torch.nn.Module, plan: FedCMRConfig) -> list[str]:
    """Federated keys of a task model: the encoder, and the head unless heads stay local."""
    prefixes = ("encoder.",) if plan.federation.heads == HeadSharing.local else ("encoder.", "head.")
    return [k for k in model.state_dict() if k.startswith(prefixes)]
