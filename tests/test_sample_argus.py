"""sample.py and pipelines.ArgusPipeline with Argus-3D models (tiny, random weights): a batch per
category with meshes, turntables and timings; the official sampling defaults; one-line errors."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import sample
from models.layout import tokenizer_signature
from models.occupancy_vqvae import OccupancyVQVAE
from models.raster_ar import RasterAR, RasterARConfig
from pipelines.argus import ArgusPipeline, ArgusSampling
from tests.test_occupancy_vqvae import TINY as TINY_TOKENIZER
from trainers.cli import model_config
from utils.checkpoint import save_model
from utils.cli import run
from utils.config import to_dict


@pytest.fixture(scope="module")
def argus_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("argus")
    torch.manual_seed(0)
    tok = OccupancyVQVAE(TINY_TOKENIZER)
    save_model(root / "tokenizer", tok.state_dict(), to_dict(TINY_TOKENIZER), kind="occupancy_vqvae")
    cfg = RasterARConfig(width=32, depth=2, num_heads=4, vocab_size=TINY_TOKENIZER.n_e,
                         num_tokens=TINY_TOKENIZER.num_tokens, classes=("box", "torus"), cond_drop=0.1,
                         tokenizer=tokenizer_signature(tok.quantizer)["fingerprint"])
    save_model(root / "generator", RasterAR(cfg).state_dict(), model_config(cfg), kind="raster_ar")
    text = dataclasses.replace(cfg, condition="text", pooled_dim=8)
    save_model(root / "text", RasterAR(text).state_dict(), model_config(text), kind="raster_ar")
    return root


def _sample(argv):
    with pytest.raises(SystemExit) as e:
        run(lambda: sample.main(argv))
    return e.value.code


def test_a_category_batch_gives_one_folder_per_object(argus_models, tmp_path, capsys):
    out = tmp_path / "out"
    code = _sample(["--cate", "torus", "--batch-size", "3", "--vqvae", str(argus_models / "tokenizer"),
                    "--ar", str(argus_models / "generator"), "--frames", "4", "--render-resolution", "32",
                    "--formats", "glb,obj", "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    folders = sorted(out.glob("torus_*"))
    assert len(folders) == 3
    for f in folders:
        assert np.load(f / "tokens.npy").shape == (TINY_TOKENIZER.num_tokens,)
        has_mesh = (f / "mesh.glb").is_file() and (f / "mesh.obj").is_file()
        assert has_mesh or "no mesh" in printed.err                     # an empty sample is reported
        assert (f / "turntable.mp4").is_file() == has_mesh
    assert "sample" in printed.out and "mesh" in printed.out


def test_official_defaults_and_the_batch_shares_one_condition(argus_models):
    pipe = ArgusPipeline.from_pretrained(tokenizer=argus_models / "tokenizer", generator=argus_models / "generator",
                                         device="cpu")
    assert ArgusSampling().top_k == 250 and ArgusSampling().guidance == 0
    a = pipe("box", num_samples=2, seed=3, frames=0, mesh=False)
    b = pipe("box", num_samples=2, seed=3, frames=0, mesh=False)
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert a[0].triplane.shape[1] == 3 * TINY_TOKENIZER.c_dim


def test_clear_errors(argus_models, tmp_path, capsys):
    common = ["--vqvae", str(argus_models / "tokenizer"), "--output-dir", str(tmp_path)]
    assert _sample(["--cate", "sofa", "--ar", str(argus_models / "generator"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown category 'sofa'" in err and "box, torus" in err
    assert _sample(["--cate", "box", "--ar", str(argus_models / "text"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text-guided" in err and "--prompt" in err
    assert _sample(["--prompt", "a box", "--model", "argus", "--ar", str(argus_models / "generator"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class-guided" in err and "--cate" in err
    foreign = tmp_path / "foreign"
    save_model(foreign, OccupancyVQVAE(dataclasses.replace(TINY_TOKENIZER, n_e=32)).state_dict(),
               to_dict(dataclasses.replace(TINY_TOKENIZER, n_e=32)), kind="occupancy_vqvae")
    assert _sample(["--cate", "box", "--ar", str(argus_models / "generator"), "--vqvae", str(foreign),
                    "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocab_size" in err


def test_class_evaluation_writes_its_results(argus_models, shapes_root, tmp_path):
    from scripts.eval_classes import main as evaluate
    out = tmp_path / "eval"
    assert evaluate(["--data-dir", str(shapes_root), "--vqvae", str(argus_models / "tokenizer"),
                     "--ar", str(argus_models / "generator"), "--per-class", "2", "--reference-splits", "train",
                     "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_class"]) == {"box", "torus"}                 # the generator's families
    assert all(0 <= r["recognised"] <= 1 and sum(r["seen"].values()) == 2 for r in results["per_class"].values())
    assert results["reference_shapes"] == 2
    if results["generated_shapes"]:
        assert {"cov_cd", "mmd_cd", "1nna_cd", "cov_emd", "mmd_emd", "1nna_emd"} <= set(results["generation_metrics"])


def test_class_evaluation_of_the_tokenizer_reconstructions(argus_models, shapes_root, tmp_path):
    from datasets.occupancy import read_split
    from scripts.eval_classes import main as evaluate
    out = tmp_path / "eval"
    assert evaluate(["--data-dir", str(shapes_root), "--vqvae", str(argus_models / "tokenizer"), "--reconstruct",
                     "--reference-splits", "train", "--inputs", "500", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["reconstruct"] and results["generated_shapes"] == 0 and results["per_class"]
    for name, r in results["per_class"].items():        # one placement per held-out object of the family
        assert sum(r["seen"].values()) == len(read_split(shapes_root, name, "train")) and 0 <= r["recognised"] <= 1

