"""The GPU check script runs its whole path on the CPU (--cpu-smoke) and prints its table."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--json",
                             str(tmp_path / "out.json")], capture_output=True, text=True, env=env,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("project loop", "plain loop", "ratio", "MFU"):
        assert line in result.stdout
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["project_images_per_s"] > 0 and out["plain_images_per_s"] > 0
    assert 0 < out["mfu"] < 1.5 and out["step_tflop"] > 0
