#!/usr/bin/env python
"""Evaluate the embedded demo models and write the results page, docs/results.md.

    python scripts/demo_results.py                       # run every evaluation, then write the page
    python scripts/demo_results.py --only captioner      # run some (comma list), keep the others' JSON
    python scripts/demo_results.py --collect             # run nothing: the page from the JSON there is

Each row is one evaluation script on the data `scripts/train_demo.sh` builds (data/upright1k,
data/shapes1k, data/caption2k), with its JSON in OUT/<row>/. A row
whose JSON is missing is listed as not run, with its command. The commands are run from the
repository root, one after another; the page says which CPU or GPU ran them and when.
"""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.cli import ArgumentParser, run  # noqa: E402


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def _prompts(r: dict) -> str:
    o = r["overall"]
    return f"{_pct(o['family'])} family, {_pct(o['colour'])} colour ({len(r['per_object'])} objects)"


def _vqvae(r: dict) -> str:
    m = r["mean"]
    return f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, mask IoU {m['mask_iou']:.3f} ({r['num_objects']} objects)"


def _occupancy(r: dict) -> str:
    m = r["mean"]
    return (f"IoU {m['iou']:.3f}, Chamfer-L1 {m['chamfer_l1']:.4f}, NC {m['normal_consistency']:.3f}, "
            f"F-score {m['fscore']:.3f} ({len(r['per_shape'])} shapes)")


def _classes(r: dict) -> str:
    m = r["generation_metrics"]
    per = ", ".join(f"{k} {_pct(v['recognised'])}" for k, v in r["per_class"].items())
    return (f"{_pct(r['mean_recognised'])} recognised ({per}); COV-CD {_pct(m['cov_cd'])}, "
            f"MMD-CD {m['mmd_cd']:.4f}, 1-NNA-CD {_pct(m['1nna_cd'])}")


def _ceiling(r: dict) -> str:
    per = ", ".join(f"{k} {v['seen'].get(k, 0)}/{sum(v['seen'].values())}" for k, v in r["per_class"].items())
    return f"{_pct(r['mean_recognised'])} placed as their family ({per})"


def _captions(r: dict) -> str:
    s = r["scores"]
    return (f"{_pct(s['family_acc'])} family, {_pct(s['colour_acc'])} colour; BLEU-4 {s['bleu4']:.3f}, "
            f"ROUGE-L {s['rouge_l']:.3f}, CIDEr-D {s['cider_d']:.3f} ({r['num_objects']} objects)")


# (row name, what it measures, command with {out} for its output folder, JSON file in it, summary)
ROWS = [
    ("text", "demo text generator, held-out prompts (shape check)",
     "scripts/eval_prompts.py --num 50 --data-dir data/upright1k --out-dir {out}", "results.json", _prompts),
    ("paraphrase", "demo text generator, the same prompts in held-out phrasings",
     "scripts/eval_prompts.py --num 50 --paraphrase --data-dir data/upright1k --out-dir {out}", "results.json",
     _prompts),
    ("image", "demo image generator, held-out objects' images",
     "scripts/eval_prompts.py --images --data-dir data/upright1k --out-dir {out}", "results.json", _prompts),
    ("vqvae", "demo VQVAE, reconstruction of held-out objects",
     "scripts/eval_vqvae.py --ckpt checkpoints/demo/vqvae --data-dir data/shapes1k --holdout 5 --resolution 64 "
     "--out {out}/metrics.json", "metrics.json", _vqvae),
    ("argus_tokenizer", "demo Argus-3D tokenizer, held-out shapes (MISE meshes)",
     "scripts/eval_occupancy.py --ckpt checkpoints/demo/argus_tokenizer --data-dir data/caption2k --inputs 3000 "
     "--out-dir {out}", "results.json", _occupancy),
    ("argus_class", "demo class-guided Argus-3D generator, 20 samples per family",
     "scripts/eval_classes.py --data-dir data/caption2k --per-class 20 --out-dir {out}", "results.json", _classes),
    ("argus_ceiling", "demo Argus-3D tokenizer's own reconstructions of the held-out objects (the class "
     "generator's ceiling)", "scripts/eval_classes.py --data-dir data/caption2k --reconstruct --out-dir {out}",
     "results.json", _ceiling),
    ("captioner", "demo captioner, held-out objects (greedy)",
     "scripts/eval_captions.py --ckpt checkpoints/demo/captioner --data-dir data/caption2k --out {out}/results.json",
     "results.json", _captions),
]


def machine() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads > 1 else ''}"


def page(out: Path) -> str:
    lines = ["# Results of the demo models", "",
             "Written by `python scripts/demo_results.py`; each figure's command runs from the repository root "
             "on the data `bash scripts/train_demo.sh` builds.", "",
             "| figure | value | when, where | command |", "|---|---|---|---|"]
    for name, what, cmd, json_name, summary in ROWS:
        command = f"`python {cmd.format(out=out / name)}`"
        path = out / name / json_name
        if path.is_file():
            meta = json.loads((out / name / "run.json").read_text()) if (out / name / "run.json").is_file() else {}
            lines.append(f"| {what} | {summary(json.loads(path.read_text()))} | "
                         f"{meta.get('date', '?')}, {meta.get('machine', '?')}, {meta.get('minutes', '?')} min | {command} |")
        else:
            lines.append(f"| {what} | not run yet | | {command} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--only", help=f"comma list of rows to run: {', '.join(r[0] for r in ROWS)} (default: all)")
    ap.add_argument("--collect", action="store_true", help="run nothing; write the page from the JSON files")
    ap.add_argument("--out", type=Path, default=Path("outputs/demo_results"), help="the evaluations' folders")
    ap.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args(argv)
    names = [r[0] for r in ROWS]
    only = names if args.only is None else args.only.split(",")
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: no such row; the rows are {', '.join(names)}")
    failed = []
    for name, _, cmd, _, _ in ROWS:
        if args.collect or name not in only:
            continue
        (args.out / name).mkdir(parents=True, exist_ok=True)
        argv_ = [sys.executable, *shlex.split(cmd.format(out=args.out / name))]
        print(f"== {name}: {' '.join(argv_[1:])}", flush=True)
        start = datetime.datetime.now()
        if subprocess.run(argv_, cwd=ROOT).returncode != 0:
            failed.append(name)
            continue
        minutes = round((datetime.datetime.now() - start).total_seconds() / 60, 1)
        (args.out / name / "run.json").write_text(json.dumps(
            {"date": start.strftime("%Y-%m-%d"), "machine": machine(), "minutes": minutes}) + "\n")
    args.page.write_text(page(args.out))
    print(f"wrote {args.page}")
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed (their output is above); the page lists them as before")
    return 0


if __name__ == "__main__":
    run(main)
