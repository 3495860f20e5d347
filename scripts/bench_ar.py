#!/usr/bin/env python
"""Sampling speed of the generator: with and without the KV cache, at each precision and batch,
and against what the machine can do.

    python scripts/bench_ar.py --config configs/ar/paper_text.yaml --batch 1 --precision fp32,int8
    python scripts/bench_ar.py --config checkpoints/demo/ar_text --batch 1,8,32 --cache on --no-roofline
    python scripts/bench_ar.py --config configs/ar/paper_image.yaml --device cuda --batch 1,32 --precision bf16
    python scripts/bench_ar.py --config configs/argus/gpt_paper.yaml --batch 1,16 --tokens 16   # Argus-3D

--config is a generator config (random weights: speed does not depend on the values; conditions
are random tensors of the encoder's shape, 256 DINOv2 tokens or 77 CLIP tokens) or a trained
generator folder (its weights, its VQVAE's quantizer and its encoder's embeddings of the prompts
or images of test_files/: the token agreement of int8 with fp32 then means something). Guidance on (the batch is doubled) as in sampling, seeds 0, 1, ... for the warm-up and timed
runs. One row per (precision, batch, cache): seconds per batch, objects and tokens per second,
peak memory (CUDA: allocated by torch; CPU: the process's peak resident size so far), the time of
each scale; for the static cache the share of tokens equal to the dynamic cache's with the same
seeds (all, by construction), and for int8/bf16 beside fp32 one more run per batch with greedy
draws (top-k 1, so that only the logits decide) and its share of tokens equal to fp32's: int8
draws its top-k/top-p tokens by another protocol (models/precision.py), so its sampled tokens
are compared through the shape check instead (eval_prompts.py --precision int8).

The roofline table (one more cached run per precision and batch, inside utils.roofline.OpMeter):
GFLOP per object of the linear layers and of attention; GFLOP/s of the whole sampler (all counted
FLOPs over the timed run's seconds), of its linear layers and of its attention (each over its own
time); the matmul limit, the rate of the same matmul shapes run alone on this device and dtype;
and the linear layers' share of that limit.

An Argus-3D config (kind: raster) samples class-guided with the official top-k 250. --tokens N
times only the start and extrapolates to the whole sequence, saying so: cached, the first N
steps (each costs about the same); uncached, one step at prefixes 1, N/4, N/2 and N (each
recomputes its prefix: time = a + b·positions, fitted and summed over all steps).
"""
from __future__ import annotations

import copy
import json
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.ar import ARConfig, Condition, NextScaleAR, load_ar  # noqa: E402
from models.conditioners import load_conditioner  # noqa: E402
from models.layout import check_pair, tokenizer_signature  # noqa: E402
from models.precision import PRECISIONS, autocast, check_precision, set_precision  # noqa: E402
from models.quantizer import TriplaneQuantizer  # noqa: E402
from models.raster_ar import RasterAR  # noqa: E402
from models.vqvae import load_vqvae  # noqa: E402
from pipelines.sar3d import load_image  # noqa: E402
from trainers.ar import ARRunConfig  # noqa: E402
from trainers.raster_ar import RasterRunConfig  # noqa: E402
from utils.cli import ArgumentParser, run  # noqa: E402
from utils.config import load_config, read_yaml  # noqa: E402
from utils.roofline import OpMeter  # noqa: E402

SEQ_LEN = {"image": 256, "text": 77}


def trained_conditions(cfg: ARConfig, B: int, device) -> tuple:
    """A trained generator's conditions: its encoder's embeddings of the prompts of
    test_files/test_text.json (text) or the images of test_files/images (image), cycled to B."""
    enc = load_conditioner(cfg.condition, cfg.encoder or None, device)
    if cfg.condition == "text":
        inputs = json.loads((ROOT / "test_files" / "test_text.json").read_text())["test_promts"]
    else:
        inputs = [load_image(p) for p in sorted((ROOT / "test_files" / "images").glob("*.png"))]
    tokens, pooled = enc.encode([inputs[i % len(inputs)] for i in range(B)])
    empty_tokens, empty_pooled = enc.empty()
    return Condition(pooled=pooled, tokens=tokens), Condition(pooled=empty_pooled, tokens=empty_tokens)


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
    precision = args.precision[0]
    model = set_precision(model, precision, device)
    prefixes = sorted({1, max(1, n // 4), max(1, n // 2), n})
    part = (f"cached: the first {n} of {full} steps timed, their mean x {full}; uncached: one step at each prefix "
            f"{prefixes}, a + b·positions fitted and summed over the {full} steps") if n < full else f"all {full} steps timed"
    print(f"{args.config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, device {device}, "
          f"{precision}, {torch.get_num_threads()} CPU threads\n{part}")
    print(f"{'batch':>5} {'cache':>5} {'timed s':>9} {'s/token':>9} {'full s':>9} {'tokens/s':>9} {'peak MB':>9}")
    rows = []
    for B in args.batch:
        for cache in (True, False):
            with autocast(precision, device):
                if n == full or cache:
                    steps = []
                    model.sample(None, Condition(labels=torch.zeros(B, dtype=torch.long, device=device)), top_k=250,
                                 seed=0, use_cache=cache, step_seconds=steps, max_steps=n)
                    timed, total = sum(steps), sum(steps) / len(steps) * full
                else:
                    steps = [uncached_step(model, B, p, device) for p in prefixes]
                    timed, total = sum(steps), fit_steps(prefixes, steps, full)
            row = dict(config=args.config.name, device=str(device), dtype=precision, batch=B,
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
    ap.add_argument("--config", required=True, type=Path, help="generator config (configs/ar/*.yaml, "
                    "configs/argus/gpt_*.yaml) or a trained generator folder")
    ap.add_argument("--vqvae", type=Path, help="with a trained generator folder: its VQVAE, whose quantizer builds "
                    "each scale's input (default: the vqvae folder beside it)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    ap.add_argument("--precision", default="fp32",
                    help=f"comma-separated: {', '.join(PRECISIONS)} (int8: CPU; bf16: autocast)")
    ap.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    ap.add_argument("--cache", default="on,off", help="comma-separated: on (KV cache), off (whole prefix each "
                    "scale), static (KV cache in buffers allocated once)")
    ap.add_argument("--no-roofline", dest="roofline", action="store_false",
                    help="skip the FLOP count and the matmul micro-benchmark")
    ap.add_argument("--tokens", type=int, default=0, help="Argus-3D: time only the first N steps and extrapolate")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.precision = ["bf16"] if args.bf16 else [p.strip() for p in args.precision.split(",")]
    args.precision.sort(key=lambda p: p != "fp32")         # fp32 first: the others are compared with it
    args.cache = [c.strip() for c in args.cache.split(",")]
    for p in args.precision:
        check_precision(p, args.device)
    if not set(args.cache) <= {"on", "off", "static"}:
        raise ValueError(f"--cache {','.join(args.cache)}: use on, off and static")
    if "static" in args.cache and "on" not in args.cache:
        args.cache.insert(0, "on")               # static rows are compared with it
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)
    if args.config.is_file() and read_yaml(args.config).get("kind") == "raster":
        rows = bench_raster(args, device)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    if args.config.is_dir():
        base = load_ar(args.config, device).eval()
        cfg = base.cfg
        vqvae = load_vqvae(args.vqvae or args.config.parent / "vqvae", device)
        check_pair(tokenizer_signature(vqvae.quantizer), vars(cfg), f"--vqvae {args.vqvae}", f"--config {args.config}")
        quant = vqvae.quantizer.eval()
    else:
        cfg = load_config(ARRunConfig, args.config)      # its train: section, if any, is not used
        torch.manual_seed(0)
        base = NextScaleAR(cfg).to(device).eval()
        quant = TriplaneQuantizer(cfg.vocab_size, cfg.c_vae, cfg.patch_nums, official_quirks=False).to(device).eval()
    print(f"{args.config.name}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg.seq_len} tokens, {len(cfg.patch_nums)} scales, device {device} ({device_name(device)}), "
          f"{torch.get_num_threads()} CPU threads")
    rows, tokens = [], {}
    for precision in args.precision:
        model = set_precision(copy.deepcopy(base), precision, device) if precision != "fp32" else base
        print(f"\n{precision}\n{'batch':>5} {'cache':>7} {'seconds':>9} {'objects/s':>9} {'tokens/s':>9} "
              f"{'peak MB':>8}  per scale (ms)")
        for B in args.batch:
            cond, uncond = (trained_conditions if args.config.is_dir() else conditions)(cfg, B, device)
            kw = dict(batch=B, guidance=4.0, top_k=10, top_p=0.5)
            for cache in args.cache:
                times = []
                for r in range(args.warmup + args.repeats):
                    per_scale = []
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.perf_counter()
                    with autocast(precision, device):
                        idx = model.sample(quant, cond, uncond, seed=r, use_cache=cache != "off",
                                           static_cache=cache == "static", scale_seconds=per_scale, **kw)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    tokens[(precision, B, cache, r)] = torch.cat([i.flatten() for i in idx]).cpu()
                    if r >= args.warmup:
                        times.append((time.perf_counter() - t0, per_scale))
                seconds = sum(t for t, _ in times) / len(times)
                scales = [sum(t[1][i] for t in times) / len(times) for i in range(len(cfg.patch_nums))]
                row = dict(config=args.config.name, device=str(device), cpu=device_name(device), precision=precision,
                           dtype=precision, batch=B, cache=cache, seconds=seconds, objects_per_s=B / seconds,
                           tokens_per_s=B * cfg.seq_len / seconds, peak_mem_mb=peak_mem_mb(device),
                           scale_ms=[1000 * s for s in scales])
                row.update(agreement(tokens, row, args))
                rows.append(row)
                print(f"{B:>5} {cache:>7} {seconds:>9.3f} {row['objects_per_s']:>9.3f} {row['tokens_per_s']:>9.1f} "
                      f"{row['peak_mem_mb']:>8.0f}  " + " ".join(f"{ms:.0f}" for ms in row["scale_ms"])
                      + "".join(f"  {k}: {v:.1%}" for k, v in row.items() if k.startswith("same_tokens")))
            if "fp32" in args.precision and len(args.precision) > 1:   # logit fidelity: greedy draws, seed 0
                with autocast(precision, device):
                    idx = model.sample(quant, cond, uncond, seed=0, **{**kw, "top_k": 1})
                tokens[(precision, B, "greedy")] = torch.cat([i.flatten() for i in idx]).cpu()
                if precision != "fp32":
                    same = (tokens[(precision, B, "greedy")] == tokens[("fp32", B, "greedy")]).double().mean()
                    rows[-len(args.cache)]["greedy_same_as_fp32"] = float(same)
                    print(f"      greedy (top-k 1) tokens equal to fp32's: {float(same):.1%}")
            if args.roofline:
                rows[-len(args.cache)].update(roofline(model, quant, cond, uncond, kw, precision, device,
                                                       rows[-len(args.cache)]))
    summary(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def agreement(tokens: dict, row: dict, args) -> dict:
    """The static cache's share of tokens equal to the dynamic cache's, with the same seeds."""
    p, B, cache = row["precision"], row["batch"], row["cache"]
    seeds = range(args.warmup + args.repeats)
    if cache != "static" or not all((p, B, "on", r) in tokens for r in seeds):
        return {}
    same = sum(int((tokens[(p, B, cache, r)] == tokens[(p, B, "on", r)]).sum()) for r in seeds)
    return {"same_tokens_as_dynamic": same / sum(tokens[(p, B, "on", r)].numel() for r in seeds)}


def roofline(model, quant, cond, uncond, kw, precision, device, row) -> dict:
    """One more cached run inside OpMeter: FLOPs per object and the rates against the machine's
    own rate on the same matmuls."""
    meter = OpMeter(device)
    with meter, autocast(precision, device):
        model.sample(quant, cond, uncond, seed=0, **kw)
    B = kw["batch"]
    linear, attention = meter.flops["linear"], meter.flops["attention"]
    limit = meter.matmul_limit()
    achieved = linear / meter.seconds["linear"]
    return dict(gflop_linear_per_object=linear / B / 1e9, gflop_attention_per_object=attention / B / 1e9,
                sampler_gflops=(linear + attention) / row["seconds"] / 1e9, linear_gflops=achieved / 1e9,
                attention_gflops=attention / max(meter.seconds["attention"], 1e-12) / 1e9,
                matmul_limit_gflops=limit / 1e9, linear_share_of_limit=achieved / limit if limit else 0.0,
                linear_share_of_time=meter.seconds["linear"] / row["seconds"])


def summary(rows: list, args) -> None:
    """The roofline table, and each precision's and the cache's speed-ups."""
    roof = [r for r in rows if "matmul_limit_gflops" in r]
    if roof:
        print(f"\nroofline (one more cached run per batch and precision, its matmuls and attention timed):\n"
              f"{'precision':>9} {'batch':>5} {'GFLOP/obj':>10} {'attn GFLOP':>10} {'sampler':>8} {'linear':>8} "
              f"{'limit':>8} {'of limit':>8} {'attention':>9}  (GFLOP/s)")
        for r in roof:
            print(f"{r['precision']:>9} {r['batch']:>5} {r['gflop_linear_per_object']:>10.2f} "
                  f"{r['gflop_attention_per_object']:>10.2f} {r['sampler_gflops']:>8.1f} {r['linear_gflops']:>8.1f} "
                  f"{r['matmul_limit_gflops']:>8.1f} {r['linear_share_of_limit']:>8.0%} {r['attention_gflops']:>9.1f}")
    by = {(r["precision"], r["batch"], r["cache"]): r["seconds"] for r in rows}
    B0 = args.batch[0]
    for (p, B, cache), s in by.items():
        if cache != "on":
            continue
        said = [f"{by[(p, B, c)] / s:.2f}x the speed of cache {c}" for c in ("off", "static") if (p, B, c) in by]
        if p != "fp32" and ("fp32", B, "on") in by:
            said.append(f"{by[('fp32', B, 'on')] / s:.2f}x the speed of fp32")
        if B != B0 and (p, B0, "on") in by:
            said.append(f"{by[(p, B0, 'on')] / s * B / B0:.2f}x the objects per second of batch {B0}")
        if said:
            print(f"{p}, batch {B}, cache on: " + "; ".join(said))


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"

if __name__ == "__main__":
    run(main)
