#!/usr/bin/env bash
# Train the text-conditioned generator: the arguments of train_image.sh, the paper's text model by
# default. Run it with no arguments or --help for the details.
HERE=$(cd "$(dirname "$0")" && pwd)
SCRIPT=train_text.sh KIND=text exec bash "$HERE/train_image.sh" "$@"
