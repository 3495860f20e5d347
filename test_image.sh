#!/usr/bin/env bash
# The original test_image.sh's job in one process: every image of test_files/images/ to a mesh,
# turntable and preview under outputs/test_image/. Extra flags go to sample.py, e.g.
#   bash test_image.sh --official         # the official weights in checkpoints/
#   bash test_image.sh --image my_images/ --output-dir outputs/mine
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
exec python "$HERE/sample.py" --image "$HERE/test_files/images" --output-dir outputs/test_image "$@"
