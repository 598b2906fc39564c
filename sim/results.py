"""The results of a simulation scenario: one versioned schema the scenario writes and the report
reads (``results.json``).

Layout (schema version 1)::

    format, version
    scenario      name, config, sites [name, source, vendor, field_strength_t, subjects],
                  tasks, label_budgets, seeds, arms (names, in the scenario's order)
    timings_s     stage -> seconds
    arms          name -> kind, method, secagg, dp_mode, epsilon, teacher, rounds, seconds,
                  images_seen
    curves        [arm, round, site, loss, embed_std, teacher_entropy]  (pretraining, per round)
    finetune      [arm, task, budget, seed, mode, site, metric, value, metrics, test_samples,
                   test_subjects]                                        (one per evaluation)
    overlays      [task, arm, site, file]                                (example predictions)

Reading checks every field once, here, and names the file and the field when one is missing or
of the wrong type; past that point the report works with these dataclasses only. Optional fields
may be absent or null (a site's ``vendor``, an arm's ``epsilon``); a budget of 0 means every
labelled subject of a site; ``site`` "all" is the pooled evaluation of federated fine-tuning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import TypeVar

from shared_model.config import PrivacyMode, SSLMethod, TeacherMode
from shared_model.errors import UserError
from shared_model.files import read_json

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "fedcmr-sim-results"
RESULTS_VERSION = 1
POOLED_SITE = "all"  # the site name of a pooled (all-sites) evaluation or curve

T = TypeVar("T")
E = TypeVar("E", bound=Enum)


class ResultsError(UserError, ValueError):
    """A results file this code cannot read; the message names the file and the field."""


class ArmKind(StrEnum):
    """Where an arm's encoder was pretrained."""

    federated = "federated"  # over all sites with Flower
    local = "local"  # at each site alone: one encoder per site
    central = "central"  # on the pooled images (the upper bound)
    scratch = "scratch"  # not at all
    supervised = "supervised"  # no foundation encoder: a MONAI U-Net on the labels alone


class FinetuneMode(StrEnum):
    """Where a fine-tuning ran: at each site alone, or over all sites with Flower."""

    local = "local"
    federated = "federated"


@dataclass(frozen=True)
class SiteInfo:
    name: str
    source: str = ""  # synthetic | folder | sunnybrook | acdc | mnms
    vendor: str = ""
    field_strength_t: float | None = None
    subjects: int = 0


@dataclass(frozen=True)
class ScenarioInfo:
    name: str | None = None
    config: str | None = None  # the resolved config beside results.json
    sites: tuple[SiteInfo, ...] = ()
    tasks: tuple[str, ...] = ()
    label_budgets: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    arms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arm:
    """One pretraining arm: how its starting encoder was made."""

    name: str
    kind: ArmKind
    method: SSLMethod | None = None  # None: no pretraining (scratch)
    secagg: bool = False
    dp_mode: PrivacyMode = PrivacyMode.none
    epsilon: float | None = None  # the ledger's largest epsilon; None without DP
    teacher: TeacherMode | None = None  # DINO arms only
    rounds: int | None = None
    seconds: float | None = None
    images_seen: int | None = None  # federated arms: over all sites and rounds

    @property
    def has_dp(self) -> bool:
        return self.dp_mode != PrivacyMode.none


@dataclass(frozen=True)
class Curve:
    """One pretraining round of an arm at one site (or pooled, site "all")."""

    arm: str
    round: int
    site: str
    loss: float | None = None
    embed_std: float | None = None
    teacher_entropy: float | None = None


CURVE_KEYS = ("loss", "embed_std", "teacher_entropy")


@dataclass(frozen=True)
class FinetuneRow:
    """One evaluation of a fine-tuned model: the headline ``value`` and every metric."""

    arm: str
    task: str
    budget: int  # labelled subjects per site; 0: all
    seed: int
    mode: FinetuneMode
    site: str  # a site name, or "all" for the pooled evaluation of federated fine-tuning
    metric: str  # the task's headline metric
    value: float | None  # None when the metric was not finite
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    test_samples: int = 0
    test_subjects: tuple[str, ...] = ()  # store pseudonyms of the held-out subjects


@dataclass(frozen=True)
class Overlay:
    """An example prediction saved for the report (``file`` relative to the run folder)."""

    task: str
    arm: str
    site: str
    file: str


@dataclass(frozen=True)
class ScenarioResults:
    scenario: ScenarioInfo = ScenarioInfo()
    timings_s: Mapping[str, float] = field(default_factory=dict)
    arms: Mapping[str, Arm] = field(default_factory=dict)
    curves: tuple[Curve, ...] = ()
    finetune: tuple[FinetuneRow, ...] = ()
    overlays: tuple[Overlay, ...] = ()

    def arm_order(self) -> list[Arm]:
        """Every arm: in the scenario's order, then any the scenario does not list."""
        listed = [self.arms[n] for n in self.scenario.arms]
        return listed + [a for n, a in self.arms.items() if n not in self.scenario.arms]

    def to_json(self) -> dict:
        """The JSON object of ``results.json``."""
        return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION,
                "scenario": _plain(asdict(self.scenario)),
                "timings_s": dict(self.timings_s),
                "arms": {name: _plain({k: v for k, v in asdict(arm).items() if k != "name"})
                         for name, arm in self.arms.items()},
                "curves": [_plain(asdict(c)) for c in self.curves],
                "finetune": [_plain(asdict(r)) for r in self.finetune],
                "overlays": [_plain(asdict(o)) for o in self.overlays]}

    @classmethod
    def from_json(cls, raw: object, source: str = "results") -> ScenarioResults:
        """Check and read a ``results.json`` object; :class:`ResultsError` names the field."""
        if not isinstance(raw, dict):
            raise ResultsError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        fmt, version = raw.get("format", RESULTS_FORMAT), raw.get("version", RESULTS_VERSION)
        if fmt != RESULTS_FORMAT:
            raise ResultsError(f"{source}: format is {fmt!r}, expected {RESULTS_FORMAT!r}")
        if not isinstance(version, int) or version > RESULTS_VERSION:
            raise ResultsError(f"{source}: schema version {version!r}; this report reads version "
                               f"{RESULTS_VERSION} — update fedcmr or re-run the scenario")
        read = _Reader(source)
        arms = read.mapping(raw, "arms", _arm)
        results = cls(scenario=_scenario(read, raw.get("scenario") or {}),
                      timings_s=read.mapping(raw, "timings_s", lambda r, v, w: r.number(v, w)),
                      arms={name: arm for name, arm in arms.items()},
                      curves=tuple(read.items(raw, "curves", _curve)),
                      finetune=tuple(read.items(raw, "finetune", _row)),
                      overlays=tuple(read.items(raw, "overlays", _overlay)))
        _check_arm_names(results, source)
        return results


def write_results(run_dir: Path, results: ScenarioResults) -> Path:
    """Write ``run_dir/results.json`` atomically."""
    from shared_model.files import atomic_write_text

    path = run_dir / RESULTS_FILE
    atomic_write_text(path, json.dumps(results.to_json(), indent=1))
    return path


def load_results(run_dir: Path) -> ScenarioResults:
    """Read and check ``run_dir/results.json``; a wrong format or version says what to do."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise ResultsError(f"{path}: no results.json; run the scenario first (fedcmr-sim) or "
                           "pass the results to write_report")
    raw = read_json(path, ResultsError, "re-run the scenario")
    return ScenarioResults.from_json(raw, str(path))


# ---------------------------------------------------------------------------- reading


class _Reader:
    """Typed field access that names ``source`` and the field's path in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, expected: str) -> ResultsError:
        return ResultsError(f"{self.source}: field '{where}' is missing or not {expected}; "
                            "re-run the scenario")

    def record(self, value: object, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "an object")
        return value

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, "a string")
        return value

    def integer(self, value: object, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, "an integer")
        return value

    def number(self, value: object, where: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(where, "a number")
        return float(value)

    def optional_number(self, value: object, where: str) -> float | None:
        """A finite number, or None for null, NaN and infinities (the row is then left out)."""
        if value is None:
            return None
        number = self.number(value, where)
        return number if math.isfinite(number) else None

    def choice(self, kind: type[E], value: object, where: str) -> E:
        text = self.text(value, where)
        for member in kind:
            if member.value == text:
                return member
        raise self.fail(where, f"one of {', '.join(str(m.value) for m in kind)}")

    def items(self, raw: dict, key: str, parse: Callable[[_Reader, dict, str], T]) -> list[T]:
        values = raw.get(key) or []
        if not isinstance(values, list):
            raise self.fail(key, "a list")
        return [parse(self, self.record(v, f"{key}[{i}]"), f"{key}[{i}]") for i, v in enumerate(values)]

    def mapping(self, raw: dict, key: str, parse: Callable[[_Reader, object, str], T]) -> dict[str, T]:
        values = raw.get(key) or {}
        if not isinstance(values, dict):
            raise self.fail(key, "an object")
        return {str(k): parse(self, v, f"{key}.{k}") for k, v in values.items()}


def _optional(raw: dict, key: str, where: str, parse: Callable[[object, str], T]) -> T | None:
    value = raw.get(key)
    return None if value is None else parse(value, f"{where}.{key}")


def _scenario(read: _Reader, raw: object) -> ScenarioInfo:
    sc = read.record(raw, "scenario")

    def listed(key: str, parse: Callable[[object, str], T]) -> tuple[T, ...]:
        values = sc.get(key) or []
        if not isinstance(values, list):
            raise read.fail(f"scenario.{key}", "a list")
        return tuple(parse(v, f"scenario.{key}[{i}]") for i, v in enumerate(values))

    def site(value: object, where: str) -> SiteInfo:
        s = read.record(value, where)
        return SiteInfo(name=read.text(s.get("name"), f"{where}.name"),
                        source=read.text(s.get("source") or "", f"{where}.source"),
                        vendor=read.text(s.get("vendor") or "", f"{where}.vendor"),
                        field_strength_t=_optional(s, "field_strength_t", where, read.number),
                        subjects=read.integer(s.get("subjects", 0), f"{where}.subjects"))

    return ScenarioInfo(name=_optional(sc, "name", "scenario", read.text),
                        config=_optional(sc, "config", "scenario", read.text),
                        sites=listed("sites", site), tasks=listed("tasks", read.text),
                        label_budgets=listed("label_budgets", read.integer),
                        seeds=listed("seeds", read.integer), arms=listed("arms", read.text))


def _arm(read: _Reader, value: object, where: str) -> Arm:
    a = read.record(value, where)
    name = where.split(".", 1)[1]

    def enum(key: str, kind: type[E]) -> E | None:
        return _optional(a, key, where, lambda v, w: read.choice(kind, v, w))

    return Arm(name=name, kind=read.choice(ArmKind, a.get("kind"), f"{where}.kind"),
               method=enum("method", SSLMethod), secagg=bool(a.get("secagg", False)),
               dp_mode=enum("dp_mode", PrivacyMode) or PrivacyMode.none,
               epsilon=_optional(a, "epsilon", where, read.number),
               teacher=enum("teacher", TeacherMode),
               rounds=_optional(a, "rounds", where, read.integer),
               seconds=_optional(a, "seconds", where, read.number),
               images_seen=_optional(a, "images_seen", where, read.integer))


def _curve(read: _Reader, c: dict, where: str) -> Curve:
    values = {k: read.optional_number(c.get(k), f"{where}.{k}") for k in CURVE_KEYS}
    return Curve(arm=read.text(c.get("arm"), f"{where}.arm"),
                 round=read.integer(c.get("round"), f"{where}.round"),
                 site=read.text(c.get("site"), f"{where}.site"), **values)


def _row(read: _Reader, r: dict, where: str) -> FinetuneRow:
    metrics = read.record(r.get("metrics", {}), f"{where}.metrics")
    subjects = r.get("test_subjects") or []
    if not isinstance(subjects, list):
        raise read.fail(f"{where}.test_subjects", "a list")
    return FinetuneRow(
        arm=read.text(r.get("arm"), f"{where}.arm"), task=read.text(r.get("task"), f"{where}.task"),
        budget=read.integer(r.get("budget"), f"{where}.budget"),
        seed=read.integer(r.get("seed"), f"{where}.seed"),
        mode=read.choice(FinetuneMode, r.get("mode"), f"{where}.mode"),
        site=read.text(r.get("site"), f"{where}.site"),
        metric=read.text(r.get("metric"), f"{where}.metric"),
        value=read.optional_number(r.get("value"), f"{where}.value"),
        metrics={str(k): read.optional_number(v, f"{where}.metrics.{k}") for k, v in metrics.items()},
        test_samples=read.integer(r.get("test_samples", 0), f"{where}.test_samples"),
        test_subjects=tuple(read.text(s, f"{where}.test_subjects[{i}]") for i, s in enumerate(subjects)))


def _overlay(read: _Reader, o: dict, where: str) -> Overlay:
    return Overlay(*(read.text(o.get(k), f"{where}.{k}") for k in ("task", "arm", "site", "file")))


def _check_arm_names(results: ScenarioResults, source: str) -> None:
    """Every arm a row, curve, overlay or the scenario names is described under ``arms``."""
    named = [("scenario.arms", n) for n in results.scenario.arms]
    named += [(f"finetune[{i}].arm", r.arm) for i, r in enumerate(results.finetune)]
    named += [(f"curves[{i}].arm", c.arm) for i, c in enumerate(results.curves)]
    named += [(f"overlays[{i}].arm", o.arm) for i, o in enumerate(results.overlays)]
    for where, name in named:
        if name not in results.arms:
            raise ResultsError(f"{source}: field '{where}' names arm '{name}', which 'arms' does "
                               "not describe; re-run the scenario")


def _plain(value: object) -> object:
    """JSON-ready: tuples as lists, enums as their values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value
