"""The real-patient few-shot protocol: foundation model vs scratch vs a supervised U-Net.

Real Sunnybrook CMR of 23 patients (``../shared/data``): 3 cine studies with blood-pool and
myocardium contours, 20 patients of four pathology groups with blood-pool masks. A fixed test
set is held out, the one the shipped foundation model never saw in pretraining (its config's
``sim.holdout_patients``): two patients per pathology group and one cine study. Training sets:

- 1 labelled patient: the cine study SCD0000101 (as the anchors' 1-study case)
- 3: both remaining cine studies + one more patient drawn per seed
- 10: both cine studies + 8 patients drawn per seed

Each arm trains through the node's own fine-tuning (``client.finetune.finetune_on_store``) with
the same wall-clock budget and augmentation: ``fm`` (the shipped model, or ``--fm BUNDLE``),
``scratch`` (the same architecture, randomly initialised) and ``unet`` (MONAI U-Net). Each
prediction runs on the raw test images the way ``fedcmr-client predict`` does (heart found
first, masks in the images' own geometry) and is scored there: blood-pool Dice on every test
frame (per group and overall), myocardium Dice on the cine frames that have it; mean and spread
over seeds, and each arm's ratio to the U-Net.

    python benchmarks/sunnybrook_fewshot.py [--budgets 1 3 10] [--seeds 3] [--seconds 120]
        [--arms fm scratch unet] [--fm models/<name>] [--fm-override KEY=VALUE ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from measures import Measure, write_measures
from sim.real_protocol import ARMS, frame_patients, held_out_tests, patient_store, run_arm, score, training_sets

# ------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120.0, help="fine-tuning budget per run")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--fm", type=Path, default=None, help="foundation-model bundle")
    parser.add_argument("--fm-override", action="append", default=[], metavar="KEY=VALUE",
                        help="the foundation model's fine-tuning as a user's override would set it "
                             "(repeatable; a tasks.mode replaces the built-in recipe)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from shared_model.bundle import load_bundle
    from shared_model.shipped import default_model

    torch.set_num_threads(2)
    fm = args.fm or default_model()
    fm_cfg = load_bundle(fm).config
    tests = held_out_tests(list(fm_cfg.sim.holdout_patients))
    pool = sorted(p for p in frame_patients() if p not in set(fm_cfg.sim.holdout_patients))
    work = args.work or Path(tempfile.mkdtemp(prefix="fewshot-"))
    started = time.monotonic()
    rows = []
    for budget in args.budgets:
        for seed, patients in enumerate(training_sets(budget, args.seeds, pool)):
            stores = [patient_store(work, p, fm_cfg) for p in patients]
            for arm in args.arms:
                out, report = run_arm(arm, stores, fm, work, seed, args.seconds,
                                      fm_overrides=args.fm_override)
                result = score(out, tests)
                rows.append({"arm": arm, "budget": budget, "seed": seed, "patients": patients,
                             "steps": report.steps, "seconds": round(report.seconds, 1),
                             **asdict(result)})
                print(f"  {arm:8s} budget {budget:2d} seed {seed}: blood {result.blood:.3f} "
                      f"myo {result.myo:.3f} ({report.steps} steps)", flush=True)
    print_table(rows, args, fm, tests.patients, time.monotonic() - started)
    if args.json:
        write_measures(args.json, "sunnybrook_fewshot", fewshot_measures(rows, args))
        args.json.with_suffix(".rows.json").write_text(json.dumps(
            {"rows": rows, "machine": machine(), "seconds_per_run": args.seconds}, indent=1))


def fewshot_measures(rows: list[dict], args: argparse.Namespace) -> list[Measure]:
    """Per budget: each arm's mean blood-pool and myocardium Dice, and the FM against the
    U-Net and scratch (difference of means in Dice points; goal: ahead of both, i.e. > 0; a
    difference, because an arm that never predicts a structure scores 0)."""
    out = []
    for budget in args.budgets:
        mean = {(arm, key): statistics.mean(r[key] for r in rows if r["budget"] == budget and r["arm"] == arm)
                for arm in args.arms for key in ("blood", "myo")}
        for arm in args.arms:
            out.append(Measure(f"{budget} labelled: {arm} blood-pool Dice", mean[arm, "blood"]))
            out.append(Measure(f"{budget} labelled: {arm} myocardium Dice", mean[arm, "myo"]))
        for other in ("unet", "scratch"):
            if "fm" in args.arms and other in args.arms:
                for key in ("blood", "myo"):
                    out.append(Measure(f"{budget} labelled: FM - {other} ({key}, Dice points)",
                                       100 * (mean["fm", key] - mean[other, key]), "> 0"))
    return out


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.python_version()}"


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def print_table(rows: list[dict], args: argparse.Namespace, fm: Path, tests: list[str],
                seconds: float) -> None:
    recipe = f" ({' '.join(args.fm_override)})" if args.fm_override else ""
    print(f"\nreal-patient few-shot protocol: FM {fm}{recipe}; {args.seconds:.0f} s fine-tuning per run; "
          f"{args.seeds} seeds; held-out test patients: {', '.join(tests)}; machine: {machine()}; "
          f"{seconds / 60:.1f} min")
    groups = sorted({g for r in rows for g in r["groups"]})
    header = ["labelled", "arm", "blood (all)", "myo (cine)", *groups, "blood / U-Net", "steps"]
    print(" | ".join(header))
    for budget in args.budgets:
        unet = [r["blood"] for r in rows if r["budget"] == budget and r["arm"] == "unet"]
        for arm in args.arms:
            mine = [r for r in rows if r["budget"] == budget and r["arm"] == arm]
            blood = [r["blood"] for r in mine]
            ratio = f"{statistics.mean(blood) / statistics.mean(unet):.3f}" if unet and blood else "-"
            cells = [str(budget), arm, _stat(blood), _stat([r["myo"] for r in mine]),
                     *[_stat([r["groups"][g] for r in mine if g in r["groups"]]) for g in groups],
                     ratio, str(round(statistics.mean(r["steps"] for r in mine)))]
            print(" | ".join(cells))


if __name__ == "__main__":
    main()
