"""The release: a bundle a hospital can load (see shared_model.bundle) and its model card.

The model card states what the model is, how it was trained (phases, rounds, sites, aggregation,
SecAgg+, DP), aggregate-only data statistics (totals over sites, never per-site counts), the
per-task results of the last evaluation, and the privacy ledger.
"""

from __future__ import annotations

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
        f"patch {preset.patch_size} px, input {preset.image_size} px, 1 channel",
        f"- load with timm: `timm.create_model('{preset.timm_name}', in_chans=1, num_classes=0, "
        f"checkpoint_path='{ENCODER_FILE}')`" + ("" if not preset.timm_name.startswith("fedcmr_")
                                                 else " after `import shared_model.encoders`"),
        f"- task models: {', '.join(f'`{TASKS_DIR}/{t}.safetensors`' for t in sorted(state.tasks)) or 'none'}",
        "", "## Training", "",
        f"- self-supervised method: {cfg.ssl.method.value}; aggregation: "
        f"{cfg.federation.aggregator.value}; SecAgg+: {'on' if secagg_enabled(cfg) else 'off'}; "
        f"differential privacy: {cfg.privacy.mode.value}",
        f"- sites that contributed: {len(sites)}",
        _table(["phase", "rounds aggregated", "rounds skipped", "SecAgg+ rounds halted",
                "sites per round (mean)"], [
            [p, *(sum(r.status == s for r in rs) for s in (RoundStatus.aggregated, RoundStatus.skipped,
                                                            RoundStatus.halted)),
             _fmt(sum(len(r.sites) for r in rs) / len(rs))] for p, rs in phases.items()]),
        "", "## Data (totals over all sites)", "", _data_table(phases),
        "", "## Results (last evaluation, example-weighted over sites)", "", _results_table(records),
        "", "## Privacy ledger", "", _ledger_section(cfg, ledger),
        "", "## Intended use", "",
        "Research on cardiac MR image analysis: initialise and fine-tune models for the nine "
        "tasks of the FedCMR task registry. Not a medical device; outputs need expert review.",
    ]
    return "\n".join(parts) + "\n"


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
    return (f"delta = {ledger.delta:g}, accountant: {ledger.accountant}; budget: "
            f"{budget if budget is not None else 'none'}\n\n" + _table(header, rows))
