"""Shared test fixtures: a tiny procedural dataset written once per session."""
from pathlib import Path

TINY = ["--res", "32", "--workers", "1", "--set", "occupancy.num_points=6000",
        "--set", "occupancy.num_surface=6000"]


def make_tiny_dataset(root: Path, num: int = 10, seed: int = 0, extra=()) -> Path:
    from scripts.make_shapes import main
    assert main(["--out", str(root), "--num", str(num), "--seed", str(seed), *TINY, *extra]) == 0
    return root
