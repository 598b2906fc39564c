"""How a simulated federation scales with the number of sites: 8, 16 and 32 virtual sites x 3 rounds.

Each size runs in its own process (tiny preset, MAE, a few local steps per round, 1 CPU per
site so two sites train at a time on 2 cores) while this process samples the memory of that
process and all its children (Flower's simulation engine: Ray's GCS, raylet and actors),
as PSS where the kernel provides it (shared pages counted once), else RSS. Prints wall time,
time per site-round and peak memory per size. Goal: time linear in sites, 32 sites under 8 GiB.

    python benchmarks/scale.py [--sizes 8 16 32] [--rounds 3] [--local-steps 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import psutil
from measures import Measure, write_measures


def _federate(sites: int, rounds: int, local_steps: int, work: str) -> None:
    from client.node_settings import simulated_site_store
    from server.run_status import RunStatus
    from shared_model.config import load_config
    from sim.runner import run_federation
    from sim.sites import site_spec, write_site_frames

    root = Path(work)
    for index in range(sites):
        write_site_frames(simulated_site_store(root / "sites", index), site_spec(index, 1.5, 128), 16, seed=0)
    cfg = load_config("demo-cpu", [f"federation.rounds={rounds}", "federation.finetune_rounds=0",
                                   f"ssl.local_steps={local_steps}", "ssl.batch_size=16",
                                   f"sim.sites={sites}", f"federation.min_sites={sites}",
                                   "federation.secagg.mode=never", "device=cpu",
                                   f"output.dir={root / 'run'}"])
    outcome = run_federation(cfg, root / "sites")
    if outcome.status != RunStatus.released:
        raise SystemExit(f"run ended {outcome.status}: {outcome.detail}")


def _tree_memory(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", 0) or info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def measure(sites: int, rounds: int, local_steps: int, limit_s: float) -> tuple[float, int]:
    work = tempfile.mkdtemp(prefix=f"fedcmr-scale-{sites}-")
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_federate, args=(sites, rounds, local_steps, work))
    start = time.perf_counter()
    child.start()
    watched = psutil.Process(child.pid)
    peak = 0
    while child.is_alive():
        peak = max(peak, _tree_memory(watched))
        if time.perf_counter() - start > limit_s:
            for proc in watched.children(recursive=True):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    continue  # went with its parent
            child.kill()
            child.join()
            raise SystemExit(f"{sites} sites: no result within {limit_s:g} s (stopped)")
        time.sleep(0.5)
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{sites} sites: the federation failed (exit {child.exitcode})")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--limit-s", type=float, default=3600.0, help="per size; stops a stuck run")
    parser.add_argument("--json", type=Path, default=None, help="write the measures here")
    args = parser.parse_args()
    rows = []
    for sites in args.sizes:
        seconds, peak = measure(sites, args.rounds, args.local_steps, args.limit_s)
        rows.append((sites, seconds, peak))
        print(f"{sites} sites: {seconds:.1f} s, peak {peak / 2**30:.2f} GiB", flush=True)
    print(f"\n{'sites':>6s} {'wall s':>8s} {'s per site-round':>17s} {'peak GiB':>9s}")
    for sites, seconds, peak in rows:
        print(f"{sites:6d} {seconds:8.1f} {seconds / (sites * args.rounds):17.2f} {peak / 2**30:9.2f}")
    if len(rows) >= 2:
        (n0, t0, _), (n1, t1, _) = rows[0], rows[-1]
        print(f"time ratio {t1 / t0:.2f} for a site ratio of {n1 / n0:.1f} (linear: equal); "
              f"goal: 32 sites under 8 GiB")
        write_measures(args.json, "scale", [
            Measure(f"wall time {n1} / {n0} sites (site ratio {n1 / n0:g})", t1 / t0, f"<= {n1 / n0:g}"),
            Measure(f"peak memory, {n1} sites", rows[-1][2] / 2**30, "<= 8", "GiB")])


if __name__ == "__main__":
    main()
