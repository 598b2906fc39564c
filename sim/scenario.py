"""A simulation scenario end to end: cohort -> intake -> pretraining arms -> few-shot fine-tuning
-> results.json -> report.

Sites are ordinary FedCMR nodes: a synthetic cohort is written as DICOM and ingested by the same
intake a hospital runs (real folders too, one site each), and federated arms run the same
ServerApp/ClientApp as a deployment on Flower's simulation engine.

Arms (see ``sim.federated_arms`` and ``sim.baselines``):

- federated: SSL pretraining over all sites, ``federation.rounds`` x ``ssl.local_steps`` steps
  per site (method, SecAgg+, DP and DINO teacher handling per arm);
- local: each site pretrains alone for the same steps (one encoder per site);
- central: one model on the pooled images for as many steps as all sites together (the upper
  bound, same total compute);
- scratch: no pretraining.

Fine-tuning, for every task x label budget x seed: ``local`` mode (each site fine-tunes alone on
its k labelled subjects and is evaluated on its own held-out subjects) and ``federated`` mode
(all sites fine-tune together for ``federation.finetune_rounds`` rounds; evaluated at every site).
Held-out subjects (``tasks.split_seed``) are never used for pretraining or fine-tuning.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.federated import site_task_split, ssl_frames, store_holdout
from client.finetune import finetune_at_node
from client.node_settings import simulated_site_name, simulated_site_store
from client.store import LocalStore
from server.app import PhaseSpec
from server.metrics import RecordKind, read_records
from server.run_status import RunStatus
from shared_model.bundle import ENCODER_FILE
from shared_model.config import (
    FedCMRConfig,
    FederatedArm,
    PrivacyMode,
    SSLMethod,
    config_from_yaml,
    config_to_yaml,
    save_resolved_config,
    with_overrides,
)
from shared_model.encoders import get_preset
from shared_model.errors import UserError
from shared_model.files import atomic_write_text
from shared_model.finetune import predict_all
from shared_model.phase_models import initial_ssl_model, initial_task_model
from shared_model.tasks import Task, TaskData, TaskKind, get_task
from shared_model.tasks.scoring import headline_metric
from shared_model.train import Span, make_generator, make_optimizer, pretrain_local, resolve_device
from shared_model.weights import load_safetensors, save_safetensors
from sim.runner import run_federation

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


class ScenarioError(UserError, RuntimeError):
    """A scenario that cannot run as configured; the message says what to change."""


@dataclass
class Site:
    name: str
    store: Path
    source: str
    vendor: str = ""
    field_strength_t: float | None = None
    subjects: int = 0


@dataclass
class ArmResult:
    """A pretrained starting point: one encoder for all sites, or one per site (local)."""

    name: str
    info: dict
    encoders: dict[str, Path] = field(default_factory=dict)  # site name or "all" -> file
    curves: list[dict] = field(default_factory=list)

    def encoder_for(self, site: str) -> Path:
        return self.encoders.get(site) or self.encoders["all"]


# ---------------------------------------------------------------------------- sites


def prepare_sites(cfg: FedCMRConfig, out: Path) -> list[Site]:
    """Write the synthetic cohort and ingest every site into its store (both idempotent)."""
    from client.intake.pipeline import IngestOptions, ingest
    from sim.cohort import write_cohort
    from sim.study import StudyOptions

    sites: list[Site] = []
    cohort = out / "cohort"
    if cfg.sim.sites > 0:
        if not (cohort / "cohort.json").is_file():
            write_cohort(cohort, cfg.sim.sites, cfg.sim.subjects_per_site, cfg.seed,
                         StudyOptions(cine_phases=cfg.sim.cine_phases,
                                      max_sax_slices=cfg.sim.max_sax_slices), workers=2)
        meta = json.loads((cohort / "cohort.json").read_text())["sites"]
        for i, entry in enumerate(meta):
            store = simulated_site_store(out / "sites", i)
            ingest(IngestOptions(src=cohort / f"site-{i}" / "dicom", store=store,
                                 spacing_mm=cfg.data.spacing_mm, crop_px=cfg.data.crop_px,
                                 labels=cohort / f"site-{i}" / "labels", progress=False))
            sites.append(Site(simulated_site_name(i), store, "synthetic", str(entry.get("vendor", "")),
                              entry.get("field_strength_t"), int(entry.get("subjects", 0))))
    for j, entry in enumerate(cfg.sim.real_sites):
        fmt, _, rest = entry.partition(":")
        path, _, labels = rest.partition(":")
        index = len(sites)
        store = simulated_site_store(out / "sites", index)
        ingest(IngestOptions(src=Path(path), store=store, spacing_mm=cfg.data.spacing_mm,
                             crop_px=cfg.data.crop_px, labels=Path(labels) if labels else None,
                             progress=False), fmt)
        subjects = len({r.subject for r in LocalStore.open(store).manifest.series.values()})
        sites.append(Site(simulated_site_name(index), store, fmt if fmt != "dicom" else "folder",
                          subjects=subjects))
    return sites


# ---------------------------------------------------------------------------- pretraining


def federated_arm(cfg: FedCMRConfig, arm: FederatedArm, out: Path, sites: list[Site]) -> ArmResult:
    run_dir = out / "arms" / arm.name
    n = len(sites)
    arm_cfg = with_overrides(cfg, [
        f"ssl.method={arm.method.value}", f"federation.secagg.mode={arm.secagg.value}",
        f"privacy.mode={arm.privacy.value}", f"privacy.noise_multiplier={arm.noise_multiplier}",
        f"ssl.dino.teacher={arm.teacher.value}", f"output.dir={run_dir}",
        "federation.finetune_rounds=0", f"federation.min_sites={n}",
        f"federation.min_replies={min(cfg.federation.min_replies, n)}", f"sim.sites={n}",
        "sim.real_sites=[]"], f"arm {arm.name}")
    start = time.perf_counter()
    outcome = run_federation(arm_cfg, out / "sites")
    if outcome.status != RunStatus.released:
        raise ScenarioError(f"federated arm {arm.name} ended '{outcome.status}': {outcome.detail}")
    records = [r for r in read_records(run_dir) if r["kind"] == RecordKind.fit]
    curves = []
    for r in records:
        curves.append({"arm": arm.name, "round": r["round"], "site": "all",
                       **_curve_numbers(r["aggregate"])})
        curves += [{"arm": arm.name, "round": r["round"], "site": site, **_curve_numbers(m)}
                   for site, m in r["sites"].items()]
    info = {"kind": "federated", "method": arm.method.value, "secagg": _secagg_on(arm_cfg),
            "dp_mode": arm.privacy.value, "epsilon": _arm_epsilon(run_dir, arm_cfg),
            "teacher": arm.teacher.value if arm.method == SSLMethod.dino else None,
            "rounds": cfg.federation.rounds, "seconds": round(time.perf_counter() - start, 1),
            "images_seen": int(sum(m.get("images_seen", 0) for r in records for m in r["sites"].values()))}
    return ArmResult(arm.name, info, {"all": run_dir / "release" / ENCODER_FILE}, curves)


def _secagg_on(cfg: FedCMRConfig) -> bool:
    from shared_model.config import secagg_enabled

    return secagg_enabled(cfg)


def _arm_epsilon(run_dir: Path, cfg: FedCMRConfig) -> float | None:
    if cfg.privacy.mode == PrivacyMode.none:
        return None
    from server.ledger import PrivacyLedger
    from server.state import load_state

    ledger = PrivacyLedger.from_json(load_state(run_dir, cfg).ledger_json)
    return round(ledger.max_epsilon(), 4)


def _curve_numbers(metrics: dict) -> dict:
    out = {}
    if "loss_mean" in metrics:
        out["loss"] = float(metrics["loss_mean"])
    for key in ("embed_std", "teacher_entropy"):
        if key in metrics:
            out[key] = float(metrics[key])
    return out


def _pretrain_alone(cfg: FedCMRConfig, images: torch.Tensor, steps_per_round: int, arm: str,
                    site: str, path: Path) -> tuple[Path, list[dict]]:
    """Plain (non-federated) pretraining with the federated schedule: rounds x steps."""
    model = initial_ssl_model(cfg)
    optimizer = make_optimizer(model, cfg.ssl.lr, cfg.ssl.weight_decay)
    rounds = cfg.federation.rounds
    curves = []
    for r in range(rounds):
        result = pretrain_local(model, images, steps=steps_per_round, batch_size=cfg.ssl.batch_size,
                                optimizer=optimizer, gen=make_generator(cfg.seed, arm, site, r),
                                device=resolve_device(cfg.device), base_lr=cfg.ssl.lr,
                                span=Span(r / rounds, (r + 1) / rounds))
        curves.append({"arm": arm, "round": r + 1, "site": site, "loss": result.loss_mean,
                       **result.stats})
    save_safetensors(path, model.encoder.state_dict())
    return path, curves


def _pretrain_job(job: tuple[str, list[str], int, str, str, str]) -> tuple[str, list[dict]]:
    """One non-federated pretraining (a worker process): config, stores, steps, arm, site, file."""
    config_yaml, stores, steps_per_round, arm, site, path = job
    cfg = config_from_yaml(config_yaml, "scenario")
    size = get_preset(cfg.model.preset).image_size
    pooled = []
    for store_path in stores:
        store = LocalStore.open(Path(store_path))
        pooled.append(ssl_frames(store, size, store_holdout(store, cfg)))
    _, curves = _pretrain_alone(cfg, torch.cat(pooled), steps_per_round, arm, site, Path(path))
    return path, curves


def baseline_arms(cfg: FedCMRConfig, out: Path, sites: list[Site]) -> dict[str, ArmResult]:
    """Local-only (one encoder per site) and centralised pretraining, in parallel processes."""
    method = cfg.ssl.method.value
    info = {"method": method, "secagg": False, "dp_mode": "none", "epsilon": None, "teacher": None,
            "rounds": cfg.federation.rounds}
    jobs: dict[str, list[tuple]] = {}
    text = config_to_yaml(cfg)
    if "local" in cfg.sim.baselines:
        name = f"local-{method}"
        jobs[name] = [(text, [str(s.store)], cfg.ssl.local_steps, name, s.name,
                       str(out / "arms" / name / f"{s.name}.safetensors")) for s in sites]
    if "central" in cfg.sim.baselines:
        name = f"central-{method}"
        jobs[name] = [(text, [str(s.store) for s in sites], cfg.ssl.local_steps * len(sites),
                       name, "all", str(out / "arms" / name / "encoder.safetensors"))]
    flat = [(name, job) for name, group in jobs.items() for job in group]
    start = time.perf_counter()
    outcomes = parallel_map(_pretrain_job, [job for _, job in flat], label="local and central pretraining")
    arms: dict[str, ArmResult] = {}
    for (name, job), (path, curves) in zip(flat, outcomes, strict=True):
        kind = name.split("-", 1)[0]
        arm = arms.setdefault(name, ArmResult(name, {"kind": kind, **info}))
        arm.encoders[job[4]] = Path(path)
        arm.curves += curves
    for arm in arms.values():
        arm.info["seconds"] = round(time.perf_counter() - start, 1)
    return arms


def parallel_map(fn, jobs: list, workers: int = 2, label: str = "") -> list:  # noqa: ANN001
    """``fn`` over ``jobs`` in separate single-threaded processes (spawned: no forked OpenMP);
    with ``label``, a progress bar on the console counts finished jobs."""
    import contextlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), disable=not label)
    with contextlib.ExitStack() as stack:
        stack.enter_context(progress)
        bar = progress.add_task(label, total=len(jobs))
        mapper = map
        if len(jobs) > 1 and workers > 1:
            mapper = stack.enter_context(ProcessPoolExecutor(
                min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                initializer=torch.set_num_threads, initargs=(1,))).map
        results = []
        for result in mapper(fn, jobs):
            results.append(result)
            progress.advance(bar)
        return results


def scratch_arm(cfg: FedCMRConfig, out: Path) -> ArmResult:
    """No pretraining: the encoder every pretraining arm starts from."""
    path = save_safetensors(out / "arms" / "scratch" / "encoder.safetensors",
                            initial_ssl_model(cfg).encoder.state_dict())
    return ArmResult("scratch", {"kind": "scratch", "method": None, "secagg": False,
                                 "dp_mode": "none", "epsilon": None, "teacher": None,
                                 "rounds": 0, "seconds": 0.0}, {"all": path})


# ---------------------------------------------------------------------------- fine-tuning


def _task_model(cfg: FedCMRConfig, task: Task, encoder_path: Path) -> torch.nn.Module:
    model = initial_task_model(cfg, task)
    model.encoder.load_state_dict(load_safetensors(encoder_path)[0])
    return model


def _local_job(job: tuple) -> tuple[list[dict], list[dict]]:
    """One site x task x budget x seed, every arm (a worker process): rows and overlays."""
    config_yaml, site, store_path, task_name, budget, seed, encoders, overlay_arm, out = job
    cfg = config_from_yaml(config_yaml, "scenario")
    task = get_task(task_name)
    store = LocalStore.open(Path(store_path))
    steps = cfg.tasks.steps * max(1, cfg.federation.finetune_rounds)  # the federated compute
    plan = with_overrides(cfg, [f"seed={seed}", f"tasks.label_budget={budget}", f"tasks.steps={steps}"])
    train, test = site_task_split(store, plan, task)
    if len(train) == 0 or len(test) == 0:
        return [], []
    device = resolve_device(cfg.device)
    rows, overlays = [], []
    for arm, encoder in encoders.items():
        model = _task_model(plan, task, Path(encoder))
        _, metrics = finetune_at_node(model, task, train, test, plan, device=device,
                                      gen=make_generator(seed, "finetune", site, task_name))
        rows.append(_row(arm, task, budget, seed, "local", site, metrics, tuple(sorted(set(test.subjects)))))
        if arm == overlay_arm:
            overlays += _overlay(model, task, test, Path(out), arm, site, device)
    return rows, overlays


def local_finetune(cfg: FedCMRConfig, arms: dict[str, ArmResult], sites: list[Site],
                   out: Path) -> tuple[list[dict], list[dict]]:
    """Every arm x task x budget x seed x site, fine-tuned at the site alone; plus overlays."""
    fm = next((a.name for a in arms.values() if a.info["kind"] == "federated"), "")
    text = config_to_yaml(cfg)
    jobs = []
    for site in sites:
        for task in cfg.tasks.names:
            for budget in cfg.sim.label_budgets:
                for seed in cfg.sim.seeds:
                    overlay = (fm if cfg.sim.overlays and site is sites[0] and seed == cfg.sim.seeds[0]
                               and budget == min(cfg.sim.label_budgets) else "")
                    encoders = {name: str(arm.encoder_for(site.name)) for name, arm in arms.items()
                                if not cfg.sim.local_finetune_arms or name in cfg.sim.local_finetune_arms}
                    jobs.append((text, site.name, str(site.store), task, budget, seed, encoders,
                                 overlay, str(out)))
    rows, overlays = [], []
    for job_rows, job_overlays in parallel_map(_local_job, jobs, label="local fine-tuning"):
        rows += job_rows
        overlays += job_overlays
    return rows, overlays


def _row(arm: str, task: Task, budget: int, seed: int, mode: str, site: str, metrics: dict,
         test_subjects: tuple[str, ...] = ()) -> dict:
    """One evaluation; ``test_subjects`` are the held-out subjects' store pseudonyms."""
    metric = headline_metric(task)
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
    return {"arm": arm, "task": task.name, "budget": budget, "seed": seed, "mode": mode, "site": site,
            "metric": metric, "value": clean.get(metric), "metrics": clean,
            "test_samples": int(metrics.get("samples", 0)), "test_subjects": list(test_subjects)}


def _overlay(model: torch.nn.Module, task: Task, test: TaskData, out: Path, arm: str, site: str,
             device: torch.device) -> list[dict]:
    if task.kind not in (TaskKind.segmentation, TaskKind.landmarks):
        return []
    pred = predict_all(model, task, test.inputs[:1], device)[0]
    image = test.inputs[0, 0].numpy().clip(0, 1)
    path = out / "overlays" / f"{task.name}-{site}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    if task.kind == TaskKind.segmentation:
        values = np.array([0] + [v[0] for _, v in task.classes], dtype=np.uint8)  # type: ignore[attr-defined]
        arrays = {"true_mask": values[test.targets[0].numpy()], "pred_mask": values[pred.numpy()]}
    else:
        valid = test.valid[0].numpy()
        names = np.array([n for n, ok in zip(task.landmarks, valid) if ok], dtype="U32")  # type: ignore[attr-defined]
        arrays = {"true_points": test.targets[0].numpy()[valid], "pred_points": pred.numpy()[valid],
                  "names": names}
    with open(path, "wb") as handle:
        np.savez(handle, image=image.astype(np.float32), spacing_mm=np.float32(test.spacing_mm), **arrays)
    return [{"task": task.name, "arm": arm, "site": site, "file": str(path.relative_to(out))}]


def federated_finetune(cfg: FedCMRConfig, arms: dict[str, ArmResult], sites: list[Site],
                       out: Path) -> list[dict]:
    """All sites fine-tune together: one Flower run, one phase per arm x task x budget x seed."""
    names = cfg.sim.federated_finetune_arms or [
        *(a.name for a in arms.values() if a.info["kind"] == "federated")][:1] + (
        ["scratch"] if "scratch" in arms else [])
    phases = []
    for name in names:
        if name not in arms or "all" not in arms[name].encoders:
            raise ScenarioError(f"sim.federated_finetune_arms: '{name}' is not an arm with one "
                                f"encoder for all sites (arms: {', '.join(arms)})")
        for task in cfg.tasks.names:
            for budget in cfg.sim.federated_finetune_budgets or cfg.sim.label_budgets:
                for seed in cfg.sim.seeds:
                    phases.append(PhaseSpec("finetune", task, max(1, cfg.federation.finetune_rounds),
                                            f"ft|{name}|{task}|{budget}|{seed}",
                                            (f"seed={seed}", f"tasks.label_budget={budget}"),
                                            str(arms[name].encoders["all"])))
    run_dir = out / "arms" / "federated-finetune"
    n = len(sites)
    ft_cfg = with_overrides(cfg, [f"output.dir={run_dir}", f"federation.min_sites={n}",
                                  f"federation.min_replies={min(cfg.federation.min_replies, n)}",
                                  f"sim.sites={n}", "sim.real_sites=[]", "privacy.mode=none"])
    outcome = run_federation(ft_cfg, out / "sites", phases=phases, release=False)
    if outcome.status != RunStatus.finished:
        raise ScenarioError(f"federated fine-tuning ended '{outcome.status}': {outcome.detail}")
    last: dict[str, dict] = {}
    for record in read_records(run_dir):
        if record["kind"] == RecordKind.evaluate:
            last[record["phase"]] = record
    rows = []
    for label, record in last.items():
        _, arm, task_name, budget, seed = label.split("|")
        task = get_task(task_name)
        rows.append(_row(arm, task, int(budget), int(seed), "federated", "all", dict(record["aggregate"])))
        rows += [_row(arm, task, int(budget), int(seed), "federated", site, dict(m))
                 for site, m in record["sites"].items()]
    return rows


# ---------------------------------------------------------------------------- the whole run


def run_scenario(cfg: FedCMRConfig, out: Path) -> Path:
    """Run every stage and write results.json and the report; returns the report's path."""
    from sim.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    sites = _timed(timings, "sites", lambda: prepare_sites(cfg, out))
    arms: dict[str, ArmResult] = {}

    def pretrain() -> None:
        for arm in cfg.sim.federated_arms:
            arms[arm.name] = federated_arm(cfg, arm, out, sites)
        arms.update(baseline_arms(cfg, out, sites))
        if "scratch" in cfg.sim.baselines:
            arms["scratch"] = scratch_arm(cfg, out)

    _timed(timings, "pretraining", pretrain)
    local_rows, overlays = _timed(timings, "finetuning_local", lambda: local_finetune(cfg, arms, sites, out))
    fed_rows = _timed(timings, "finetuning_federated",
                      lambda: federated_finetune(cfg, arms, sites, out) if cfg.sim.federated_finetune else [])
    timings["total"] = round(time.perf_counter() - start, 1)
    results = {
        "format": "fedcmr-sim-results", "version": 1,
        "scenario": {"name": out.name, "config": "config.yaml",
                     "sites": [{"name": s.name, "source": s.source, "vendor": s.vendor,
                                "field_strength_t": s.field_strength_t, "subjects": s.subjects} for s in sites],
                     "tasks": list(cfg.tasks.names), "label_budgets": list(cfg.sim.label_budgets),
                     "seeds": list(cfg.sim.seeds), "arms": list(arms)},
        "timings_s": timings,
        "arms": {name: arm.info for name, arm in arms.items()},
        "curves": [c for arm in arms.values() for c in arm.curves],
        "finetune": local_rows + fed_rows,
        "overlays": overlays,
    }
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=1))
    return write_report(out, results)


def _timed(timings: dict[str, float], name: str, fn):  # noqa: ANN001, ANN202
    start = time.perf_counter()
    value = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    return value
