"""``make bench``: every CPU benchmark, one table, ``bench-results.json``.

Runs each benchmark in ``benchmarks/`` one after the other (so they do not share the cores),
each with ``--json`` and the settings below (sized so the whole run stays under 45 minutes on 2
cores), then prints measure, value, goal, held or not, and the machine. A benchmark that fails
is listed with its exit status; its measures are missing, never counted as held.

    python benchmarks/run_all.py [--out bench-results.json] [--only intake_speed scale ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmark -> arguments for make bench (a benchmark's own defaults are its full protocol)
PLAN: dict[str, list[str]] = {
    "intake_speed": ["--repeats", "4"],
    "cohort_speed": [],
    "federation_cost": ["--rounds", "5"],
    "scale": ["--sizes", "8", "32"],
    "sunnybrook_fewshot": ["--budgets", "1", "3", "--seeds", "3", "--seconds", "60"],
}


def run(name: str, args: list[str], folder: Path) -> tuple[dict | None, float, int]:
    out = folder / f"{name}.json"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out)],
                          check=False)
    seconds = time.perf_counter() - start
    result = json.loads(out.read_text()) if done.returncode == 0 and out.is_file() else None
    return result, seconds, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--only", nargs="+", choices=list(PLAN), default=list(PLAN))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedcmr-bench-") as tmp:
        for name in args.only:
            print(f"== {name} {' '.join(PLAN[name])}", flush=True)
            result, seconds, code = run(name, PLAN[name], Path(tmp))
            results.append({"benchmark": name, "seconds": round(seconds, 1), "exit": code,
                            "machine": result["machine"] if result else "",
                            "measures": result["measures"] if result else []})
    args.out.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"written to {args.out}")


def print_table(results: list[dict]) -> None:
    print(f"\n{'benchmark':20s} {'measure':62s} {'value':>10s} {'goal':>8s} {'held':>5s}")
    held = goals = 0
    for entry in results:
        if entry["exit"] != 0:
            print(f"{entry['benchmark']:20s} {'(failed, exit ' + str(entry['exit']) + ')':62s}")
            continue
        for m in entry["measures"]:
            mark = "" if m["held"] is None else ("yes" if m["held"] else "NO")
            goals += m["held"] is not None
            held += bool(m["held"])
            value = f"{m['value']:.3f}" + (f" {m['unit']}" if m["unit"] else "")
            print(f"{entry['benchmark']:20s} {m['measure'][:62]:62s} {value:>10s} {m['goal']:>8s} {mark:>5s}")
    machines = sorted({e["machine"] for e in results if e["machine"]})
    print(f"\n{held} of {goals} goals held; machine: {'; '.join(machines)}; "
          f"{sum(e['seconds'] for e in results) / 60:.1f} min")


if __name__ == "__main__":
    main()
