"""Intake speed: files/s of ``fedcmr-client ingest`` over files/s of a bare ``pydicom.dcmread`` loop.

    python benchmarks/intake_speed.py                       # the Sunnybrook studies (700 files)
    python benchmarks/intake_speed.py --src EXPORT_FOLDER   # any DICOM export
    python benchmarks/intake_speed.py --cold                # also both as fresh processes

The ingest is the real command (typer, in-process), writing a fresh store each repeat: read,
checks, de-identification, resampling, normalisation, QC, store writes (fsync'ed), summary.
The bare loop is what a user would write: ``pydicom.dcmread(path)`` of every file, full read
(pixel data read as bytes; nothing decoded, nothing else done). Both run over the same files
with the page cache warm, after one untimed ingest (imports, first-call costs). Repeats
alternate which of the two runs first; each repeat gives a ratio, and the result is the median
ratio. Goal: >= 0.8.

In-process timing leaves out what both pay once per command: interpreter start-up and imports.
``--cold`` times that too (``fedcmr-client ingest`` vs ``python -c 'import pydicom; loop'`` as
new processes), where ingest's start-up cost is mostly importing what its config check pulls in.

Timings depend on what else the machine runs: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom
from typer.testing import CliRunner

from client.cli import app
from client.intake.scan import list_files
from measures import Measure, write_measures

SUNNYBROOK_DICOMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sunnybrook" / "dicoms"
BARE_LOOP = ("import sys, warnings, pydicom\n"
             "warnings.simplefilter('ignore')\n"
             "for path in sys.stdin.read().splitlines():\n"
             "    pydicom.dcmread(path)\n")


def bare_dcmread(files: list[Path]) -> float:
    """Seconds for one plain ``dcmread`` of every file."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            pydicom.dcmread(path)
    return time.perf_counter() - started


def ingest_args(src: Path, store: Path, workers: int, overrides: list[str]) -> list[str]:
    return ["ingest", str(src), "--out", str(store), "--workers", str(workers), *overrides]


def ingest_once(src: Path, work: Path, workers: int, overrides: list[str]) -> float:
    """Seconds for one ``fedcmr-client ingest SRC --out STORE`` into a new store (in-process)."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ingest_args(src, store, workers, overrides))
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"ingest failed (exit {result.exit_code}):\n{result.output}")
    return elapsed


def cold_once(files: list[Path], src: Path, work: Path, workers: int,
              overrides: list[str]) -> tuple[float, float]:
    """Seconds for (the bare loop, the ingest command), each as a new Python process."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE_LOOP], input="\n".join(map(str, files)),
                   text=True, check=True)
    bare = time.perf_counter() - started
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, "-c", "from client.cli import app; app()",
               *ingest_args(src, store, workers, overrides)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ingest failed (exit {result.returncode}):\n{result.stderr}")
    return bare, elapsed


def paired_runs(files: list[Path], args: argparse.Namespace, work: Path) -> list[tuple[float, float]]:
    """(bare seconds, ingest seconds) per repeat; the first of the pair alternates."""
    pairs = []
    for repeat in range(args.repeats):
        if repeat % 2 == 0:
            bare = bare_dcmread(files)
            ingest = ingest_once(args.src, work, args.workers, args.overrides)
        else:
            ingest = ingest_once(args.src, work, args.workers, args.overrides)
            bare = bare_dcmread(files)
        pairs.append((bare, ingest))
    return pairs


def report(label: str, n: int, pairs: list[tuple[float, float]]) -> float:
    print(f"{label}: repeat  bare dcmread files/s  ingest files/s  ratio")
    for i, (bare, ingest) in enumerate(pairs, 1):
        print(f"  {i:>{len(label) + 5}d}  {n / bare:19.1f}  {n / ingest:14.1f}  {bare / ingest:5.2f}")
    bare = statistics.median(b for b, _ in pairs)
    ingest = statistics.median(i for _, i in pairs)
    ratio = statistics.median(b / i for b, i in pairs)
    print(f"fedcmr-client ingest: {n / ingest:8.1f} files/s  (median {ingest:.3f} s)")
    print(f"bare pydicom.dcmread: {n / bare:8.1f} files/s  (median {bare:.3f} s)")
    print(f"ratio ingest / bare:  {ratio:.2f}  (median of {len(pairs)} paired repeats; goal >= 0.8)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SUNNYBROOK_DICOMS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=0, help="0: the intake's default (<= 2)")
    parser.add_argument("--cold", action="store_true",
                        help="also time both as new processes (start-up and imports included)")
    parser.add_argument("--json", type=Path, default=None, help="write the measures here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.crop_px=128")
    args = parser.parse_args()
    if not args.src.exists():
        raise SystemExit(f"{args.src} does not exist; pass --src EXPORT_FOLDER")
    files = list_files(args.src)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedcmr-intake-bench-") as tmp:
        work = Path(tmp)
        bare_dcmread(files)  # warm the page cache
        ingest_once(args.src, work, args.workers, args.overrides)  # imports, first-call costs
        pairs = paired_runs(files, args, work)
        summary = (work / "store" / "ingest-summary.json").read_text()
        cold = [cold_once(files, args.src, work, args.workers, args.overrides)
                for _ in range(3)] if args.cold else []
    print(f"files: {len(files)} under {args.src}")
    print(f"cpu cores: {os.cpu_count()}, load average (1/5/15 min) before: "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ratio = report("in-process", len(files), pairs)
    write_measures(args.json, "intake_speed", [Measure("intake files/s / bare pydicom files/s", ratio, ">= 0.8")])
    if cold:
        report("cold (new processes)", len(files), cold)
    print(f"last ingest summary: {summary.strip()}")


if __name__ == "__main__":
    main()
