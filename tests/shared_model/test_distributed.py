"""Data-parallel pretraining over two CPU processes (gloo): both ranks take the same steps."""

import torch

from shared_model.config import load_config
from shared_model.distributed import pretrain_data_parallel
from shared_model.phase_models import initial_ssl_model
from shared_model.train import Span


def test_two_ranks_train_as_one() -> None:
    # Prepare
    cfg = load_config("demo-cpu", ["ssl.batch_size=2", "device=cpu"])
    model = initial_ssl_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0))

    # Execute
    result = pretrain_data_parallel(model, images, ["cpu", "cpu"], cfg, steps=2, span=Span(), seed=0)

    # Assert: trained, both ranks' batches seen, and the ranks ended with the same weights
    assert result.steps == 2 and result.images_seen == 2 * 2 * 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.stats["rank_spread"] < 1e-9


def test_a_node_with_two_devices_pretrains_data_parallel(tmp_path) -> None:
    from flwr.app import Context, RecordDict

    from client.federated import FedCMRClient
    from shared_model.config import config_to_yaml, ssl_head_stays_local
    from shared_model.ssl import federated_keys
    from shared_model.weights import state_dict_to_arrays
    from shared_model.wire import PHASE_KEY, PLAN_KEY, PRETRAIN, ROUND_KEY
    from sim.sites import site_spec, write_site_frames

    # Prepare: a node whose store holds a few frames, asked by a plan to pretrain one round
    write_site_frames(tmp_path / "store", site_spec(0, 1.5, 64), 8, seed=0, slices=2, phases=4)
    plan = load_config("demo-cpu", ["ssl.batch_size=2", "ssl.local_steps=2", "device=cpu",
                                    "federation.secagg.mode=never", "tasks.test_fraction=0"])
    model = initial_ssl_model(plan)
    keys = federated_keys(model, ssl_head_stays_local(plan))  # the token MAE's decoder stays
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    node = FedCMRClient(tmp_path / "store", "cpu,cpu", 0, context)

    # Execute
    arrays, weight, metrics = node.fit(state_dict_to_arrays(model.state_dict(), keys),
                                       {PLAN_KEY: config_to_yaml(plan), PHASE_KEY: PRETRAIN, ROUND_KEY: 1})

    # Assert: the local steps ran on both devices (each rank its own batches)
    assert metrics["steps"] == 2 and metrics["images_seen"] == 2 * 2 * 2
    assert weight == 8 and len(arrays) == len(keys)
