"""The typed run configuration: one schema, a YAML preset, dotlist overrides, merged once.

Every entry point (the three CLIs, the Flower apps) calls :func:`load_config` at its edge and
passes the resulting :class:`FedCMRConfig` dataclass inward; nothing below the edge parses
configuration. A misspelled key or a value of the wrong type fails with :class:`ConfigError`
naming the key and where it came from.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shared_model.errors import UserError

CONFIG_DIR_ENV = "FEDCMR_CONFIG_DIR"
RESOLVED_CONFIG_NAME = "config.yaml"


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key and the source."""


class SSLMethod(str, Enum):
    """Self-supervised pretraining objectives (one module each in shared_model.ssl)."""

    mae = "mae"
    dino = "dino"


class Aggregator(str, Enum):
    """Server-side aggregation rules (Flower strategies)."""

    fedavg = "fedavg"
    fedprox = "fedprox"  # FedAvg + a proximal term in each site's local loss
    fedadam = "fedadam"  # server-side Adam on the averaged update
    fedavgm = "fedavgm"  # server-side momentum
    trimmed_mean = "trimmed_mean"  # robust: needs individual updates (no SecAgg+)
    median = "median"  # robust: needs individual updates (no SecAgg+)
    krum = "krum"  # robust: needs individual updates (no SecAgg+)


ROBUST_AGGREGATORS = (Aggregator.trimmed_mean, Aggregator.median, Aggregator.krum)


class HeadSharing(str, Enum):
    """Whether task heads are averaged by the server or stay at each site (personalisation)."""

    aggregated = "aggregated"
    local = "local"


class SSLHeadSharing(str, Enum):
    """Whether the SSL head (MAE decoder, DINO head) travels with the encoder each round."""

    auto = "auto"  # local where pretraining alone uses it (token MAE decoder), else aggregated
    aggregated = "aggregated"
    local = "local"


# Note: no enum value may be a YAML 1.1 boolean word (on/off/yes/no): `key=off` would arrive
# as False.


class SecAggMode(str, Enum):
    """Whether Flower's SecAgg+ masks the encoder updates."""

    auto = "auto"  # used whenever at least 3 sites take part
    always = "always"
    never = "never"


class PrivacyMode(str, Enum):
    """Differential privacy regime."""

    none = "none"
    user = "user"  # site-level: clip each site's update, Gaussian noise on the aggregate
    sample = "sample"  # DP-SGD at each node (Opacus): protects each image of a site


@dataclass
class DataConfig:
    """Where a node's images live and how the store lays them out."""

    store: str = ""  # the node's local store folder (node-local; never sent by the server)
    spacing_mm: float = 1.5  # in-plane pixel spacing of the store's arrays, mm
    crop_px: int = 128  # side of the square crop kept around the image centre, store pixels


@dataclass
class ModelConfig:
    """The encoder: a named preset from shared_model.encoders."""

    preset: str = "vit-tiny-p8-64"
    drop_path_rate: float = 0.0


class MAEDecoderKind(str, Enum):
    """What reconstructs the hidden patches in MAE pretraining."""

    # He et al.: a light transformer on the visible tokens plus mask tokens; it is dropped
    # after pretraining and the encoder alone is released
    transformer = "transformer"
    # The dense tasks' own decoder (stem skips + token maps -> pixels, as in SparK / ConvMAE):
    # the whole segmentation network learns to inpaint, and the decoder is released with the
    # encoder. The encoder then sees every token (hidden patches as zeros).
    dense = "dense"


@dataclass
class MAEConfig:
    """Masked autoencoder (He et al. 2022): masking ratio and the pixel decoder."""

    mask_ratio: float = 0.75
    decoder: MAEDecoderKind = MAEDecoderKind.transformer
    decoder_dim: int = 128  # transformer decoder
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # target = per-patch normalised pixels


class TeacherMode(str, Enum):
    """How a DINO teacher lives in a federation (compared in the simulation report)."""

    local_ema = "local_ema"  # each site keeps an EMA of the aggregated student across rounds
    aggregated = "aggregated"  # the teacher is averaged by the server like the student


@dataclass
class DINOConfig:
    """DINO (Caron et al. 2021): multi-crop self-distillation with an EMA teacher."""

    out_dim: int = 1024  # prototypes (65536 in the paper's ViT-S/8)
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_fraction: float = 0.1  # of all pretraining steps, for the teacher temperature
    center_momentum: float = 0.9
    momentum_start: float = 0.996  # teacher EMA momentum, cosine-scheduled to 1
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.1, 0.4])
    local_crops: int = 4
    local_crop_fraction: float = 0.5  # local crop side as a fraction of the image side
    teacher: TeacherMode = TeacherMode.local_ema


@dataclass
class SSLConfig:
    """Local self-supervised pretraining, per federated round."""

    method: SSLMethod = SSLMethod.mae
    local_steps: int = 10  # optimiser steps each site takes per round
    # Every this many rounds (and in the last) a node with labelled frames reports a k-NN probe
    # of its frozen patch tokens (probe_dice); labels are read for it, never trained on. 0: never
    probe_every: int = 5
    batch_size: int = 32
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    mae: MAEConfig = field(default_factory=MAEConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)


class TaskArch(str, Enum):
    """What a fine-tuning session trains."""

    fm = "fm"  # the foundation encoder with the task's head (the federation's model)
    unet = "unet"  # a supervised MONAI U-Net from scratch: the baseline a hospital would use


class FinetuneMode(str, Enum):
    """How much of the encoder fine-tuning may change."""

    linear = "linear"  # encoder frozen; only the task head trains (a linear probe for classes)
    # the ViT frozen; the head and the encoder's conv stem train, the stem only through the
    # dense decoder's skips (no backward through the ViT); without a conv stem, as linear
    stem = "stem"
    # stem where the training set holds enough labelled subjects for the stem to train on
    # (shared_model.finetune.STEM_MIN_SUBJECTS), else linear: the built-in recipe of dense tasks
    auto = "auto"
    full = "full"  # everything trains, with layer-wise learning-rate decay on the encoder
    frozen_then_unfrozen = "frozen_then_unfrozen"  # head first, then everything


@dataclass
class TasksConfig:
    """Clinical fine-tuning (task names from shared_model.tasks)."""

    names: list[str] = field(default_factory=list)
    arch: TaskArch = TaskArch.fm
    mode: FinetuneMode = FinetuneMode.full
    steps: int = 5000  # optimiser steps per fine-tuning session (at most)
    # Wall-clock budget of a session, seconds: it ends at `steps` or here, whichever comes
    # first, and the learning-rate schedule runs over the budget. None: steps only. The default
    # suits a hospital node on 2 CPU cores (a GPU node takes many more steps in it).
    max_seconds: Optional[float] = 150.0
    batch_size: int = 16
    lr: float = 1.0e-3  # head learning rate; encoder block i gets lr * layer_decay**(depth - i)
    layer_decay: float = 0.75
    weight_decay: float = 0.01
    # share of the session (steps, or the time budget) with a frozen encoder
    # (frozen_then_unfrozen)
    frozen_fraction: float = 0.3
    # segmentation: share of each batch drawn to hold a foreground class, classes picked
    # uniformly (nnU-Net's foreground oversampling, 1/3), so a class few frames draw is seen in
    # nearly every batch; 0: plain shuffled epochs. DP-SGD keeps its Poisson sampling.
    foreground_fraction: float = 0.33
    augment: bool = True
    decoder_width: int = 16  # segmentation/landmark decoder channels at full resolution
    # With the whole encoder frozen (mode linear, no DP-SGD): augmented views kept per sample
    # with their encoder features, so a step after the first draws costs the head alone
    # (shared_model.feature_bank; 64 measured on real patients, README); 0: the encoder runs
    # on every step.
    feature_views: int = 64
    label_budget: int = 0  # labelled subjects per site used for training (0: all)
    test_fraction: float = 0.3  # subjects per site held out for evaluation (0: train on all)
    split_seed: int = 0  # which subjects are held out (fixed across seeds; the seed draws
    #                      the labelled training subjects)


@dataclass
class SecAggConfig:
    """Flower SecAgg+ settings (see flwr.server.workflow.SecAggPlusWorkflow)."""

    mode: SecAggMode = SecAggMode.auto
    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 8.0  # every value sent must lie in [-range, range]
    # Nodes send their update (weights - the round's global weights), scaled so that a change
    # of this much per weight maps onto the clipping range; an update with a larger change is
    # shrunk as a whole to fit. Quantisation step per weight: 2 * max_weight_change /
    # quantization_range.
    max_weight_change: float = 1.0
    quantization_range: int = 4194304
    # Example weights are capped at this under SecAgg+ (a site with more images counts as
    # this many). Quantisation error per weight ~ sites * 2 * clipping_range /
    # quantization_range * max_weight / (sum of the sites' weights).
    max_weight: int = 1000
    timeout_s: float = 300.0


@dataclass
class FederationConfig:
    """Rounds, participation and aggregation on the server."""

    rounds: int = 2  # pretraining rounds
    finetune_rounds: int = 0  # federated fine-tuning rounds per task in tasks.names
    # A round needs replies from at least this many sites. None: every simulated site
    # (fedcmr-sim fills it in); a deployment must set it.
    min_sites: Optional[int] = None
    fraction_fit: float = 1.0
    # A round's aggregate needs at least this many valid replies (else the global model stays);
    # with SecAgg+ also at least the reconstruction threshold.
    min_replies: int = 2
    aggregator: Aggregator = Aggregator.fedavg
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    adam_lr: float = 1.0e-3  # fedadam (eta)
    trim_fraction: float = 0.2  # trimmed_mean: share cut at each end
    krum_byzantine: int = 1  # krum: sites assumed faulty
    heads: HeadSharing = HeadSharing.aggregated  # task heads in fine-tuning
    # The SSL head (MAE decoder, DINO head). Aggregated: it travels with the encoder each round
    # (the token MAE decoder of vit-tiny-p8-64: +24 % bytes; the dense decoder of
    # hybrid-unet-p16-96: +10 %). Local: only the encoder travels; each node keeps its head in
    # its state folder, per run and round, so a resumed run is the uninterrupted one
    # (client.run_local). `auto` (see ssl_head_stays_local): local for the token MAE decoder,
    # which nothing uses after pretraining; aggregated for a dense MAE's decoder, which is
    # released and which segmentation heads start from, and for DINO's head, whose prototypes
    # every site's student and teacher then share.
    ssl_head: SSLHeadSharing = SSLHeadSharing.auto
    round_timeout_s: float = 600.0
    # How long a round waits for min_sites nodes to be connected (Flower's own wait is 24 h);
    # fewer by then: the round is recorded as halted, the model stays and the run pauses,
    # to be resumed (output.resume=true) once the nodes are back.
    site_wait_s: float = 600.0
    # Update validation: without SecAgg+ a site's update is excluded when the L2 norm of (its
    # weights - the global weights) exceeds this, or its example count is out of range; under
    # SecAgg+ each node clips its update to this norm before masking.
    max_update_norm: float = 100.0
    min_examples: int = 1
    max_examples: int = 10_000_000
    # Against the round itself (without SecAgg+, from 3 valid replies): an update further than
    # this x the median update norm is excluded (0: off) ...
    max_update_norm_ratio: float = 3.0
    # ... and a site's example count counts as at most this x the median claim (0: off).
    max_examples_ratio: float = 2.0
    # A reply's weights larger than this many MB are refused before they are decoded (the
    # round goes on with the other sites); None: the global model's size + 10 % + 1 MB (an
    # honest reply is the model's size). Flower's own gRPC limit is 2 GB.
    max_update_mb: Optional[float] = None
    # A released foundation model (a bundle folder, on the server's machine) that federated
    # fine-tuning starts from (its encoder, and its dense decoder if it has one) instead of
    # this run's own pretraining (set rounds=0); "": the run's own foundation.
    foundation: str = ""
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


@dataclass
class PrivacyConfig:
    """Differential privacy and its budget."""

    mode: PrivacyMode = PrivacyMode.none
    noise_multiplier: float = 1.0  # Gaussian noise std / clipping norm (both modes)
    max_grad_norm: float = 1.0  # per-sample gradient clipping norm (sample-level DP)
    update_clip_norm: float = 1.0  # L2 clip of each site's update (user-level DP)
    delta: float = 1.0e-5
    accountant: str = "prv"  # prv | rdp (Opacus accountants)
    # Sample-level DP noise from the plan's seed (reproducible runs): simulations only. False:
    # each node draws it from OS entropy, unpredictable to the server.
    reproducible_noise: bool = False
    # Stop before any round (or the release) that would take a site past this epsilon.
    # None: no budget (epsilon is still accounted and reported).
    epsilon_budget: Optional[float] = None


@dataclass
class FederatedArm:
    """One federated pretraining variant of a simulation scenario."""

    name: str = "fed-mae"
    method: SSLMethod = SSLMethod.mae
    secagg: SecAggMode = SecAggMode.auto
    privacy: PrivacyMode = PrivacyMode.none
    noise_multiplier: float = 1.0
    teacher: TeacherMode = TeacherMode.local_ema


@dataclass
class SimConfig:
    """A simulated federation (fedcmr-sim): its sites, arms, label budgets and seeds."""

    sites: int = 2  # synthetic sites (a synthetic multi-site cohort, written as DICOM)
    subjects_per_site: int = 3  # mean; sites differ in size
    cine_phases: Optional[int] = None  # shrink the cohort's cine series (None: each site's own)
    max_sax_slices: Optional[int] = None
    # Real data folders, one site each, as "<format>:<path>[:<labels path>][?group=<name>]"
    # with format dicom | sunnybrook | acdc | mnms | nnunet, e.g.
    # "sunnybrook:../shared/data/sunnybrook" or, one site per pathology group of an nnU-Net
    # dataset's cases.csv, "nnunet:../shared/data/sunnybrook-frames?group=hypertrophy".
    real_sites: list[str] = field(default_factory=list)
    cpus_per_site: float = 1.0  # Ray CPUs per simulated ClientApp
    federated_arms: list[FederatedArm] = field(default_factory=lambda: [FederatedArm()])
    # local, central, scratch (encoders), unet (a supervised MONAI U-Net, dense tasks only)
    baselines: list[str] = field(default_factory=lambda: ["local", "central", "scratch", "unet"])
    label_budgets: list[int] = field(default_factory=lambda: [1])  # 0: all labelled subjects
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Federated fine-tuning (besides local) for these arms; [] = the first federated arm and
    # scratch.
    federated_finetune_arms: list[str] = field(default_factory=list)
    federated_finetune_budgets: list[int] = field(default_factory=list)  # [] = label_budgets
    federated_finetune: bool = True
    local_finetune_arms: list[str] = field(default_factory=list)  # [] = every arm
    overlays: bool = True
    # Patients (the datasets' own names) that no simulated site ingests: a fixed test set kept
    # out of pretraining, recorded in the released model's config and card.
    holdout_patients: list[str] = field(default_factory=list)


@dataclass
class OutputConfig:
    """Where a run writes its config, weights and metrics, and how it starts and stops."""

    dir: str = "runs/latest"
    resume: bool = False  # continue from dir's checkpoint at the next round
    # Pause the run after this global round (e.g. a maintenance window); continue it later
    # with resume=true. None: run to the end.
    stop_after_round: Optional[int] = None


@dataclass
class FedCMRConfig:
    """The whole run: one instance travels from the CLI edge into every component."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def config_dir() -> Path:
    """The folder of YAML presets: $FEDCMR_CONFIG_DIR, else the repository's configs/."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def available_presets() -> list[str]:
    """Names of the YAML presets in :func:`config_dir`."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_preset_path(preset: str | Path) -> Path:
    """A preset name (``demo-cpu``) or a path to a YAML file, as an existing path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = config_dir() / f"{preset}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown config preset '{preset}'; available in {config_dir()}: "
            f"{', '.join(available_presets()) or 'none'} (pass a path to a YAML file, or point "
            f"${CONFIG_DIR_ENV} at a folder of presets)"
        )
    return candidate


def _merge(base: DictConfig, other: Any, source: str, in_place: bool = False) -> DictConfig:
    """``base`` with ``other`` merged over it: a merged copy, or ``base`` itself where
    ``in_place`` (a config this call made: a copy of the schema costs ~5 ms)."""
    try:
        if in_place:
            base.merge_with(other)
            return base
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {reason}") from exc


def _read_yaml(path: Path) -> Any:
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors come in many types
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides: {exc}") from exc


def load_config(
    preset: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> FedCMRConfig:
    """Defaults, then the preset YAML, then ``key=value`` overrides; validated and typed."""
    merged = _schema()
    if preset is not None:
        path = resolve_preset_path(preset)
        merged = _merge(merged, _read_yaml(path), str(path))
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), "override", in_place=preset is not None)
    cfg: FedCMRConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg)
    return cfg


def config_from_yaml(text: str, source: str) -> FedCMRConfig:
    """Parse a resolved config (e.g. one sent by the server or saved in a run folder).

    A node parses the server's plan for every instruction of a run; the same text is parsed
    once per process (a few recent texts are kept) and each call gets its own copy.
    """
    return copy.deepcopy(_parsed_yaml(text, source))


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The schema with its defaults, built once per process (~40 ms); ``OmegaConf.merge``
    copies its first argument, so merges never change it."""
    return OmegaConf.structured(FedCMRConfig)


@functools.lru_cache(maxsize=8)
def _parsed_yaml(text: str, source: str) -> FedCMRConfig:
    """:func:`config_from_yaml`'s parse, validated (an error is raised again on every call:
    nothing is cached for a text that fails). Never hand this object out: callers copy it."""
    try:
        loaded = OmegaConf.create(text)
    except Exception as exc:  # yaml syntax errors come in many types; re-raised as ConfigError
        raise ConfigError(f"{source}: not valid YAML ({exc})") from exc
    merged = _merge(_schema(), loaded, source)
    cfg: FedCMRConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg)
    return cfg


def with_overrides(cfg: FedCMRConfig, overrides: Sequence[str], source: str = "override") -> FedCMRConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied and validated."""
    merged = _merge(OmegaConf.structured(cfg), _parse_overrides(overrides), source)
    out: FedCMRConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(out)
    return out


def config_to_yaml(cfg: FedCMRConfig) -> str:
    """The resolved config as YAML text; :func:`config_from_yaml` reads it back."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved_config(cfg: FedCMRConfig, run_dir: str | Path) -> Path:
    """Write ``config.yaml`` into a run folder (atomically) and return its path."""
    from shared_model.files import atomic_write_text

    path = Path(run_dir) / RESOLVED_CONFIG_NAME
    atomic_write_text(path, config_to_yaml(cfg))
    return path


def secagg_enabled(cfg: FedCMRConfig) -> bool:
    """SecAgg+ is on by default whenever a round needs at least 3 sites."""
    mode = cfg.federation.secagg.mode
    return mode == SecAggMode.always or (mode == SecAggMode.auto and (cfg.federation.min_sites or 0) >= 3)


def ssl_head_stays_local(cfg: FedCMRConfig) -> bool:
    """Whether pretraining keeps the SSL head at the nodes (``federation.ssl_head``)."""
    mode = cfg.federation.ssl_head
    if mode == SSLHeadSharing.auto:
        return cfg.ssl.method == SSLMethod.mae and cfg.ssl.mae.decoder == MAEDecoderKind.transformer
    return mode == SSLHeadSharing.local


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"key '{key}': {message}")


REAL_SITE_FORMATS = ("dicom", "sunnybrook", "acdc", "mnms", "nnunet")


def validate_config(cfg: FedCMRConfig) -> None:
    """Checks that types alone cannot express (ranges, known names, consistency)."""
    from shared_model.presets import PRESETS

    _require(cfg.model.preset in PRESETS, "model.preset",
             f"unknown encoder preset '{cfg.model.preset}'; known: {', '.join(PRESETS)}")
    _require(0.0 < cfg.ssl.mae.mask_ratio < 1.0, "ssl.mae.mask_ratio", "must lie in (0, 1)")
    _require(cfg.ssl.local_steps >= 1, "ssl.local_steps", "must be >= 1")
    dino = cfg.ssl.dino
    for key in ("global_crop_scale", "local_crop_scale"):
        scale = getattr(dino, key)
        _require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, f"ssl.dino.{key}",
                 "must be [low, high] with 0 < low <= high <= 1")
    _require(0 <= dino.momentum_start < 1, "ssl.dino.momentum_start", "must lie in [0, 1)")
    _require(dino.local_crops >= 0, "ssl.dino.local_crops", "must be >= 0")
    _require(cfg.ssl.batch_size >= 1, "ssl.batch_size", "must be >= 1")
    _require(cfg.ssl.lr > 0, "ssl.lr", "must be > 0")
    if cfg.federation.foundation:
        _require(cfg.federation.rounds == 0, "federation.rounds",
                 "must be 0 when fine-tuning starts from federation.foundation (no pretraining)")
        _require(cfg.federation.finetune_rounds >= 1 and bool(cfg.tasks.names), "federation.foundation",
                 "needs tasks.names and federation.finetune_rounds >= 1 (what to fine-tune)")
    else:
        _require(cfg.federation.rounds >= 1, "federation.rounds", "must be >= 1")
    _require(cfg.federation.min_sites is None or cfg.federation.min_sites >= 1,
             "federation.min_sites", "must be >= 1")
    _require(cfg.federation.site_wait_s > 0, "federation.site_wait_s", "must be > 0 seconds")
    _require(0 < cfg.federation.fraction_fit <= 1, "federation.fraction_fit", "must lie in (0, 1]")
    _require(cfg.data.spacing_mm > 0, "data.spacing_mm", "must be > 0")
    _require(cfg.data.crop_px >= 16, "data.crop_px", "must be >= 16")
    _require(cfg.sim.sites >= 0, "sim.sites", "must be >= 0")
    _require(cfg.sim.sites + len(cfg.sim.real_sites) >= 1, "sim.sites",
             "a scenario needs at least one site (synthetic or in sim.real_sites)")
    _require(cfg.sim.subjects_per_site >= 1, "sim.subjects_per_site", "must be >= 1")
    _require(cfg.sim.cpus_per_site > 0, "sim.cpus_per_site", "must be > 0")
    _require(all(b >= 0 for b in cfg.sim.label_budgets) and bool(cfg.sim.label_budgets),
             "sim.label_budgets", "must be a non-empty list of counts >= 0 (0: all)")
    _require(bool(cfg.sim.seeds), "sim.seeds", "must name at least one seed")
    unknown_baselines = set(cfg.sim.baselines) - {"local", "central", "scratch", "unet"}
    _require(not unknown_baselines, "sim.baselines",
             f"unknown {sorted(unknown_baselines)}; choose from local, central, scratch, unet")
    for entry in cfg.sim.real_sites:
        _require(entry.split(":", 1)[0] in REAL_SITE_FORMATS and ":" in entry,
                 "sim.real_sites", f"'{entry}' is not <format>:<path> with format "
                 f"{', '.join(REAL_SITE_FORMATS)}")
        _require("?" not in entry or entry.rsplit("?", 1)[1].startswith("group="),
                 "sim.real_sites", f"'{entry}': the only option is ?group=<name> (nnunet)")
    sa = cfg.federation.secagg
    _require(sa.clipping_range > 0, "federation.secagg.clipping_range", "must be > 0")
    _require(sa.max_weight_change > 0, "federation.secagg.max_weight_change", "must be > 0")
    _require(sa.num_shares >= 3, "federation.secagg.num_shares",
             "must be >= 3 (Flower's SecAgg+ needs it; SecAgg+ needs at least 3 sites)")
    _require(2 <= sa.reconstruction_threshold <= sa.num_shares,
             "federation.secagg.reconstruction_threshold",
             "must satisfy 2 <= threshold <= num_shares")
    _require(2 * sa.reconstruction_threshold > sa.num_shares,
             "federation.secagg.reconstruction_threshold",
             "must exceed half of num_shares (nodes refuse less: the server could reconstruct "
             "both of a site's masks)")
    _require(sa.timeout_s > 0, "federation.secagg.timeout_s", "must be > 0 seconds")
    from shared_model.tasks import TASKS

    unknown = [n for n in cfg.tasks.names if n not in TASKS]
    _require(not unknown, "tasks.names", f"unknown task(s) {unknown}; known: {', '.join(sorted(TASKS))}")
    _require(cfg.tasks.steps >= 1, "tasks.steps", "must be >= 1")
    _require(cfg.tasks.decoder_width >= 4, "tasks.decoder_width", "must be >= 4")
    _require(0 < cfg.tasks.layer_decay <= 1, "tasks.layer_decay", "must lie in (0, 1]")
    _require(0 <= cfg.tasks.frozen_fraction < 1, "tasks.frozen_fraction", "must lie in [0, 1)")
    _require(cfg.privacy.accountant in ("prv", "rdp"), "privacy.accountant", "must be prv or rdp")
    _require(cfg.privacy.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
    _require(cfg.privacy.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
    _require(0 < cfg.privacy.delta < 1, "privacy.delta", "must lie in (0, 1)")
    _require(cfg.privacy.update_clip_norm > 0, "privacy.update_clip_norm", "must be > 0")
    _require(cfg.privacy.epsilon_budget is None or cfg.privacy.epsilon_budget > 0,
             "privacy.epsilon_budget", "must be > 0 (or null for no budget)")
    # DP-SGD computes one gradient per image; Opacus can for MAE with the dense decoder (the
    # encoder sees whole, masked images), not for the token MAE, whose encoder drops tokens
    # inside timm's forward, nor for DINO, whose centring and teacher mix images.
    _require(cfg.privacy.mode != PrivacyMode.sample or cfg.federation.rounds == 0
             or (cfg.ssl.method == SSLMethod.mae and cfg.ssl.mae.decoder == MAEDecoderKind.dense),
             "privacy.mode", "sample-level DP pretraining needs ssl.method=mae with "
             "ssl.mae.decoder=dense (or use privacy.mode=user, which clips and noises each site's "
             "update and takes any method)")
    fed = cfg.federation
    _require(not (secagg_enabled(cfg) and fed.aggregator in ROBUST_AGGREGATORS),
             "federation.aggregator",
             f"{fed.aggregator.value} needs each site's update, which SecAgg+ hides from the "
             "server; use fedavg/fedprox/fedadam/fedavgm, or federation.secagg.mode=never")
    _require(0 <= cfg.tasks.test_fraction < 1, "tasks.test_fraction", "must lie in [0, 1)")
    _require(cfg.tasks.max_seconds is None or cfg.tasks.max_seconds > 0, "tasks.max_seconds",
             "must be > 0 seconds (or null: steps only)")
    _require(cfg.tasks.label_budget >= 0, "tasks.label_budget", "must be >= 0")
    _require(fed.finetune_rounds >= 0, "federation.finetune_rounds", "must be >= 0")
    _require(fed.min_replies >= 1, "federation.min_replies", "must be >= 1")
    _require(fed.min_sites is None or fed.min_replies <= fed.min_sites, "federation.min_replies",
             "must not exceed federation.min_sites")
    _require(0 <= fed.trim_fraction < 0.5, "federation.trim_fraction", "must lie in [0, 0.5)")
    _require(fed.max_update_norm > 0, "federation.max_update_norm", "must be > 0")
    _require(fed.max_update_norm_ratio == 0 or fed.max_update_norm_ratio >= 1,
             "federation.max_update_norm_ratio", "must be 0 (off) or >= 1")
    _require(fed.max_update_mb is None or fed.max_update_mb > 0, "federation.max_update_mb",
             "must be > 0 MB (or null: the model's size + 10 %)")
    _require(fed.max_examples_ratio == 0 or fed.max_examples_ratio >= 1,
             "federation.max_examples_ratio", "must be 0 (off) or >= 1")
    _require(1 <= fed.min_examples <= fed.max_examples, "federation.min_examples",
             "must satisfy 1 <= min_examples <= max_examples")
    device = cfg.device
    _require(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), "device",
             f"'{device}' is not one of auto, cpu, cuda, cuda:N")
