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
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

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
    secagg_enabled,
    with_overrides,
)
from shared_model.encoders import get_preset
from shared_model.errors import UserError
from shared_model.finetune import SCRATCH_RECIPE, predict_all
from shared_model.phase_models import initial_ssl_model, initial_task_model
from shared_model.tasks import Task, TaskData, TaskKind, get_task
from shared_model.tasks.models import TaskModel
from shared_model.tasks.unet import build_unet
from shared_model.tasks.scoring import headline_metric
from shared_model.train import Span, make_generator, make_optimizer, pretrain_local, resolve_device
from shared_model.weights import load_safetensors, save_safetensors
from shared_model.wire import FINETUNE
from sim.results import (
    POOLED_SITE,
    Arm,
    ArmKind,
    Curve,
    FinetuneMode,
    FinetuneRow,
    Overlay,
    ScenarioInfo,
    ScenarioResults,
    SiteInfo,
    write_results,
)
from sim.runner import run_federation

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


class ScenarioError(UserError, RuntimeError):
    """A scenario that cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class Site:
    """A simulated site: what the results say about it, and its store."""

    info: SiteInfo
    store: Path

    @property
    def name(self) -> str:
        return self.info.name


@dataclass
class ArmResult:
    """A pretrained starting point: one encoder for all sites, or one per site (local)."""

    arm: Arm
    encoders: dict[str, Path] = field(default_factory=dict)  # site name or "all" -> file
    curves: list[Curve] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.arm.name

    def encoder_for(self, site: str) -> Path:
        return self.encoders.get(site) or self.encoders[POOLED_SITE]


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
            sites.append(Site(SiteInfo(simulated_site_name(i), "synthetic", str(entry.get("vendor", "")),
                                       entry.get("field_strength_t"), int(entry.get("subjects", 0))), store))
    for entry in cfg.sim.real_sites:
        entry, _, option = entry.partition("?")
        fmt, _, rest = entry.partition(":")
        path, _, labels = rest.partition(":")
        index = len(sites)
        store = simulated_site_store(out / "sites", index)
        group = option.partition("=")[2] if option else None
        ingest(IngestOptions(src=Path(path), store=store, spacing_mm=cfg.data.spacing_mm,
                             crop_px=cfg.data.crop_px, labels=Path(labels) if labels else None,
                             progress=False, exclude_patients=frozenset(cfg.sim.holdout_patients),
                             groups=frozenset({group}) if group else None), fmt)
        subjects = len({r.subject for r in LocalStore.open(store).manifest.series.values()})
        sites.append(Site(SiteInfo(simulated_site_name(index), fmt if fmt != "dicom" else "folder",
                                   subjects=subjects), store))
    return sites


def _over_all_sites(cfg: FedCMRConfig, sites: int) -> list[str]:
    """Overrides for one federation over every site of the scenario."""
    return [f"federation.min_sites={sites}", f"federation.min_replies={min(cfg.federation.min_replies, sites)}",
            f"sim.sites={sites}", "sim.real_sites=[]"]


# ---------------------------------------------------------------------------- pretraining


def federated_arm(cfg: FedCMRConfig, arm: FederatedArm, out: Path, sites: list[Site]) -> ArmResult:
    run_dir = out / "arms" / arm.name
    arm_cfg = with_overrides(cfg, [
        f"ssl.method={arm.method.value}", f"federation.secagg.mode={arm.secagg.value}",
        f"privacy.mode={arm.privacy.value}", f"privacy.noise_multiplier={arm.noise_multiplier}",
        f"ssl.dino.teacher={arm.teacher.value}", f"output.dir={run_dir}",
        "federation.finetune_rounds=0", *_over_all_sites(cfg, len(sites))], f"arm {arm.name}")
    start = time.perf_counter()
    outcome = run_federation(arm_cfg, out / "sites")
    if outcome.status != RunStatus.released:
        raise ScenarioError(f"federated arm {arm.name} ended '{outcome.status}': {outcome.detail}")
    records = [r for r in read_records(run_dir) if r["kind"] == RecordKind.fit]
    curves = []
    for r in records:
        curves.append(_curve(arm.name, r["round"], POOLED_SITE, r["aggregate"]))
        curves += [_curve(arm.name, r["round"], site, m) for site, m in r["sites"].items()]
    info = Arm(name=arm.name, kind=ArmKind.federated, method=arm.method, secagg=secagg_enabled(arm_cfg),
               dp_mode=arm.privacy, epsilon=_arm_epsilon(run_dir, arm_cfg),
               teacher=arm.teacher if arm.method == SSLMethod.dino else None,
               rounds=cfg.federation.rounds, seconds=round(time.perf_counter() - start, 1),
               images_seen=int(sum(m.get("images_seen", 0) for r in records for m in r["sites"].values())))
    return ArmResult(info, {POOLED_SITE: run_dir / "release" / ENCODER_FILE}, curves)


def _arm_epsilon(run_dir: Path, cfg: FedCMRConfig) -> float | None:
    if cfg.privacy.mode == PrivacyMode.none:
        return None
    from server.ledger import PrivacyLedger
    from server.state import load_state

    ledger = PrivacyLedger.from_json(load_state(run_dir, cfg).ledger_json)
    return round(ledger.max_epsilon(), 4)


def _curve(arm: str, round_: int, site: str, metrics: Mapping[str, object]) -> Curve:
    """A round's pretraining numbers as the server recorded them (allow-listed metrics)."""
    def number(key: str) -> float | None:
        value = metrics.get(key)
        return float(value) if isinstance(value, int | float) else None

    return Curve(arm=arm, round=round_, site=site, loss=number("loss_mean"),
                 embed_std=number("embed_std"), teacher_entropy=number("teacher_entropy"))


@dataclass(frozen=True)
class PretrainJob:
    """One non-federated pretraining, run in a worker process."""

    config_yaml: str
    stores: tuple[str, ...]  # one store (local) or every site's (central)
    steps_per_round: int
    arm: str
    site: str  # the site, or "all" for the pooled images
    path: str  # where the encoder goes


def _pretrain_alone(cfg: FedCMRConfig, images: torch.Tensor, job: PretrainJob) -> list[Curve]:
    """Plain (non-federated) pretraining with the federated schedule: rounds x steps."""
    model = initial_ssl_model(cfg)
    optimizer = make_optimizer(model, cfg.ssl.lr, cfg.ssl.weight_decay)
    rounds = cfg.federation.rounds
    curves = []
    for r in range(rounds):
        result = pretrain_local(model, images, steps=job.steps_per_round, batch_size=cfg.ssl.batch_size,
                                optimizer=optimizer, gen=make_generator(cfg.seed, job.arm, job.site, r),
                                device=resolve_device(cfg.device), base_lr=cfg.ssl.lr,
                                span=Span(r / rounds, (r + 1) / rounds))
        curves.append(Curve(arm=job.arm, round=r + 1, site=job.site, loss=result.loss_mean,
                            embed_std=result.stats.get("embed_std"),
                            teacher_entropy=result.stats.get("teacher_entropy")))
    save_safetensors(Path(job.path), model.encoder.state_dict())
    return curves


def _pretrain_job(job: PretrainJob) -> list[Curve]:
    cfg = config_from_yaml(job.config_yaml, "scenario")
    size = get_preset(cfg.model.preset).image_size
    pooled = []
    for store_path in job.stores:
        store = LocalStore.open(Path(store_path))
        pooled.append(ssl_frames(store, size, store_holdout(store, cfg)))
    return _pretrain_alone(cfg, torch.cat(pooled), job)


def baseline_arms(cfg: FedCMRConfig, out: Path, sites: list[Site]) -> dict[str, ArmResult]:
    """Local-only (one encoder per site) and centralised pretraining, in parallel processes."""
    method = cfg.ssl.method
    text = config_to_yaml(cfg)
    jobs: list[tuple[ArmKind, PretrainJob]] = []
    if "local" in cfg.sim.baselines:
        name = f"local-{method.value}"
        jobs += [(ArmKind.local, PretrainJob(text, (str(s.store),), cfg.ssl.local_steps, name, s.name,
                                             str(out / "arms" / name / f"{s.name}.safetensors")))
                 for s in sites]
    if "central" in cfg.sim.baselines:
        name = f"central-{method.value}"
        jobs.append((ArmKind.central, PretrainJob(text, tuple(str(s.store) for s in sites),
                                                  cfg.ssl.local_steps * len(sites), name, POOLED_SITE,
                                                  str(out / "arms" / name / "encoder.safetensors"))))
    start = time.perf_counter()
    outcomes = parallel_map(_pretrain_job, [job for _, job in jobs], label="local and central pretraining")
    seconds = round(time.perf_counter() - start, 1)
    arms: dict[str, ArmResult] = {}
    for (kind, job), curves in zip(jobs, outcomes, strict=True):
        arm = arms.setdefault(job.arm, ArmResult(Arm(name=job.arm, kind=kind, method=method,
                                                     rounds=cfg.federation.rounds, seconds=seconds)))
        arm.encoders[job.site] = Path(job.path)
        arm.curves += curves
    return arms


def parallel_map(fn: Callable[[J], R], jobs: Sequence[J], workers: int = 2, label: str = "") -> list[R]:
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
        outputs: Iterator[R] = map(fn, jobs)
        if len(jobs) > 1 and workers > 1:
            outputs = stack.enter_context(ProcessPoolExecutor(
                min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                initializer=torch.set_num_threads, initargs=(1,))).map(fn, jobs)
        results = []
        for result in outputs:
            results.append(result)
            progress.advance(bar)
        return results


def scratch_arm(cfg: FedCMRConfig, out: Path) -> ArmResult:
    """No pretraining: the encoder every pretraining arm starts from."""
    path = save_safetensors(out / "arms" / "scratch" / "encoder.safetensors",
                            initial_ssl_model(cfg).encoder.state_dict())
    return ArmResult(Arm(name="scratch", kind=ArmKind.scratch, rounds=0, seconds=0.0), {POOLED_SITE: path})


# ---------------------------------------------------------------------------- fine-tuning


def _task_model(cfg: FedCMRConfig, task: Task, encoder_path: Path) -> TaskModel:
    model = initial_task_model(cfg, task)
    model.encoder.load_state_dict(load_safetensors(encoder_path)[0])
    return model


@dataclass(frozen=True)
class LocalFinetuneJob:
    """One site x task x budget x seed, fine-tuned at the site alone from every arm's encoder."""

    config_yaml: str
    site: str
    store: str
    task: str
    budget: int
    seed: int
    encoders: Mapping[str, str]  # arm -> encoder file
    overlay_arm: str  # the arm whose first prediction is kept as an overlay ("" = none)
    out: str


def _local_job(job: LocalFinetuneJob) -> tuple[list[FinetuneRow], list[Overlay]]:
    """One local fine-tuning job (a worker process): its rows and overlays."""
    cfg = config_from_yaml(job.config_yaml, "scenario")
    task = get_task(job.task)
    store = LocalStore.open(Path(job.store))
    steps = cfg.tasks.steps * max(1, cfg.federation.finetune_rounds)  # the federated compute
    plan = with_overrides(cfg, [f"seed={job.seed}", f"tasks.label_budget={job.budget}", f"tasks.steps={steps}"])
    train, test = site_task_split(store, plan, task)
    if len(train) == 0 or len(test) == 0:
        return [], []
    device = resolve_device(cfg.device)
    rows, overlays = [], []
    for arm, encoder in job.encoders.items():
        if not encoder:  # the supervised U-Net: dense tasks only, nothing pretrained
            if task.kind not in (TaskKind.segmentation, TaskKind.landmarks):
                continue
            model: torch.nn.Module = build_unet(task)
        else:
            model = _task_model(plan, task, Path(encoder))
        arm_plan = with_overrides(plan, list(SCRATCH_RECIPE)) if arm == "scratch" else plan
        _, metrics = finetune_at_node(model, task, train, test, arm_plan, device=device,
                                      gen=make_generator(job.seed, "finetune", job.site, job.task))
        rows.append(_row(arm, task, job.budget, job.seed, FinetuneMode.local, job.site, metrics,
                         tuple(sorted(set(test.subjects)))))
        if arm == job.overlay_arm:
            overlays += _overlay(model, task, test, Path(job.out), arm, job.site, device)
    return rows, overlays


def local_finetune(cfg: FedCMRConfig, arms: dict[str, ArmResult], sites: list[Site],
                   out: Path) -> tuple[list[FinetuneRow], list[Overlay]]:
    """Every arm x task x budget x seed x site, fine-tuned at the site alone; plus overlays."""
    fm = next((a.name for a in arms.values() if a.arm.kind == ArmKind.federated), "")
    text = config_to_yaml(cfg)
    jobs = []
    for site in sites:
        for task in cfg.tasks.names:
            for budget in cfg.sim.label_budgets:
                for seed in cfg.sim.seeds:
                    overlay = (fm if cfg.sim.overlays and site is sites[0] and seed == cfg.sim.seeds[0]
                               and budget == min(cfg.sim.label_budgets) else "")
                    encoders = {name: "" if arm.arm.kind == ArmKind.supervised
                                else str(arm.encoder_for(site.name)) for name, arm in arms.items()
                                if not cfg.sim.local_finetune_arms or name in cfg.sim.local_finetune_arms}
                    jobs.append(LocalFinetuneJob(text, site.name, str(site.store), task, budget, seed,
                                                 encoders, overlay, str(out)))
    rows: list[FinetuneRow] = []
    overlays: list[Overlay] = []
    for job_rows, job_overlays in parallel_map(_local_job, jobs, label="local fine-tuning"):
        rows += job_rows
        overlays += job_overlays
    return rows, overlays


def _row(arm: str, task: Task, budget: int, seed: int, mode: FinetuneMode, site: str,
         metrics: Mapping[str, float], test_subjects: tuple[str, ...] = ()) -> FinetuneRow:
    """One evaluation; ``test_subjects`` are the held-out subjects' store pseudonyms."""
    metric = headline_metric(task)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return FinetuneRow(arm=arm, task=task.name, budget=budget, seed=seed, mode=mode, site=site,
                       metric=metric, value=clean.get(metric), metrics=clean,
                       test_samples=int(metrics.get("samples", 0)), test_subjects=test_subjects)


def _overlay(model: torch.nn.Module, task: Task, test: TaskData, out: Path, arm: str, site: str,
             device: torch.device) -> list[Overlay]:
    if task.kind not in (TaskKind.segmentation, TaskKind.landmarks):
        return []
    pred = predict_all(model, task, test.inputs[:1], device)[0]
    image = test.inputs[0, 0].numpy().clip(0, 1)
    path = out / "overlays" / f"{task.name}-{site}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray]
    if task.kind == TaskKind.segmentation:
        values = np.array([0] + [v[0] for _, v in task.classes], dtype=np.uint8)  # type: ignore[attr-defined]
        arrays = {"true_mask": values[test.targets[0].numpy()], "pred_mask": values[pred.numpy()]}
    else:
        assert test.valid is not None  # landmark data always say which points are labelled
        valid = test.valid[0].numpy()
        names = np.array([n for n, ok in zip(task.landmarks, valid) if ok], dtype="U32")  # type: ignore[attr-defined]
        arrays = {"true_points": test.targets[0].numpy()[valid], "pred_points": pred.numpy()[valid],
                  "names": names}
    with open(path, "wb") as handle:
        # numeric and text arrays only (np.load reads them back with allow_pickle=False); numpy's
        # stub would let **arrays fill savez's allow_pickle flag
        np.savez(handle, image=image.astype(np.float32), spacing_mm=np.float32(test.spacing_mm),
                 **arrays)  # type: ignore[arg-type]
    return [Overlay(task=task.name, arm=arm, site=site, file=str(path.relative_to(out)))]


@dataclass(frozen=True)
class FederatedFinetuneJob:
    """One phase of the scenario's federated fine-tuning run."""

    arm: str
    task: str
    budget: int
    seed: int

    @property
    def label(self) -> str:
        """The phase's unique label in the run (its records and checkpoint carry it)."""
        return f"ft|{self.arm}|{self.task}|{self.budget}|{self.seed}"


def federated_finetune(cfg: FedCMRConfig, arms: dict[str, ArmResult], sites: list[Site],
                       out: Path) -> list[FinetuneRow]:
    """All sites fine-tune together: one Flower run, one phase per arm x task x budget x seed."""
    names = cfg.sim.federated_finetune_arms or [
        *(a.name for a in arms.values() if a.arm.kind == ArmKind.federated)][:1] + (
        ["scratch"] if "scratch" in arms else [])
    jobs: dict[str, FederatedFinetuneJob] = {}
    phases = []
    for name in names:
        if name not in arms or POOLED_SITE not in arms[name].encoders:
            raise ScenarioError(f"sim.federated_finetune_arms: '{name}' is not an arm with one "
                                f"encoder for all sites (arms: {', '.join(arms)})")
        for task in cfg.tasks.names:
            for budget in cfg.sim.federated_finetune_budgets or cfg.sim.label_budgets:
                for seed in cfg.sim.seeds:
                    job = FederatedFinetuneJob(name, task, budget, seed)
                    jobs[job.label] = job
                    phases.append(PhaseSpec(FINETUNE, task, max(1, cfg.federation.finetune_rounds), job.label,
                                            (f"seed={seed}", f"tasks.label_budget={budget}",
                                             *(SCRATCH_RECIPE if name == "scratch" else ())),
                                            str(arms[name].encoders[POOLED_SITE])))
    run_dir = out / "arms" / "federated-finetune"
    ft_cfg = with_overrides(cfg, [f"output.dir={run_dir}", *_over_all_sites(cfg, len(sites)),
                                  "privacy.mode=none"])
    outcome = run_federation(ft_cfg, out / "sites", phases=phases, release=False)
    if outcome.status != RunStatus.finished:
        raise ScenarioError(f"federated fine-tuning ended '{outcome.status}': {outcome.detail}")
    last: dict[str, dict] = {}
    for record in read_records(run_dir):
        if record["kind"] == RecordKind.evaluate:
            last[record["phase"]] = record
    rows = []
    for label, record in last.items():
        job = jobs[label]
        spec = get_task(job.task)
        rows.append(_row(job.arm, spec, job.budget, job.seed, FinetuneMode.federated, POOLED_SITE,
                         dict(record["aggregate"])))
        rows += [_row(job.arm, spec, job.budget, job.seed, FinetuneMode.federated, site, dict(m))
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
        if "unet" in cfg.sim.baselines:
            arms["unet"] = ArmResult(Arm(name="unet", kind=ArmKind.supervised, rounds=0, seconds=0.0),
                                     {POOLED_SITE: Path("")})

    _timed(timings, "pretraining", pretrain)
    local_rows, overlays = _timed(timings, "finetuning_local", lambda: local_finetune(cfg, arms, sites, out))
    fed_rows = _timed(timings, "finetuning_federated",
                      lambda: federated_finetune(cfg, arms, sites, out) if cfg.sim.federated_finetune else [])
    timings["total"] = round(time.perf_counter() - start, 1)
    results = ScenarioResults(
        scenario=ScenarioInfo(name=out.name, config="config.yaml", sites=tuple(s.info for s in sites),
                              tasks=tuple(cfg.tasks.names), label_budgets=tuple(cfg.sim.label_budgets),
                              seeds=tuple(cfg.sim.seeds), arms=tuple(arms)),
        timings_s=timings, arms={name: a.arm for name, a in arms.items()},
        curves=tuple(c for a in arms.values() for c in a.curves),
        finetune=tuple(local_rows + fed_rows), overlays=tuple(overlays))
    write_results(out, results)
    return write_report(out, results)


def _timed(timings: dict[str, float], name: str, fn: Callable[[], R]) -> R:
    start = time.perf_counter()
    value = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    return value
