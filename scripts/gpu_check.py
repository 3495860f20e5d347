#!/usr/bin/env python
"""Measure every CUDA path of the codebase in one unattended run (scripts/gpu_check.sh calls it).

    python scripts/gpu_check.py --out outputs/gpu_check            # on a CUDA machine
    python scripts/gpu_check.py --cpu --out outputs/gpu_check_cpu   # the same steps, small, on a CPU

Steps, each a child process with its own time limit, each recorded whether it passes or fails
(the run goes on): the CUDA-marked tests (nvdiffrast against the PyTorch rasterizer among them);
bench_ar on the SAR3D image and text and the Argus-3D paper configs (bf16; SAR3D at batch 1, 16
and 32 with the KV cache, without it and with the static cache, and its roofline table; Argus-3D
at batch 1 and 16 over its first 64 steps, extrapolated); sample.py image-to-mesh
on the paper VQVAE and image generator with random weights (and a random DINOv2-large), timed per
stage; training steps per second of the paper VQVAE and text generator. --cpu swaps the paper
configs for the small ones and skips the CUDA tests. Writes OUT/gpu_check.json and OUT/table.md.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.cli import ArgumentParser, run  # noqa: E402

PY = sys.executable


def random_models(work: Path, cpu: bool) -> dict:
    """Random-weight checkpoints for sample.py and the training steps: our folders of the paper
    (GPU) or small (CPU) VQVAE and image generator, and a random DINOv2 / CLIP text encoder."""
    import torch
    from transformers import Dinov2Config, Dinov2Model
    from models.ar import NextScaleAR
    from models.vqvae import TriplaneVQVAE
    from trainers.ar import ARRunConfig
    from trainers.cli import model_config
    from trainers.vqvae import VQVAERunConfig
    from utils.checkpoint import save_model
    from utils.config import load_config
    size = "small" if cpu else "paper"
    torch.manual_seed(0)
    vq_cfg = load_config(VQVAERunConfig, ROOT / "configs" / "vqvae" / f"{size}.yaml")
    save_model(work / "vqvae", TriplaneVQVAE(vq_cfg).state_dict(), model_config(vq_cfg), kind="vqvae")
    ar_file = "demo_image.yaml" if cpu else "paper_image.yaml"
    ar_cfg = load_config(ARRunConfig, ROOT / "configs" / "ar" / ar_file)
    dino = Dinov2Config(hidden_size=1024, num_hidden_layers=2 if cpu else 24, num_attention_heads=16,
                        intermediate_size=4096, image_size=224, patch_size=14)
    Dinov2Model(dino).save_pretrained(work / "dinov2")
    ar_cfg.pooled_dim = ar_cfg.seq_dim = 1024
    ar_cfg.encoder = str(work / "dinov2")
    save_model(work / "ar_image", NextScaleAR(ar_cfg).state_dict(), model_config(ar_cfg), kind="ar")
    width, layers, heads = (64, 2, 4) if cpu else (768, 12, 12)
    subprocess.run([PY, str(ROOT / "scripts" / "make_random_clip.py"), "--out", str(work / "clip"), "--width",
                    str(width), "--layers", str(layers), "--heads", str(heads)], check=True, cwd=ROOT)
    return {"vqvae": work / "vqvae", "ar_image": work / "ar_image", "clip": work / "clip", "size": size}


def step(name: str, cmd: list, timeout: int, log: Path) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e)
    (log / f"{name}.log").write_text(out)
    return {"name": name, "ok": code == 0, "code": code, "seconds": round(time.time() - t0, 1),
            "tail": [line for line in out.strip().splitlines() if line.strip()][-12:]}


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    ap.add_argument("--cpu", action="store_true", help="small configs on the CPU (the CI run of this script)")
    args = ap.parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible: pass --cpu to run the CPU version")
    out, work = args.out, args.out / "work"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    device, cpu = ("cpu" if args.cpu else "cuda"), args.cpu
    t0 = time.time()
    models = random_models(work, cpu)
    info = {"device": torch.cuda.get_device_name(0) if not cpu else platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "random_models_s": round(time.time() - t0, 1)}
    for pkg in ("nvdiffrast", "flash_attn"):
        try:
            __import__(pkg)
            info[pkg] = "installed"
        except ImportError:
            info[pkg] = "absent"
    precision = ["--precision", "fp32" if cpu else "bf16"]
    sar = ["demo_text.yaml"] if cpu else ["paper_image.yaml", "paper_text.yaml"]
    argus = "gpt_tiny.yaml" if cpu else "gpt_paper.yaml"
    data = work / "data"
    steps = []
    if not cpu:
        steps.append(("cuda_tests", [PY, "-m", "pytest", "-q", "-m", "cuda", "tests"], 300))
    for cfg in sar:
        steps.append((f"bench_{cfg[:-5]}", [PY, "scripts/bench_ar.py", "--config", f"configs/ar/{cfg}", "--device",
                                            device, "--batch", "1" if cpu else "1,16,32", *precision,
                                            "--cache", "on,off,static",
                                            "--json", str(out / "logs" / f"bench_{cfg[:-5]}.json")], 300))
    steps.append((f"bench_{argus[:-5]}", [PY, "scripts/bench_ar.py", "--config", f"configs/argus/{argus}",
                                          "--device", device, "--batch", "1,16", "--tokens", "16" if cpu else "64",
                                          *precision, "--json", str(out / "logs" / f"bench_{argus[:-5]}.json")], 300))
    steps.append(("sample_image", [PY, "sample.py", "--image", "test_files/images/a_yellow_cone.png", "--vqvae",
                                   str(models["vqvae"]), "--ar", str(models["ar_image"]), "--device", device,
                                   "--output-dir", str(out / "samples"), "--no-video"], 300))
    steps.append(("make_data", [PY, "scripts/make_shapes.py", "--out", str(data), "--num", "4",
                                "--res", "64" if cpu else "256", "--upright"], 300))
    steps.append(("train_vqvae", [PY, "train_vqvae.py", "--config", f"configs/vqvae/{models['size']}.yaml",
                                  "--data-dir", str(data), "--out-dir", str(work / "run_vqvae"), "--max-steps", "3",
                                  "--batch-size", "2", "--set", "train.num_workers=0", "--set", "train.holdout=0"], 300))
    steps.append(("precompute", [PY, "scripts/precompute.py", "--data-dir", str(data), "--vqvae",
                                 str(models["vqvae"]), "--text-encoder", str(models["clip"]), "--device", device], 300))
    text_cfg = "small_text.yaml" if cpu else "paper_text.yaml"
    steps.append(("train_ar", [PY, "train_ar.py", "--config", f"configs/ar/{text_cfg}", "--data-dir", str(data),
                               "--out-dir", str(work / "run_ar"), "--max-steps", "3", "--batch-size", "2",
                               "--set", "train.holdout=0", "--set", "train.num_workers=0",
                               "--set", "train.sample_every=0", "--set", f"seq_dim={64 if cpu else 768}",
                               "--set", f"pooled_dim={64 if cpu else 768}"], 300))
    results = []
    for name, cmd, limit in steps:
        results.append(step(name, cmd, limit, out / "logs"))
        r = results[-1]
        print(f"{name}: {'ok' if r['ok'] else 'FAILED (' + str(r['code']) + ')'} in {r['seconds']} s", flush=True)
    for r in results:                     # what each step measured: bench rows, stage timings, step rates
        rows = out / "logs" / f"{r['name']}.json"
        if rows.is_file():
            r["rows"] = json.loads(rows.read_text())
        text = "\n".join(r["tail"])
        m = re.search(r"(\d+) step\(s\) in ([\d.]+) s", text)
        if m:
            r["steps_per_s"] = round(int(m.group(1)) / float(m.group(2)), 3)
        r["line"] = next((line for line in reversed(r["tail"]) if re.match(r"\[\d+/\d+\]|.*step\(s\) in", line)),
                         r["tail"][-1] if r["tail"] else "")
    summary = {"info": info, "steps": results, "total_s": round(time.time() - t0, 1)}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, nvdiffrast {info['nvdiffrast']}, "
             f"flash-attn {info['flash_attn']}", "", "| step | result | seconds | what it measured (last line) |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {'ok' if r['ok'] else 'failed'} | {r['seconds']} | "
              f"{r['line'].replace('|', '/')[:160]} |" for r in results]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    run(main)
