"""The release: a bundle a hospital can load (see shared_model.bundle) and its model card.

The model card states what the model is, how it was trained (phases, rounds, sites, aggregation,
SecAgg+, DP), aggregate-only data statistics (totals over sites, never per-site counts), the
per-task results of the last evaluation, and the privacy ledger.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from server.ledger import PrivacyLedger
from server.metrics import RecordKind, RoundRecord, RoundStatus
from server.state import ServerState
from shared_model.bundle import DECODER_FILE, ENCODER_FILE, TASKS_DIR, save_encoder, save_task_model
from shared_model.config import FedCMRConfig, save_resolved_config, secagg_enabled
from shared_model.encoders import get_preset
from shared_model.files import atomic_write_text
from shared_model.tasks import get_task
from shared_model.weights import save_safetensors, select_prefix

RELEASE_DIR = "release"
MODEL_CARD = "model_card.md"


def write_release(run_dir: Path, cfg: FedCMRConfig, state: ServerState, ledger: PrivacyLedger,
                  records: list[RoundRecord]) -> Path:
    out = run_dir / RELEASE_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    if state.foundation:
        save_encoder(out / ENCODER_FILE, state.foundation, cfg)
    if state.decoder:
        save_safetensors(out / DECODER_FILE, state.decoder, metadata={"part": "dense decoder"})
    for task, weights in state.tasks.items():
        save_task_model(out / TASKS_DIR / f"{task}.safetensors", get_task(task), weights)
        if not state.foundation:  # no pretraining phase: the fine-tuned encoder stands in
            save_encoder(out / ENCODER_FILE, select_prefix(weights, "encoder."), cfg)
    atomic_write_text(out / MODEL_CARD, model_card(cfg, state, ledger, records))
    return out


def export_release(run_dir: Path, out: Path) -> Path:
    """The release bundle of a finished run, written anew into ``out`` from the run's
    checkpoint, metrics and ledger (e.g. to ship it, or after the model card changed)."""
    from server.metrics import read_records
    from server.state import load_state
    from shared_model.config import RESOLVED_CONFIG_NAME, load_config

    cfg = load_config(run_dir / RESOLVED_CONFIG_NAME)
    state = load_state(run_dir, cfg)
    ledger = PrivacyLedger.from_json(state.ledger_json) if state.ledger_json else PrivacyLedger(
        cfg.privacy.delta, cfg.privacy.accountant)
    records = [RoundRecord.from_json(r) for r in read_records(run_dir)]
    staging = write_release(out.parent / f".{out.name}.staging", cfg, state, ledger, records)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
    shutil.rmtree(staging.parent)
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(cfg: FedCMRConfig, state: ServerState, ledger: PrivacyLedger,
               records: list[RoundRecord]) -> str:
    preset = get_preset(cfg.model.preset)
    fits = [r for r in records if r.kind == RecordKind.fit]
    sites = sorted({s for r in fits for s in r.sites})
    phases: dict[str, list[RoundRecord]] = {}
    for r in fits:
        phases.setdefault(r.phase, []).append(r)
    parts = [
        "# FedCMR foundation model — model card", "",
        "A Vision Transformer encoder for cardiac MRI, pretrained self-supervised across sites "
        "that kept their images, with Flower.", "",
        "## Model", "",
        f"- encoder preset `{preset.name}`: ViT, width {preset.embed_dim}, depth {preset.depth}, "
        f"patch {preset.patch_size} px, input {preset.image_size} px, 1 channel"
        + (f", convolutional stem ({preset.stem_width} channels at "
           f"{'full resolution' if preset.stem_full_res else '1/2 of the input'})"
           if preset.stem == "conv" else ""),
        f"- input grid: {preset.image_size} px of "
        f"{cfg.data.spacing_mm * cfg.data.crop_px / preset.image_size:g} mm "
        f"({cfg.data.spacing_mm * cfg.data.crop_px:g} mm field of view)",
        f"- load with timm: `timm.create_model('{preset.timm_name}', in_chans=1, num_classes=0, "
        f"checkpoint_path='{ENCODER_FILE}')`" + ("" if not preset.timm_name.startswith("fedcmr_")
                                                 else " after `import shared_model.encoders`"),
        f"- task models: {', '.join(f'`{TASKS_DIR}/{t}.safetensors`' for t in sorted(state.tasks)) or 'none'}",
        *([f"- `{DECODER_FILE}`: the dense decoder pretrained with the encoder (MAE with "
           "ssl.mae.decoder=dense); segmentation and landmark heads start from it"]
          if state.decoder else []),
        "", "## Training", "",
        f"- self-supervised method: {cfg.ssl.method.value}; aggregation: "
        f"{cfg.federation.aggregator.value}; SecAgg+: {'on' if secagg_enabled(cfg) else 'off'}; "
        f"differential privacy: {cfg.privacy.mode.value}",
        f"- sites that contributed: {len(sites)}", "",
        _table(["phase", "rounds aggregated", "rounds skipped", "SecAgg+ rounds halted",
                "sites per round (mean)"], [
            [p, *(sum(r.status == s for r in rs) for s in (RoundStatus.aggregated, RoundStatus.skipped,
                                                            RoundStatus.halted)),
             _fmt(sum(len(r.sites) for r in rs) / len(rs))] for p, rs in phases.items()]),
        _compute_line(fits),
        "", "## Data (totals over all sites)", "", _data_table(phases),
        *(["", f"Held out of every site (a fixed test set, never pretrained on): "
           f"{', '.join(cfg.sim.holdout_patients)}."] if cfg.sim.holdout_patients else []),
        "", "## Health of the representation (last pretraining round)", "", _health_table(fits),
        "", "## Results (last evaluation, example-weighted over sites)", "", _results_table(records),
        "", "## Privacy ledger", "", _ledger_section(cfg, ledger),
        "", "## Intended use", "",
        "Research on cardiac MR image analysis: initialise and fine-tune models for the nine "
        "tasks of the FedCMR task registry. Not a medical device; outputs need expert review.",
    ]
    return "\n".join(parts) + "\n"


HEALTH_SIGNALS = ("loss_mean", "embed_std", "rankme", "teacher_entropy", "kl_to_center",
                  "probe_dice")


def _compute_line(fits: list[RoundRecord]) -> str:
    """Optimiser steps and images seen, summed over sites and rounds; wall time of the rounds."""
    steps = sum(float(m.get("steps", 0)) for r in fits for m in r.sites.values())
    images = sum(float(m.get("images_seen", 0)) for r in fits for m in r.sites.values())
    seconds = sum(r.seconds for r in fits)
    return (f"- compute: {steps:.0f} optimiser steps and {images:.0f} images seen over all sites "
            f"and rounds; {seconds / 60:.1f} min of wall time in the rounds")


def _health_table(fits: list[RoundRecord]) -> str:
    pretrain = [r for r in fits if r.status == RoundStatus.aggregated and r.phase == "pretrain"]
    if not pretrain:
        return "No pretraining round was aggregated."
    rows = [[k, _fmt(pretrain[-1].aggregate[k])] for k in HEALTH_SIGNALS if k in pretrain[-1].aggregate]
    probes = [r for r in pretrain if "probe_dice" in r.aggregate]
    if probes and probes[-1] is not pretrain[-1]:
        rows.append([f"probe_dice (round {probes[-1].round})", _fmt(probes[-1].aggregate["probe_dice"])])
    return _table(["signal", "value (example-weighted over sites)"], rows) if rows else "None reported."


def _data_table(phases: dict[str, list[RoundRecord]]) -> str:
    rows = []
    for phase, rs in phases.items():
        last = rs[-1]
        for key in ("num_images", "num_samples"):
            total = sum(int(m[key]) for m in last.sites.values() if key in m)
            if total:
                rows.append([phase, key.replace("num_", ""), total])
    return _table(["phase", "unit", "total in the last round"], rows) if rows else "No rounds completed."


def _results_table(records: list[RoundRecord]) -> str:
    last: dict[str, RoundRecord] = {}
    for r in records:
        if r.kind == RecordKind.evaluate:
            last[r.phase] = r
    if not last:
        return "No federated evaluation was run."
    rows = [[phase, key, _fmt(value)] for phase, r in last.items()
            for key, value in sorted(r.aggregate.items()) if isinstance(value, (int, float))]
    return _table(["task", "metric", "value"], rows)


def _ledger_section(cfg: FedCMRConfig, ledger: PrivacyLedger) -> str:
    summary = ledger.summary()
    if not summary:
        return "No differentially private mechanism was used (privacy.mode=none)."
    rows = [[site, *(_fmt(v) for v in eps.values())] for site, eps in summary.items()]
    header = ["site", *next(iter(summary.values())).keys()]
    budget = cfg.privacy.epsilon_budget
    noise = ("" if cfg.privacy.mode.value != "sample" else
             "; sample-level noise: " + ("seeded from the plan (a simulation setting: "
                                         "reproducible, and predictable to whoever knows the seed)"
                                         if cfg.privacy.reproducible_noise else
                                         "drawn at each node from OS entropy"))
    return (f"delta = {ledger.delta:g}, accountant: {ledger.accountant}; budget: "
            f"{budget if budget is not None else 'none'}{noise}\n\n" + _table(header, rows))
