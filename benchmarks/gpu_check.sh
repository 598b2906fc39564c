#!/usr/bin/env bash
# The GPU check in one call (see benchmarks/gpu_check.py). On a GPU machine whose Python has
# torch and timm but not the rest of FedCMR's few pure-Python needs, it installs them from
# benchmarks/wheels/ (made beforehand with `benchmarks/gpu_check.sh --prepare` on a machine with
# an index; the folder travels with the working tree) into a throw-away folder, then runs.
#   benchmarks/gpu_check.sh --prepare      # here: fill benchmarks/wheels/
#   benchmarks/gpu_check.sh                # on the GPU machine
#   benchmarks/gpu_check.sh --cpu-smoke    # the same path on the CPU, in seconds (make test)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=benchmarks/wheels
if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
        omegaconf==2.4.0 "antlr4-python3-runtime==4.9.*" PyYAML safetensors
    echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l)"
    exit 0
fi
if ! "$PYTHON" -c "import omegaconf, safetensors, timm" 2>/dev/null; then
    SITE="$(mktemp -d)"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" \
        omegaconf safetensors
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
