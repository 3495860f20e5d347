#!/usr/bin/env python
"""Speed of the turntable render stage of sample.py: volume rendering the triplane ("field")
against rasterising its extracted mesh ("mesh", the default when a mesh exists).

    python scripts/bench_render.py                                  # the demo model, 24 frames at 128^2
    python scripts/bench_render.py --frames 8 --resolution 256 --sources mesh --out /tmp/views.png

One object is sampled for --prompt and its mesh extracted as sample.py does (neither is timed);
then each source renders the same turntable (20 degrees elevation, radius 2, azimuths
360/frames apart) --repeats times. Prints one row per source: frames, resolution, source, the
best of the repeats in seconds and in milliseconds per frame, and, against the field render,
how the views agree: silhouette IoU (pixels darker than 250 in some channel) and the mean
absolute colour difference (0-255) over the pixels both cover. --out writes the views as a PNG,
one row per source.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.sar3d import SAR3DPipeline  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.media import write_grid  # noqa: E402

SOURCES = ("field", "mesh")


def agreement(views: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Silhouette IoU and mean absolute colour difference (0-255) over the shared silhouette of
    two stacks of views (N, R, R, 3) uint8 on white."""
    a, b = (views < 250).any(-1), (reference < 250).any(-1)
    both = a & b
    iou = both.sum() / max(1, (a | b).sum())
    diff = np.abs(views.astype(np.int16) - reference.astype(np.int16))[both].mean() if both.any() else float("nan")
    return float(iou), float(diff)


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, help="pipeline folder (default: the demo model, checkpoints/demo)")
    ap.add_argument("--prompt", default="a red torus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--resolution", type=int, default=128, help="views are resolution^2 pixels")
    ap.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid, as sample.py")
    ap.add_argument("--sources", default=",".join(SOURCES), help="comma-separated: field, mesh")
    ap.add_argument("--repeats", type=int, default=1, help="timed turntables per source (the best is shown)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="PNG of the views, one row per source")
    args = ap.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not sources or any(s not in SOURCES for s in sources):
        raise ValueError(f"--sources {args.sources!r}: use a comma-separated list of {', '.join(SOURCES)}")
    if min(args.frames, args.resolution, args.repeats) < 1:
        raise ValueError("--frames, --resolution and --repeats must be positive")

    pipe = SAR3DPipeline.from_pretrained(args.models, "text", device=args.device)
    obj = pipe(args.prompt, seed=args.seed, mesh_resolution=args.mesh_resolution, frames=0)[0]
    if obj.mesh is None and "mesh" in sources:
        raise ValueError(f"--prompt {args.prompt!r}: the sample has no mesh ({obj.mesh_error}); try another --seed")
    faces = 0 if obj.mesh is None else len(obj.mesh[1])
    print(f"{args.prompt!r}: mesh of {faces} faces ({obj.times['mesh']:.2f} s, not timed below); "
          f"device {args.device}, {torch.get_num_threads()} torch threads", flush=True)

    rows, views = [], {}
    for source in sources:
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            views[source] = pipe.turntable(obj.triplane, args.frames, args.resolution, mesh=obj.mesh, source=source)
            best = min(best, time.perf_counter() - t)
        rows.append((source, best))

    print(f"{'frames':>6}  {'resolution':>10}  {'source':>6}  {'seconds':>8}  {'ms/frame':>8}  "
          f"{'IoU':>5}  {'|dRGB|':>6}")
    for source, seconds in rows:
        iou, diff = agreement(views[source], views["field"]) if "field" in views else (float("nan"),) * 2
        print(f"{args.frames:>6}  {f'{args.resolution}^2':>10}  {source:>6}  {seconds:>8.2f}  "
              f"{1000 * seconds / args.frames:>8.1f}  {iou:>5.3f}  {diff:>6.1f}")
    if len(rows) > 1:
        base = dict(rows)
        if "field" in base and "mesh" in base:
            print(f"mesh is {base['field'] / base['mesh']:.1f}x faster than field")
    if args.out is not None:
        grid = np.concatenate([views[s] for s in sources])
        write_grid(args.out, grid, cols=args.frames)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
