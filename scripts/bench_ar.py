#!/usr/bin/env python
"""Sampling speed of the generator, with and without the KV cache.

    python scripts/bench_ar.py --config configs/ar/paper_image.yaml --batch 1
    python scripts/bench_ar.py --config configs/ar/paper_text.yaml --device cuda --batch 1,8,32 --json bench.json
    python scripts/bench_ar.py --config configs/argus/gpt_paper.yaml --batch 1,16 --tokens 16   # Argus-3D

The model and the quantizer are built from the config with random weights (speed does not depend
on the values); conditions are random tensors of the encoder's shape (256 DINOv2 tokens, 77 CLIP
tokens), guidance on (the batch is doubled) as in sampling. Prints one row per (batch, cache):
total seconds, tokens per second (B·L / seconds), peak memory (CUDA: allocated by torch; CPU: the
process's peak resident size so far) and the time of each scale.

An Argus-3D config (kind: raster) samples class-guided with the official top-k 250. --tokens N
times only the start and extrapolates to the whole sequence, saying so: cached, the first N
steps (each costs about the same); uncached, one step at prefixes 1, N/4, N/2 and N (each
recomputes its prefix: time = a + b·positions, fitted and summed over all steps).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.ar import ARConfig, Condition, NextScaleAR  # noqa: E402
from models.quantizer import TriplaneQuantizer  # noqa: E402
from models.raster_ar import RasterAR  # noqa: E402
from trainers.ar import ARRunConfig  # noqa: E402
from trainers.raster_ar import RasterRunConfig  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import load_config, read_yaml  # noqa: E402

SEQ_LEN = {"image": 256, "text": 77}


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # kB on Linux


def conditions(cfg: ARConfig, B: int, device) -> tuple:
    if cfg.condition == "class":
        return Condition(labels=torch.zeros(B, dtype=torch.long, device=device)), None
    if cfg.condition == "none":
        return Condition(), None
    T = SEQ_LEN[cfg.condition]
    g = torch.Generator().manual_seed(0)
    cond = Condition(pooled=torch.randn(B, cfg.pooled_dim, generator=g).to(device),
                     tokens=torch.randn(B, T, cfg.seq_dim, generator=g).to(device))
    return cond, Condition(pooled=torch.zeros(cfg.pooled_dim, device=device),
                           tokens=torch.zeros(T, cfg.seq_dim, device=device))


def fit_steps(prefixes: list, seconds: list, length: int) -> float:
    """Seconds of all `length` uncached steps from steps timed at a few prefix lengths: step i
    recomputes i + 3 positions, time = a + b·positions by least squares."""
    x, y = torch.tensor(prefixes, dtype=torch.float64) + 2, torch.tensor(seconds, dtype=torch.float64)
    b = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    a = y.mean() - b * x.mean()
    return float(sum(a + b * (i + 3) for i in range(length)))


@torch.no_grad()
def uncached_step(model: RasterAR, B: int, prefix: int, device) -> float:
    """Seconds of one uncached sampling step at `prefix` tokens (RasterAR.sample(use_cache=False):
    the model over condition, SOS and the prefix, the head at the last position)."""
    c = model.embed_condition(Condition(labels=torch.zeros(B, dtype=torch.long, device=device)))
    tokens = torch.zeros(B, prefix, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    h = model.run(torch.cat((model.prefix(c), model.emb(tokens) + model.pos_emb.weight[1:prefix + 1]), 1))
    model.head(h[:, -1:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_raster(args, device) -> list:
    cfg = load_config(RasterRunConfig, args.config)
    full = cfg.num_tokens
    n = min(args.tokens or full, full)
    torch.manual_seed(0)
    model = RasterAR(cfg).to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    prefixes = sorted({1, max(1, n // 4), max(1, n // 2), n})
    part = (f"cached: the first {n} of {full} steps timed, their mean x {full}; uncached: one step at each prefix "
            f"{prefixes}, a + b·positions fitted and summed over the {full} steps") if n < full else f"all {full} steps timed"
    print(f"{args.config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, device {device}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} CPU threads\n{part}")
    print(f"{'batch':>5} {'cache':>5} {'timed s':>9} {'s/token':>9} {'full s':>9} {'tokens/s':>9} {'peak MB':>9}")
    rows = []
    for B in (int(b) for b in args.batch.split(",")):
        for cache in (True, False):
            with autocast:
                if n == full or cache:
                    steps = []
                    model.sample(None, Condition(labels=torch.zeros(B, dtype=torch.long, device=device)), top_k=250,
                                 seed=0, use_cache=cache, step_seconds=steps, max_steps=n)
                    timed, total = sum(steps), sum(steps) / len(steps) * full
                else:
                    steps = [uncached_step(model, B, p, device) for p in prefixes]
                    timed, total = sum(steps), fit_steps(prefixes, steps, full)
            row = dict(config=args.config.name, device=str(device), dtype="bf16" if args.bf16 else "fp32", batch=B,
                       cache=cache, timed_seconds=timed, seconds=total, extrapolated=n < full,
                       seconds_per_token=total / full, tokens_per_s=B * full / total, peak_mem_mb=peak_mem_mb(device))
            rows.append(row)
            print(f"{B:>5} {str(cache):>5} {timed:>9.2f} {row['seconds_per_token']:>9.3f} {total:>9.1f} "
                  f"{row['tokens_per_s']:>9.2f} {row['peak_mem_mb']:>9.0f}")
        print(f"      batch {B}: the cache is {rows[-1]['seconds'] / rows[-2]['seconds']:.1f}x faster per generated "
              f"token{' (extrapolated)' if n < full else ''}")
    return rows


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, type=Path, help="generator config (configs/ar/*.yaml)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--tokens", type=int, default=0, help="Argus-3D: time only the first N steps and extrapolate")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)
    if args.config.is_file() and read_yaml(args.config).get("kind") == "raster":
        rows = bench_raster(args, device)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    cfg = load_config(ARRunConfig, args.config)      # its train: section, if any, is not used
    torch.manual_seed(0)
    model = NextScaleAR(cfg).to(device).eval()
    quant = TriplaneQuantizer(cfg.vocab_size, cfg.c_vae, cfg.patch_nums, official_quirks=False).to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    rows = []
    print(f"{args.config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg.seq_len} tokens, {len(cfg.patch_nums)} scales, device {device}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} CPU threads")
    print(f"{'batch':>5} {'cache':>5} {'seconds':>9} {'tokens/s':>9} {'peak MB':>9}  per scale (ms)")
    for B in (int(b) for b in args.batch.split(",")):
        cond, uncond = conditions(cfg, B, device)
        for cache in (True, False):
            times = []
            for r in range(args.warmup + args.repeats):
                per_scale = []
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                with autocast:
                    model.sample(quant, cond, uncond, batch=B, guidance=4.0, top_k=10, top_p=0.5, seed=r,
                                 use_cache=cache, scale_seconds=per_scale)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= args.warmup:
                    times.append((time.perf_counter() - t0, per_scale))
            seconds = sum(t for t, _ in times) / len(times)
            scales = [sum(t[1][i] for t in times) / len(times) for i in range(len(cfg.patch_nums))]
            row = dict(config=args.config.name, device=str(device), dtype="bf16" if args.bf16 else "fp32",
                       batch=B, cache=cache, seconds=seconds, tokens_per_s=B * cfg.seq_len / seconds,
                       peak_mem_mb=peak_mem_mb(device), scale_ms=[1000 * s for s in scales])
            rows.append(row)
            print(f"{B:>5} {str(cache):>5} {seconds:>9.3f} {row['tokens_per_s']:>9.1f} {row['peak_mem_mb']:>9.0f}  "
                  + " ".join(f"{ms:.0f}" for ms in row["scale_ms"]))
        with_c, without = rows[-2]["seconds"], rows[-1]["seconds"]
        print(f"      batch {B}: the cache is {without / with_c:.2f}x faster")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run(main)
