#!/usr/bin/env python
"""torchrun for the trainers, reporting a failure as the one line the trainer printed.

    python scripts/launch.py --nproc_per_node N train_ar.py --config ... [torchrun options before the script]

With one process the trainer runs directly (no torchrun). With several, process 0 prints to the
terminal as usual and the others' output goes to a temporary folder; when processes fail, the
one-line error of the lowest rank that reported one (utils.cli.report) is what the user sees,
once, instead of every process's line and torchrun's traceback of the launcher.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _nproc(argv: list) -> int:
    for i, a in enumerate(argv):
        for flag in ("--nproc_per_node", "--nproc-per-node"):
            if a == flag and i + 1 < len(argv):
                return int(argv[i + 1])
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
    return 1


def _script_index(argv: list) -> int:
    """Position of the training script: the first argument ending in .py."""
    return next(i for i, a in enumerate(argv) if a.endswith(".py"))


def _first_error(errors: Path) -> str | None:
    """The error line of the lowest rank that reported one (utils.cli.report)."""
    files = sorted(errors.glob("*.txt"), key=lambda p: int(p.stem) if p.stem.isdigit() else 1 << 30)
    return files[0].read_text(encoding="utf-8", errors="replace").strip() if files else None


def main(argv: list) -> int:
    try:
        nproc, at = _nproc(argv), _script_index(argv)
    except (ValueError, StopIteration):
        print("error: usage: python scripts/launch.py --nproc_per_node N SCRIPT.py [script arguments]",
              file=sys.stderr)
        return 2
    if nproc <= 1:
        return subprocess.call([sys.executable, *argv[at:]])
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log_dir = Path(tempfile.mkdtemp(prefix="launch_"))
    os.environ["LAUNCH_ERRORS"] = str(log_dir / "errors")
    (log_dir / "errors").mkdir()
    redirects = ",".join(f"{r}:2" for r in range(1, nproc))
    try:
        torchrun(["--log-dir", str(log_dir / "logs"), "--redirects", redirects, *argv])
    except ChildFailedError as e:
        failures = sorted(e.failures.values(), key=lambda f: f.local_rank)
        first = next((f for f in failures if f.exitcode > 0), failures[0])
        print(_first_error(log_dir / "errors") or
              f"error: process {first.local_rank} failed (exit {first.exitcode}); the other processes' logs: "
              f"{log_dir / 'logs'}", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
