"""Entry-point helpers: expected failures become one line on stderr and exit status 2.

`run(main)` prints the errors of EXPECTED as "error: ..." and exits 2; `ArgumentParser` makes
argparse's errors the same kind of line (a misspelt option is named with the closest one), and
`check_device` turns --device into a torch.device or a one-line error."""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from pathlib import Path

import torch

from datasets.errors import DatasetError, short_message, without_unsafe_advice
from utils.checkpoint import CheckpointError
from utils.config import ConfigError

EXPECTED = (DatasetError, ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError,
            ValueError)


def error_line(exc: BaseException) -> str:
    """The one line printed for an expected error: our message, or for an OS error without one
    the path and the reason."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}; check the path and its permissions"
    return without_unsafe_advice(" ".join(short_message(exc).split()))


def run(main):
    """Call main(); print expected errors as 'error: ...' without a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except EXPECTED as e:
        report(f"error: {error_line(e)}")
        code = 2
    sys.exit(code or 0)


def report(line: str) -> None:
    """Print an error line; under scripts/launch.py (LAUNCH_ERRORS names a folder) hand it to the
    launcher instead, which prints one line for all the processes."""
    folder = os.environ.get("LAUNCH_ERRORS")
    try:
        if folder:
            Path(folder, f"{os.environ.get('RANK', '0')}.txt").write_text(line, encoding="utf-8")
            return
    except OSError:
        pass
    print(line, file=sys.stderr)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows each option's default, except empty ones
    (None: the config decides, and such options say so in their own help; off; no items)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations, --help showing the defaults (HelpFormatter), whose errors are ValueErrors (one line through `run`, exit
    status 2) and whose unknown options are named with the closest known one:
    "--promt: unknown option; did you mean --prompt?"."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise ValueError(" ".join(str(message).split()))

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        self._check_options(args)
        return super().parse_known_args(args, namespace)

    def _check_options(self, args: list) -> None:
        """Unknown options first: argparse would report a missing required argument instead."""
        known = [s for action in self._actions for s in action.option_strings]
        for arg in args:
            if arg == "--":
                break
            if not isinstance(arg, str) or len(arg) < 2 or arg[0] not in self.prefix_chars or " " in arg:
                continue
            try:
                float(arg)              # a negative number (or -inf) is a value
                continue
            except ValueError:
                pass
            flag = arg.split("=", 1)[0]
            if flag not in known:
                close = difflib.get_close_matches(flag, [k for k in known if k.startswith("--")] or known, n=1,
                                                  cutoff=0.6)
                hint = f"did you mean {close[0]}?" if close else f"see {self.prog} --help"
                raise ValueError(f"{flag}: unknown option; {hint}")


def check_device(name: str, flag: str = "--device") -> torch.device:
    """The torch.device that `name` names, if this machine has it; else a one-line ValueError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {name}: not a device name; use cpu, or cuda (cuda:N for the N-th GPU)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        raise ValueError(f"{flag} {name}: no {device.type} device is available; use cpu or cuda")
    return device
