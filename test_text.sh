#!/usr/bin/env bash
# The original test_text.sh's job in one process: every prompt of test_files/test_text.json to a
# mesh, turntable and preview under outputs/test_text/. Extra flags go to sample.py, e.g.
#   bash test_text.sh --official          # the official weights in checkpoints/
#   bash test_text.sh --ar DIR --vqvae DIR --num-samples 2
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
exec python "$HERE/sample.py" --prompts "$HERE/test_files/test_text.json" --output-dir outputs/test_text "$@"
