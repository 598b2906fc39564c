"""Intake speed: files/s of ``fedcmr-client ingest`` over files/s of a bare ``pydicom.dcmread`` loop.

    python benchmarks/intake_speed.py                       # the Sunnybrook studies (700 files)
    python benchmarks/intake_speed.py --src EXPORT_FOLDER   # any DICOM export

The ingest is the real command (typer, in-process so interpreter start-up and imports are not
counted), writing a fresh store each repeat: read, checks, de-identification, resampling,
normalisation, QC, store writes, summary. The bare loop only parses each file (``dcmread``,
pixel data read as bytes, nothing decoded). Both run over the same files, page cache warm, best
of ``--repeats``. Goal: ratio >= 0.8. Timings depend on what else the machine runs; the load
average is printed with the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pydicom
from typer.testing import CliRunner

from client.cli import app
from client.intake.scan import list_files

SUNNYBROOK_DICOMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sunnybrook" / "dicoms"


def bare_dcmread(files: list[Path]) -> float:
    """Seconds for one plain ``dcmread`` of every file."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            pydicom.dcmread(path)
    return time.perf_counter() - started


def ingest_once(src: Path, work: Path, workers: int, overrides: list[str]) -> float:
    """Seconds for one ``fedcmr-client ingest SRC --out STORE`` into a new store."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(store), "--workers",
                                      str(workers), *overrides])
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"ingest failed (exit {result.exit_code}):\n{result.output}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=SUNNYBROOK_DICOMS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="0: the intake's default (<= 2)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.crop_px=128")
    args = parser.parse_args()
    if not args.src.exists():
        raise SystemExit(f"{args.src} does not exist; pass --src EXPORT_FOLDER")
    files = list_files(args.src)
    with tempfile.TemporaryDirectory(prefix="fedcmr-intake-bench-") as tmp:
        work = Path(tmp)
        bare_dcmread(files)  # warm the page cache
        ingest_once(args.src, work, args.workers, args.overrides)  # warm imports (config, timm)
        bare = min(bare_dcmread(files) for _ in range(args.repeats))
        ingest = min(ingest_once(args.src, work, args.workers, args.overrides)
                     for _ in range(args.repeats))
        summary = (work / "store" / "ingest-summary.json").read_text()
    ingest_rate, bare_rate = len(files) / ingest, len(files) / bare
    print(f"files: {len(files)} under {args.src}")
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}")
    print(f"fedcmr-client ingest: {ingest_rate:8.1f} files/s  ({ingest:.2f} s, best of {args.repeats})")
    print(f"bare pydicom.dcmread: {bare_rate:8.1f} files/s  ({bare:.2f} s, best of {args.repeats})")
    print(f"ratio ingest / bare: {ingest_rate / bare_rate:.2f}  (goal >= 0.8)")
    print(f"last ingest summary: {summary.strip()}")


if __name__ == "__main__":
    main()
