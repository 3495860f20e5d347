#!/usr/bin/env python
"""The memory of converting, and then loading, an Argus-3D stage-2 file of the released size.

    python scripts/bench_convert.py --dir /path/with/40GB/free [--dtype bf16] [--size paper]

Writes a stand-in for model_stage2.pt (random values in the official layout: the paper tokenizer
under vqvae_model., the 3,663,104,000-parameter generator under transformer_model. with its tied
output projection; 14.7 GB), converts it with scripts/convert_official.py in a child process, then
loads the converted generator for sampling in another and runs one sampling step, sampling each
child's memory every 0.1 s. Prints a table: seconds, peak resident memory (VmHWM, which counts the
pages of the memory-mapped input: the kernel can drop those), and peak anonymous memory (RssAnon,
what the process really holds). The files are deleted at the end unless --keep.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.occupancy_vqvae import OccupancyVQVAE, OccupancyVQVAEConfig  # noqa: E402
from models.raster_ar import PRESETS, RasterAR, RasterARConfig  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOAD = """
import sys, torch
sys.path.insert(0, {root!r})
from models.ar import Condition
from models.raster_ar import load_raster_ar
model = load_raster_ar({ckpt!r})
with torch.no_grad():
    logits = model(torch.zeros(1, 1, dtype=torch.long), Condition(labels=torch.tensor([18])))
print(model.cfg.width, model.cfg.depth, tuple(logits.shape), next(model.parameters()).dtype)
"""


def write_stand_in(path: Path, size: str) -> int:
    """model_stage2.pt of `size` with random values; returns its number of generator parameters."""
    torch.manual_seed(0)
    state = {f"vqvae_model.{k}": v for k, v in OccupancyVQVAE(OccupancyVQVAEConfig()).state_dict().items()}
    with torch.device("meta"):
        skeleton = RasterAR(RasterARConfig.preset(size)).state_dict()
    count = 0
    for k, v in skeleton.items():
        state[f"transformer_model.{k}"] = torch.empty(v.shape).normal_(std=0.02)
        count += v.numel()
    state["transformer_model.z_value_dec.weight"] = state["transformer_model.emb.weight"]
    torch.save({"model": state, "it": 0}, path)
    return count


def watch(cmd: list) -> dict:
    """Run `cmd`, sampling its memory; returns seconds, peak VmHWM and RssAnon (GiB), output."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
            peak_anon = max(peak_anon, int(fields["RssAnon"].split()[0]))
            peak_rss = max(peak_rss, int(fields["VmHWM"].split()[0]))
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {out[-2000:]}")
    return {"seconds": time.time() - t0, "peak_rss_gib": peak_rss / 2 ** 20, "peak_anon_gib": peak_anon / 2 ** 20,
            "output": out.strip().splitlines()[-1] if out.strip() else ""}


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True, type=Path, help="working folder (about 30 GB free for the paper size)")
    ap.add_argument("--size", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    ap.add_argument("--keep", action="store_true", help="keep the stand-in and the converted files")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    src, out = args.dir / "model_stage2.pt", args.dir / "converted"
    t0 = time.time()
    params = write_stand_in(src, args.size)
    print(f"stand-in: {params:,} generator parameters, {src.stat().st_size / 2 ** 30:.1f} GiB, "
          f"written in {time.time() - t0:.0f} s")
    rows = {"convert": watch([sys.executable, str(ROOT / "scripts" / "convert_official.py"), "--kind", "argus-stage2",
                              "--src", str(src), "--out", str(out), "--dtype", args.dtype]),
            "load + one step": watch([sys.executable, "-c", LOAD.format(root=str(ROOT), ckpt=str(out / "generator"))])}
    size = sum(f.stat().st_size for f in (out / "generator").glob("*.safetensors")) / 2 ** 30
    print(f"\n{args.size} generator, {args.dtype}, converted size {size:.1f} GiB; total memory "
          f"{Path('/proc/meminfo').read_text().split()[1]} kB")
    print(f"| stage | seconds | peak resident (GiB) | peak anonymous (GiB) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.0f} | {r['peak_rss_gib']:.1f} | {r['peak_anon_gib']:.1f} |")
    print(rows["load + one step"]["output"])
    if not args.keep:
        src.unlink()
        for f in out.rglob("*"):
            if f.is_file():
                f.unlink()
    return 0


if __name__ == "__main__":
    run(main)
