"""Sequence and view where the headers tell, ``unknown`` where they do not.

Header text (SeriesDescription, ProtocolName, SequenceName, ImageType) is matched against a
small keyword table; only the resulting vocabulary label leaves this module, never the text.
Structure fills in what text does not: a stack with >= 10 phases at distinct trigger times is a
cine, and a cine of >= 4 parallel slices is a short-axis stack (long-axis cines are single
slices). The task-1/2 classifiers can overwrite these labels later.
"""

from __future__ import annotations

import re

from shared_model.labels import SEQUENCES, UNKNOWN, VIEWS

# First match wins; the text is lower-cased with every non-alphanumeric run turned into a space.
_SEQUENCE_RULES: tuple[tuple[str, str], ...] = (
    (r"\blocali[sz]er\b|\bscout\b|\bsurvey\b|\btri ?pilot\b|\b3 ?plane ?loc", "localizer"),
    (r"\bt1 ?maps?\b|\bt1 ?mapping|\bmolli\b|\bshmolli\b|\bsasha\b|\bnative t1\b|\bt1map", "t1_map"),
    (r"\bt2 ?maps?\b|\bt2 ?mapping|\bt2map", "t2_map"),
    (r"\blge\b|\bpsir\b|late ?gad|delayed ?enh|late ?enh|\bmde\b|\bviability\b"
     r"|\bde psir\b|\bde mag\b", "lge"),
    (r"\bperf|\bfirst ?pass\b", "perfusion"),
    (r"\bt2w\b|\bt2 ?tse\b|\bstir\b|\btirm\b|black ?blood|\bt2 ?weighted|\bt2 ?haste\b", "t2w"),
    (r"\bcine\b|\bssfp\b|\btrufi\b|\bfiesta\b|\bb ?ffe\b|\bbssfp\b|\bbalanced\b", "cine"),
)
_VIEW_RULES: tuple[tuple[str, str], ...] = (
    (r"\bsax\b|short ?axis|\bsa\b|\bsa ?stack\b|\bsa\d", "sax"),
    (r"\b2 ?ch\b|\b2 ?chamber|two ?chamber|\bvla\b|\b2cv\b", "2ch"),
    (r"\b3 ?ch\b|\b3 ?chamber|three ?chamber|\blvot\b|\b3cv\b", "3ch"),
    (r"\b4 ?ch\b|\b4 ?chamber|four ?chamber|\bhla\b|\b4cv\b", "4ch"),
)
_VENDORS: tuple[tuple[str, str], ...] = (
    ("siemens", "siemens"), ("philips", "philips"), ("ge medical", "ge"),
    ("general electric", "ge"), ("ge healthcare", "ge"), ("toshiba", "canon"), ("canon", "canon"),
    ("hitachi", "hitachi"), ("fujifilm", "hitachi"), ("united imaging", "united_imaging"),
)

MIN_CINE_PHASES = 10
MIN_SAX_SLICES = 4

assert {label for _, label in _SEQUENCE_RULES} <= set(SEQUENCES)
assert {label for _, label in _VIEW_RULES} <= set(VIEWS)


def _normalise_text(parts: list[str]) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", " ".join(parts).lower()) + " "


def _first_match(text: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, label in rules:
        if re.search(pattern, text):
            return label
    return UNKNOWN


def text_hints(parts: list[str]) -> tuple[str, str]:
    """(sequence, view) from header text; ``unknown`` for each the text does not name."""
    text = _normalise_text(parts)
    return _first_match(text, _SEQUENCE_RULES), _first_match(text, _VIEW_RULES)


def vendor_label(manufacturer: str) -> str:
    """The manufacturer reduced to a small fixed vocabulary (``other``/``unknown`` otherwise)."""
    text = manufacturer.strip().lower()
    if not text:
        return UNKNOWN
    if text == "ge" or text.startswith("ge "):
        return "ge"
    for needle, label in _VENDORS:
        if needle in text:
            return label
    return "other"


def structural_sequence(phases: int, distinct_trigger_times: bool) -> str:
    """``cine`` for a long, time-resolved stack; ``unknown`` otherwise."""
    return "cine" if phases >= MIN_CINE_PHASES and distinct_trigger_times else UNKNOWN


def structural_view(sequence: str, slices: int) -> str:
    """``sax`` for a cine stack of several parallel slices; ``unknown`` otherwise."""
    return "sax" if sequence == "cine" and slices >= MIN_SAX_SLICES else UNKNOWN
