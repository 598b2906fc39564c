"""What a federated round costs beyond the training itself, with and without SecAgg+.

Runs the demo-cpu preset on 3 simulated sites (SecAgg+ needs 3; 2/3 of a CPU each, so all
three train at once on 2 cores) through Flower's simulation engine, plain and with SecAgg+
(3 shares, threshold 2), and prints per configuration:

(a) round wall time / the same local steps in plain PyTorch loops run the same way (3
    single-threaded processes at once, no Flower) — goal <= 1.10 plain, <= 1.5 with SecAgg+;
(b) bytes uploaded per site per round / the encoder's fp32 size — goal <= 1.05 plain,
    <= 2.05 with SecAgg+ (SecAgg+ uploads int64);
(c) where the round's time goes: the slowest site's own local steps (as the node timed them)
    against the plain loop, and the rest of the round (messages, Ray, the SecAgg+ protocol,
    aggregation, records), so that a miss of (a) says which side to work on.

Rounds after the first are used (the first includes Ray's start-up): their median round time
against the median of the plain loops run just before and just after that federation (2 runs
each side), so that a machine whose speed drifts over the minutes of the benchmark (a shared
2-core node does, by 20 % and more) moves both sides alike. Uploads are counted by a
mod on each node over every TRAIN reply (weights, SecAgg+ keys and shares, metrics).

    python benchmarks/federation_cost.py [--rounds 5] [--local-steps 40] [--ssl-head auto|aggregated|local]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from client.node_settings import simulated_site_store
from client.store import LocalStore
from server.metrics import RecordKind, read_records
from server.run_status import RunStatus
from shared_model.config import FederationConfig, load_config, ssl_head_stays_local
from shared_model.encoders import build_encoder, get_preset
from shared_model.phase_models import initial_ssl_model
from shared_model.ssl import build_ssl_model, federated_keys
from shared_model.train import Span, make_generator, make_optimizer, pretrain_local
from shared_model.weights import state_dict_nbytes
from sim.runner import run_federation
from sim.sites import site_spec, write_site_frames
from measures import Measure, write_measures

SITES = 3
# Ray fits floor(2 CPUs / this) actors: 0.666 lets all three train at once (0.667 would fit two).
CPUS_PER_SITE = 0.666


def upload_counter(path: Path):  # noqa: ANN201
    """A node mod appending the bytes of every TRAIN reply to ``path`` (one JSON line each)."""
    from flwr.app.message_type import MessageType

    def mod(msg, context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            content = reply.content
            size = sum(r.count_bytes() for r in content.array_records.values())
            size += sum(r.count_bytes() for r in content.config_records.values())
            size += sum(r.count_bytes() for r in content.metric_records.values())
            line = {"site": int(context.node_config["partition-id"]),
                    "round": int(msg.metadata.group_id), "bytes": int(size)}
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
        return reply

    return mod


def _one_site_loop(args: tuple[str, str, int]) -> float:
    """One site's local steps in a plain PyTorch loop, single-threaded (runs in a subprocess)."""
    config_yaml, store, seed = args
    from shared_model.config import config_from_yaml

    torch.set_num_threads(1)
    cfg = config_from_yaml(config_yaml, "benchmark")
    images = LocalStore.open(store).unlabeled_frames(get_preset(cfg.model.preset).image_size)
    model = initial_ssl_model(cfg)
    start = time.perf_counter()
    pretrain_local(model, images, steps=cfg.ssl.local_steps, batch_size=cfg.ssl.batch_size,
                   optimizer=make_optimizer(model, cfg.ssl.lr, cfg.ssl.weight_decay),
                   gen=make_generator(seed), device=torch.device("cpu"), base_lr=cfg.ssl.lr,
                   span=Span(0.0, 0.5))
    return time.perf_counter() - start


def plain_loop_seconds(cfg, sites_root: Path, sites: int, repeats: int = 2) -> list[float]:  # noqa: ANN001
    """Wall times of every site's local steps in plain loops, all sites at once (no Flower), one
    per repeat."""
    import multiprocessing

    from shared_model.config import config_to_yaml

    jobs = [(config_to_yaml(cfg), str(simulated_site_store(sites_root, i)), i) for i in range(sites)]
    context = multiprocessing.get_context("spawn")
    times = []
    for _ in range(repeats):
        with context.Pool(sites) as pool:
            times.append(max(pool.map(_one_site_loop, jobs)))
    return times


def federation_config(out: Path, secagg: bool, args: argparse.Namespace):  # noqa: ANN201
    """The demo-cpu federation measured (the plain loops run its local steps)."""
    return load_config("demo-cpu", [
        f"federation.rounds={args.rounds}", "federation.finetune_rounds=0", f"sim.sites={SITES}",
        f"federation.min_sites={SITES}", f"sim.cpus_per_site={CPUS_PER_SITE}",
        f"ssl.local_steps={args.local_steps}", "device=cpu", f"output.dir={out}",
        f"federation.ssl_head={args.ssl_head}", f"federation.secagg.mode={'always' if secagg else 'never'}"])


def measure(work: Path, sites_root: Path, secagg: bool, args: argparse.Namespace) -> dict:
    out = work / ("secagg" if secagg else "plain")
    counts = work / f"uploads-{'secagg' if secagg else 'plain'}.jsonl"
    cfg = federation_config(out, secagg, args)
    outcome = run_federation(cfg, sites_root, extra_mods=[upload_counter(counts)])
    assert outcome.status == RunStatus.released, outcome
    rounds = [r for r in read_records(out) if r["kind"] == RecordKind.fit and r["round"] > 1]
    uploads = [json.loads(line) for line in counts.read_text().splitlines()]
    per_site_round: dict[tuple[int, int], int] = {}
    for u in uploads:
        if u["round"] > 1:
            key = (u["site"], u["round"])
            per_site_round[key] = per_site_round.get(key, 0) + u["bytes"]
    # the slowest site's own training time in each round (its local steps, as the node timed
    # them): the rest of the round is Flower's (messages, Ray, aggregation, records)
    training = [max(s["seconds"] for s in r["sites"].values()) for r in rounds]
    return {"round_s": statistics.median(r["seconds"] for r in rounds),
            "training_s": statistics.median(training),
            "transport_s": statistics.median(r["seconds"] - t for r, t in zip(rounds, training)),
            "upload_bytes": statistics.median(per_site_round.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--ssl-head", default=FederationConfig.ssl_head.value, choices=["auto", "aggregated", "local"],
                        help="the SSL head federated or kept at the sites (default: the project's default)")
    parser.add_argument("--json", type=Path, default=None, help="write the measures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcmr-bench-"))
    sites_root = work / "sites"
    for index in range(SITES):
        write_site_frames(simulated_site_store(sites_root, index), site_spec(index, 1.5, 128), 96, seed=0)
    cfg = federation_config(work / "plain", False, args)
    results = {}
    for secagg in (False, True):
        before = plain_loop_seconds(cfg, sites_root, SITES)
        results[secagg] = measure(work, sites_root, secagg, args)
        after = plain_loop_seconds(cfg, sites_root, SITES)
        results[secagg]["reference"] = statistics.median([*before, *after])
        results[secagg]["reference_runs"] = [*before, *after]
    encoder_bytes = state_dict_nbytes(build_encoder(cfg.model.preset).state_dict())
    model = build_ssl_model(cfg)
    head_local = ssl_head_stays_local(cfg)
    federated_bytes = state_dict_nbytes({k: v for k, v in model.state_dict().items()
                                         if k in federated_keys(model, head_local)})
    print(f"demo-cpu ({cfg.model.preset}, {cfg.ssl.method.value}), {SITES} sites on 2 cores, "
          f"{args.local_steps} local steps of {cfg.ssl.batch_size} images, rounds 2..{args.rounds}, "
          f"SSL head {args.ssl_head}")
    for secagg in (False, True):
        runs = ", ".join(f"{t:.2f}" for t in results[secagg]["reference_runs"])
        print(f"plain PyTorch loops, same steps, {SITES} single-threaded processes at once, around the "
              f"{'SecAgg+' if secagg else 'plain'} federation: {results[secagg]['reference']:.2f} s "
              f"(median of {runs})")
    print(f"encoder fp32: {encoder_bytes / 1e6:.2f} MB; federated weights (encoder + "
          f"{'no head' if head_local else 'SSL head'}): {federated_bytes / 1e6:.2f} MB")
    print(f"{'':10s} {'round s':>8s} {'(a) time ratio':>15s} {'goal':>6s} {'upload MB':>10s} "
          f"{'(b) bytes ratio':>16s} {'goal':>6s}")
    for secagg, goal_t, goal_b in ((False, 1.10, 1.05), (True, 1.5, 2.05)):
        r = results[secagg]
        print(f"{'SecAgg+' if secagg else 'plain':10s} {r['round_s']:8.2f} "
              f"{r['round_s'] / r['reference']:15.3f} {goal_t:6.2f} {r['upload_bytes'] / 1e6:10.3f} "
              f"{r['upload_bytes'] / encoder_bytes:16.3f} {goal_b:6.2f}")
    print("where a round's time goes (medians over rounds 2..): the slowest site's own local "
          "steps, timed by the node / the plain loop; the rest of the round (messages, Ray, "
          "SecAgg+ protocol, aggregation, records)")
    for secagg in (False, True):
        r = results[secagg]
        print(f"{'SecAgg+' if secagg else 'plain':10s} local steps {r['training_s']:6.2f} s "
              f"({r['training_s'] / r['reference']:.3f} of the plain loop), rest {r['transport_s']:5.2f} s "
              f"({r['transport_s'] / r['reference']:.3f})")
    shipped = load_config("pretrain-real")
    shipped_model = build_ssl_model(shipped)
    shipped_bytes = state_dict_nbytes({k: v for k, v in shipped_model.state_dict().items()
                                       if k in federated_keys(shipped_model, ssl_head_stays_local(shipped))})
    print(f"the shipped model's pretraining (pretrain-real, {shipped.model.preset}, "
          f"{shipped.ssl.mae.decoder.value} MAE decoder {shipped.federation.ssl_head.value}): federated "
          f"weights / its encoder fp32 = "
          f"{shipped_bytes / state_dict_nbytes(build_encoder(shipped.model.preset).state_dict()):.3f} "
          "(weights only; the decoder is released, and segmentation starts from it)")
    print(f"(work folder: {work})")
    write_measures(args.json, "federation_cost", [
        m for secagg, goal_t, goal_b in ((False, 1.10, 1.05), (True, 1.5, 2.05)) for m in (
            Measure(f"round time / plain loop ({'SecAgg+' if secagg else 'plain'})",
                    results[secagg]["round_s"] / results[secagg]["reference"], f"<= {goal_t}"),
            Measure(f"upload per site-round / encoder fp32 ({'SecAgg+' if secagg else 'plain'})",
                    results[secagg]["upload_bytes"] / encoder_bytes, f"<= {goal_b}"))])


if __name__ == "__main__":
    main()
