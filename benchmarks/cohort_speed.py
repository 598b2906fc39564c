"""How fast the synthetic DICOM cohort is written: render cost per frame, write cost per file,
and the demo cohort end to end (``fedcmr-sim cohort --sites 4 --subjects-per-site 2``).

Usage: python benchmarks/cohort_speed.py [--workers 2] [--out DIR]
Prints measurements only; timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from sim.cohort import SubjectJob, write_cohort, write_subject
from sim.phantom import sample_anatomy
from sim.render import PlaneRenderer, magnitude_image
from sim.sequences import contrast_for
from sim.sites import SCANNERS
from sim.study import render_study
from measures import Measure, write_measures


def render_cost_ms(repeats: int = 3) -> dict[str, float]:
    """Milliseconds per rendered frame for each base scanner (whole study, no file writing)."""
    costs = {}
    for index, site in enumerate(SCANNERS):
        best = float("inf")
        for r in range(repeats):
            rng = np.random.default_rng([index, r])
            anat = sample_anatomy(rng, "NOR")
            start = time.perf_counter()
            series = render_study(anat, site, rng)
            frames = sum(s.num_frames for s in series)
            best = min(best, (time.perf_counter() - start) / frames * 1000)
        costs[f"{site.vendor} {site.model} {site.matrix[0]}x{site.matrix[1]}"] = best
    return costs


def cine_frame_cost_ms(rows: int = 128, cols: int = 128, phases: int = 25) -> float:
    """Milliseconds per cine frame of one plane (heart redrawn per phase, chest once)."""
    anat = sample_anatomy(np.random.default_rng(0))
    from sim.planes import sax_stack
    plane = sax_stack(anat, rows, cols, (1.5, 1.5), 10.0, np.random.default_rng(0))[3]
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    renderer = PlaneRenderer(anat, plane, contrast_for("cine", 1.5))
    gain = renderer.gain(0.3, 0.0, 0.05)
    for t in range(phases):
        signal, _ = renderer.frame(t / phases)
        magnitude_image(signal[0], gain, 1.0, 1000.0, 0.03, rng)
    return (time.perf_counter() - start) / phases * 1000


def subject_cost(out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    result = write_subject(SubjectJob(out, 0, 0, 0, "NOR"))
    return time.perf_counter() - start, result.frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the measures here")
    args = parser.parse_args()
    print(f"cine frame 128x128 (render + noise): {cine_frame_cost_ms():.2f} ms "
          "(the old supersampled render_sax: ~50 ms)")
    for name, cost in render_cost_ms().items():
        print(f"render, whole study, {name}: {cost:.2f} ms/frame")
    with tempfile.TemporaryDirectory() as tmp:
        seconds, frames = subject_cost(Path(tmp) / "one")
        print(f"one subject (site-0, render + DICOM + masks): {seconds:.2f} s, {frames} frames, "
              f"{seconds / frames * 1000:.2f} ms/frame")
        out = args.out or Path(tmp) / "demo"
        start = time.perf_counter()
        summary = write_cohort(out, 4, 2, seed=0, workers=args.workers, overwrite=True)
        elapsed = time.perf_counter() - start
        subjects = sum(s["subjects"] for s in summary["sites"])
        files = sum(1 for p in out.rglob("*") if p.is_file())
        print(f"demo cohort 4 sites x 2 subjects ({subjects} subjects, {files} files, "
              f"{args.workers} workers): {elapsed:.1f} s")
    write_measures(args.json, "cohort_speed", [
        Measure("4-site demo cohort written", elapsed, "<= 60", "s"),
        Measure("rendered and written per frame", seconds / frames * 1000, "", "ms")])


if __name__ == "__main__":
    main()
