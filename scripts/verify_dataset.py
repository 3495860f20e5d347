#!/usr/bin/env python
"""Check every file of a dataset and name each damaged or missing one.

    python scripts/verify_dataset.py data/shapes                    # both layouts of make_shapes
    python scripts/verify_dataset.py data/sar3d --tokens --condition image --workers 8

Prints one line per problem, `<path>: <what is wrong>`, then a summary line, and exits 1 if
anything is wrong, 0 on a clean dataset. --layout auto checks the G-buffer layout when
DIR/dataset.json exists and the occupancy layout when a category folder has .lst split lists
(both for scripts/make_shapes.py output). --tokens also checks the precomputed token files
of G-buffer objects, --condition (implies --tokens) their condition embeddings.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from datasets.verify import LAYOUTS, check_objects, detect_layouts, find_objects  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("dir", type=Path, help="dataset root")
    ap.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto")
    ap.add_argument("--tokens", action="store_true", help="also check the precomputed token files")
    ap.add_argument("--condition", choices=("image", "text"), help="also check these condition embeddings")
    ap.add_argument("--workers", type=int, default=1, help="processes reading objects")
    args = ap.parse_args(argv)
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if not args.dir.is_dir():
        raise NotADirectoryError(f"{args.dir}: not a directory")

    layouts = detect_layouts(args.dir, args.layout)
    problems, targets = find_objects(args.dir, layouts)
    for line in problems:
        print(line)
    for lines in check_objects(targets, args.tokens, args.condition, args.workers):
        for line in lines:
            tqdm.write(line, file=sys.stdout)  # above the progress bar, which stays on stderr
        problems += lines
    print(f"{len(targets)} objects checked ({', '.join(layouts) or 'no layout found'}): "
          f"{len(problems)} problem{'' if len(problems) == 1 else 's'} found")
    return 1 if problems else 0


if __name__ == "__main__":
    run(main)
