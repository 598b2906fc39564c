"""Does pretraining pay off? FM-initialised vs scratch SAX segmentation with 1 and 2 labelled subjects.

Writes a synthetic cohort as DICOM, ingests it (the node's intake), pretrains the tiny preset
self-supervised on the unlabelled SAX cine frames of every subject that is not held out,
then fine-tunes cine SAX segmentation (LV blood pool, myocardium, RV) from the pretrained
encoder and from scratch with 1 and 2 labelled subjects, 3 seeds each, and prints mean Dice on
the held-out subjects and the gap (FM - scratch, in Dice points). Goal: >= 10 points at 1 subject.

    python benchmarks/fm_vs_scratch.py [--method mae|dino] [--pretrain-steps 1500]
        [--finetune-steps 150] [--preset vit-tiny-p8-64] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from client.federated import ssl_frames, task_series
from client.finetune import series_from_store
from client.intake.pipeline import IngestOptions, ingest
from client.store import LocalStore
from shared_model.config import load_config
from shared_model.encoders import build_encoder, get_preset
from shared_model.finetune import evaluate, finetune
from shared_model.phase_models import initial_ssl_model
from shared_model.tasks import get_task
from shared_model.tasks.models import build_task_model
from shared_model.train import Span, make_generator, make_optimizer, pretrain_local
from sim.cohort import write_cohort
from sim.study import StudyOptions


def build_stores(work: Path, sites: int, subjects: int, seed: int) -> list[LocalStore]:
    write_cohort(work / "cohort", sites, subjects, seed, StudyOptions(), workers=2)
    stores = []
    for i in range(sites):
        store = work / f"store-{i}"
        ingest(IngestOptions(src=work / "cohort" / f"site-{i}" / "dicom", store=store,
                             spacing_mm=1.5, crop_px=128,
                             labels=work / "cohort" / f"site-{i}" / "labels", progress=False))
        stores.append(LocalStore.open(store))
    return stores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mae", choices=["mae", "dino"])
    parser.add_argument("--preset", default="vit-tiny-p8-64")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--subjects-per-site", type=int, default=6)
    parser.add_argument("--test-subjects", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config("demo-cpu", [f"ssl.method={args.method}", f"model.preset={args.preset}",
                                   "device=cpu", "tasks.mode=full", f"tasks.steps={args.finetune_steps}",
                                   "tasks.batch_size=16", "tasks.decoder_width=16",
                                   "ssl.batch_size=32", "ssl.dino.out_dim=1024"])
    size = get_preset(args.preset).image_size
    work = Path(tempfile.mkdtemp(prefix="fedcmr-fm-"))
    start = time.perf_counter()
    stores = build_stores(work, args.sites, args.subjects_per_site, cfg.seed)
    task = get_task("sax_seg")
    series = [s for store in stores for s in series_from_store(store, task_series(store, task))]
    subjects = sorted({s.subject for s in series})
    order = [subjects[i] for i in torch.randperm(len(subjects), generator=make_generator(0, "bench")).tolist()]
    test_ids, pool = set(order[:args.test_subjects]), order[args.test_subjects:]
    print(f"cohort: {len(subjects)} subjects ({len(pool)} for training, {len(test_ids)} held out), "
          f"prepared in {time.perf_counter() - start:.0f} s")

    # Self-supervised pretraining on unlabelled SAX cine frames of the non-held-out subjects.
    frames = torch.cat([ssl_frames(store, size, sorted(test_ids)) for store in stores])
    ssl_model = initial_ssl_model(cfg)
    t0 = time.perf_counter()
    result = pretrain_local(ssl_model, frames, steps=args.pretrain_steps, batch_size=cfg.ssl.batch_size,
                            optimizer=make_optimizer(ssl_model, cfg.ssl.lr, cfg.ssl.weight_decay),
                            gen=make_generator(cfg.seed, "pretrain"), device=torch.device("cpu"),
                            base_lr=cfg.ssl.lr, span=Span())
    print(f"pretraining ({args.method}, {args.preset}): {args.pretrain_steps} steps on {len(frames)} "
          f"frames in {time.perf_counter() - t0:.0f} s; loss {result.loss_first:.3f} -> {result.loss_last:.3f}")
    pretrained = ssl_model.encoder.state_dict()

    data = task.build(series, size)
    test = data.subset([i for i, s in enumerate(data.subjects) if s in test_ids])
    table: dict[tuple[int, str], list[float]] = {}
    for budget in (1, 2):
        for seed in range(args.seeds):
            draw = [pool[i] for i in torch.randperm(len(pool), generator=make_generator(seed, "draw")).tolist()]
            train_ids = set(draw[:budget])
            train = data.subset([i for i, s in enumerate(data.subjects) if s in train_ids])
            for init in ("FM", "scratch"):
                torch.manual_seed(seed)
                encoder = build_encoder(args.preset)
                if init == "FM":
                    encoder.load_state_dict(pretrained)
                model = build_task_model(task, encoder, cfg.tasks.decoder_width)
                finetune(model, task, train, cfg.tasks, gen=make_generator(seed, "ft"), device=torch.device("cpu"))
                dice = evaluate(model, task, test, torch.device("cpu"))["dice_mean"]
                table.setdefault((budget, init), []).append(dice)
                print(f"  budget {budget} seed {seed} {init:7s} Dice {dice:.3f}", flush=True)
    print(f"\nSAX segmentation, mean Dice over {args.seeds} seeds on {len(test)} held-out frames "
          f"({len(test_ids)} subjects); fine-tuning {args.finetune_steps} steps, batch 16")
    print(f"{'labelled subjects':>18s} {'FM':>8s} {'scratch':>8s} {'gap (points)':>13s}")
    for budget in (1, 2):
        fm, scratch = statistics.mean(table[(budget, 'FM')]), statistics.mean(table[(budget, 'scratch')])
        print(f"{budget:>18d} {fm:8.3f} {scratch:8.3f} {100 * (fm - scratch):13.1f}")
    print(f"goal: FM ahead of scratch by >= 10 Dice points at 1 subject; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
