"""The README's path from a fresh clone to training, on the shipped demo VQVAE and its packaged
encoders: data (the session's tiny dataset stands in for make_shapes), precompute, then the text
generator through train_ar.py and the image generator through train_image.sh, a few steps each."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.ar import load_ar
from models.layout import tokenizer_signature
from models.vqvae import load_vqvae

ROOT = Path(__file__).resolve().parents[1]
DEMO_VQVAE = ROOT / "checkpoints" / "demo" / "vqvae"
SHORT = ["--max-steps", "2", "--batch-size", "2", "--set", "train.holdout=0", "--set", "train.num_workers=0",
         "--set", "train.eval_every=0", "--set", "train.sample_every=0"]

pytestmark = pytest.mark.skipif(not (DEMO_VQVAE / "model.safetensors").is_file(), reason="no shipped demo model")


def _run(args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_from_data_to_text_and_image_training_on_the_demo_vqvae(shapes_root, tmp_path):
    data = Path(shutil.copytree(shapes_root, tmp_path / "data"))
    _run([sys.executable, "scripts/precompute.py", "--data-dir", str(data), "--vqvae", str(DEMO_VQVAE),
          "--text-encoder", "minilm", "--image-encoder", "mobilenet_v2"])
    _run([sys.executable, "train_ar.py", "--config", "configs/ar/demo_text.yaml", "--data-dir", str(data),
          "--vqvae", str(DEMO_VQVAE), "--out-dir", str(tmp_path / "ar_text"), *SHORT])
    env = {**os.environ, "CONFIG": "configs/ar/demo_image.yaml"}
    _run(["bash", "train_image.sh", "4", "2", "1", str(DEMO_VQVAE), str(tmp_path / "ar_image"), str(data),
          *SHORT[:1] + SHORT[1:2] + SHORT[4:]], env=env)
    fingerprint = tokenizer_signature(load_vqvae(DEMO_VQVAE).quantizer)["fingerprint"]
    for kind in ("text", "image"):
        model = load_ar(tmp_path / f"ar_{kind}")
        assert model.cfg.condition == kind and model.cfg.tokenizer == fingerprint


def test_the_paper_config_on_demo_tokens_is_one_line_that_names_the_fix(shapes_root, tmp_path):
    data = Path(shutil.copytree(shapes_root, tmp_path / "data"))
    _run([sys.executable, "scripts/precompute.py", "--data-dir", str(data), "--vqvae", str(DEMO_VQVAE),
          "--split", "train", "--holdout", "0"])
    r = subprocess.run(["bash", "train_text.sh", "16", "2", "2", str(DEMO_VQVAE), str(tmp_path / "run"), str(data),
                        "--set", "train.holdout=0"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("error:") and "configs/ar/demo_*.yaml" in lines[0]


def test_shell_scripts_explain_their_arguments():
    for script in ("train_text.sh", "train_image.sh", "train_vqvae.sh"):
        r = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "CONFIG" in r.stdout and "Example" in r.stdout
        bare = subprocess.run(["bash", script], capture_output=True, text=True, cwd=ROOT)
        assert bare.returncode == 2 and bare.stderr.startswith(f"usage: bash {script}")
