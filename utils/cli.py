"""Entry-point helpers: expected failures become one line on stderr and exit status 2."""
from __future__ import annotations

import logging
import sys

from datasets.errors import DatasetError, short_message
from utils.checkpoint import CheckpointError
from utils.config import ConfigError

EXPECTED = (DatasetError, ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError)


def run(main):
    """Call main(); print expected errors as 'error: ...' without a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except EXPECTED as e:
        print(f"error: {short_message(e)}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
