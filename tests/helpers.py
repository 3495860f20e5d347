"""Shared test helpers: a tiny procedural dataset, a run's step log, a torchrun launch."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--res", "32", "--workers", "1", "--set", "occupancy.num_points=6000",
        "--set", "occupancy.num_surface=6000"]


def make_tiny_dataset(root: Path, num: int = 10, seed: int = 0, extra=()) -> Path:
    from scripts.make_shapes import main
    assert main(["--out", str(root), "--num", str(num), "--seed", str(seed), *TINY, *extra]) == 0
    return root


def train_log(out) -> list:
    """The per-step records of a run folder's train_log.jsonl."""
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def torchrun(script: str, args: list, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """The repository's `script` under torch.distributed.run with `nproc` CPU processes (gloo, one
    thread each); fails the test with the end of its stderr unless every process exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(ROOT / script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
