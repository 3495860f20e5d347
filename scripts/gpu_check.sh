#!/usr/bin/env bash
# One prepared, unattended run that measures every CUDA path of the codebase (scripts/gpu_check.py
# says what): about 8 minutes on one H100. On a fresh CUDA machine that has only this repository
# it installs first (timed, in OUT/install.txt); --cpu runs the same steps with small configs on
# a CPU and installs nothing (CI runs it).
#   bash scripts/gpu_check.sh [--cpu] [OUT]        # OUT: outputs/gpu_check (or outputs/gpu_check_cpu)
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=""
OUT=""
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=--cpu ;;
    *) OUT="$arg" ;;
  esac
done
OUT=${OUT:-outputs/gpu_check${CPU:+_cpu}}
mkdir -p "$OUT"
if [ -z "$CPU" ]; then
  t0=$(date +%s)
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null ||
    python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 ||
    echo "could not install a CUDA build of torch" >> "$OUT/install.txt"
  python -m pip install -q -r requirements.txt && python -m pip install -q --no-deps -r requirements-encoders.txt ||
    echo "pip install -r requirements.txt failed" >> "$OUT/install.txt"
  for extra in nvdiffrast flash-attn; do            # optional: measured when they install
    python -m pip install -q --no-build-isolation "$extra" >/dev/null 2>&1 || echo "$extra: not installed" >> "$OUT/install.txt"
  done
  echo "install: $(( $(date +%s) - t0 )) s" >> "$OUT/install.txt"
fi
exec python scripts/gpu_check.py $CPU --out "$OUT"
