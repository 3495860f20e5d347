#!/usr/bin/env python
"""Write a folder of meshes (OBJ, PLY, STL, GLB, GLTF; searched recursively) in both layouts.

    python scripts/render_meshes.py --meshes my_meshes --out data/my_meshes --res 256

Each mesh is normalised into the world of datasets/builder.py (+z up, centred, longest side
0.9; --up y, the default, rotates y-up files such as glTF) and gets 12 G-buffer views, a caption,
occupancy samples (generalized winding number, so meshes with holes work) and a surface point
cloud. Category: the mesh's folder relative to --meshes ("meshes" at the top); object id: the
file stem, suffixed on a clash. Caption: a sidecar <stem>.txt, else captions.json in --meshes
({relative path or stem: caption}), else the file name. Meshes that cannot be used (unreadable,
no faces, NaN vertices, zero extent, no interior) are skipped with one line each. Re-running
with the same settings keeps finished objects and writes only the missing ones.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from datasets.builder import add_build_arguments, load_build_config, write_indices, write_object  # noqa: E402
from datasets.errors import DatasetError, short_message  # noqa: E402
from datasets.meshes import (MESH_SUFFIXES, MeshObject, assign_names, caption_for, find_meshes,  # noqa: E402
                             read_captions, read_mesh)
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import to_dict  # noqa: E402
from utils.parallel import parallel_map  # noqa: E402

def _render_one(job):
    """-> (status "written" or "skipped", mesh path, category, obj_id, note or reason)."""
    out, path, category, obj_id, caption, up, cfg = job
    # trimesh logs load failures with tracebacks; each failure is reported as one line instead.
    logging.getLogger("trimesh").setLevel(logging.CRITICAL)
    try:
        obj = MeshObject(read_mesh(path), caption, category, up=up, path=path)
        write_object(out, category, obj_id, obj, cfg, seed=zlib.crc32(f"{category}/{obj_id}".encode()))
    except DatasetError as e:
        return "skipped", path, category, obj_id, e.reason
    except Exception as e:  # one bad mesh (renderer, memory, trimesh internals) must not stop the run
        return "skipped", path, category, obj_id, f"{type(e).__name__}: {short_message(e)}"
    note = "" if obj.watertight else "not watertight; occupancy from the generalized winding number"
    return "written", path, category, obj_id, note


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--meshes", required=True, type=Path, help="folder of mesh files")
    ap.add_argument("--out", required=True, type=Path, help="dataset root to write")
    ap.add_argument("--up", choices=("y", "z"), default="y", help="the files' up axis (glTF and most OBJ: y)")
    add_build_arguments(ap)
    args = ap.parse_args(argv)
    cfg = load_build_config(args)
    if not args.meshes.is_dir():
        raise NotADirectoryError(f"--meshes {args.meshes} is not a directory")
    files = find_meshes(args.meshes)
    if not files:
        raise DatasetError(args.meshes, f"no mesh files ({', '.join(MESH_SUFFIXES)}) in this folder")
    captions = read_captions(args.meshes)

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"generator": "render_meshes", "meshes": str(args.meshes.resolve()), "up": args.up,
                "config": to_dict(cfg)}
    stamp = args.out / "meshes.json"
    previous = {}
    if stamp.exists() and not args.overwrite:
        old = json.loads(stamp.read_text())
        if {k: v for k, v in old.items() if k != "objects"} != settings:
            raise ValueError(f"{args.out} was written with other settings ({stamp}); use another --out or --overwrite")
        previous = old["objects"]
    names = assign_names(args.meshes, files, previous)
    # Written before rendering, so an interrupted run resumes with the same file -> id mapping.
    stamp.write_text(json.dumps({**settings, "objects": {**previous, **names}}, indent=1) + "\n")

    done, jobs = {}, []
    for path in files:
        category, obj_id = names[path.relative_to(args.meshes).as_posix()].split("/")
        if not args.overwrite and (args.out / category / obj_id).is_dir():
            done.setdefault(category, []).append(obj_id)
        else:
            jobs.append((args.out, path, category, obj_id, caption_for(path, args.meshes, captions), args.up, cfg))
    t0 = time.time()
    written, skipped = 0, 0
    for status, path, category, obj_id, message in parallel_map(_render_one, jobs, args.workers, "render_meshes"):
        if status == "written":
            written += 1
            done.setdefault(category, []).append(obj_id)
            if message:
                tqdm.write(f"note {path}: {message}")
        else:
            skipped += 1
            tqdm.write(f"skipped {path}: {message}")
    minutes = (time.time() - t0) / 60
    n = sum(len(v) for v in done.values())
    if n == 0:
        print(f"error: none of the {len(files)} meshes in {args.meshes} could be used ({skipped} skipped, "
              "reasons above)", file=sys.stderr)
        return 2
    write_indices(args.out, done, cfg.holdout_fraction)
    rate = f", {written / minutes:.1f} objects/min" if written and minutes > 0 else ""
    print(f"wrote {written} objects ({n} in {args.out}), skipped {skipped} meshes{rate}")
    return 0


if __name__ == "__main__":
    run(main)
