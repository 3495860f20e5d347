"""train_ar.py with an Argus-3D generator config (kind: raster) on token ids: the loss falls,
resume is exact, two gloo processes (DDP and FSDP) compute the losses of one, and bad data is
one clear line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_ar
from datasets.gbuffer import CONDITION_FILES
from datasets.occupancy import OCCUPANCY_TOKENS, write_split_lists
from models.raster_ar import load_raster_ar
from utils.cli import run
from tests.helpers import torchrun, train_log

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config", str(ROOT / "configs/argus/gpt_tiny.yaml"), "--set", "train.save_every=1000"]


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> Path:
    """Three categories of 16-token objects, each category a noisy copy of its own pattern."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("box", "cone", "torus")):
        pattern = rng.integers(0, 64, 16)
        ids = [f"{i:04d}" for i in range(8)]
        for i in ids:
            (root / name / i).mkdir(parents=True)
            tokens = np.where(rng.random(16) < 0.1, rng.integers(0, 64, 16), pattern)
            np.savez(root / name / i / OCCUPANCY_TOKENS, index=tokens.astype(np.int64))
            np.save(root / name / i / CONDITION_FILES["text"]["pooled"], (np.eye(3)[c] + 0.1 * rng.random(3)).astype(np.float32))
        write_split_lists(root, name, {"train": ids[:6], "val": ids[6:]})
    return root


def _train(data, out, steps, *extra) -> int:
    with pytest.raises(SystemExit) as e:
        run(lambda: train_ar.main([*FAST, "--data-dir", str(data), "--out-dir", str(out), "--max-steps", str(steps),
                                   *extra]))
    return e.value.code


def test_the_loss_falls_and_the_model_samples_its_classes(token_data, tmp_path):
    assert _train(token_data, tmp_path / "run", 150, "--set", "train.lr=3e-3", "--set", "train.eval_every=150") == 0
    log = train_log(tmp_path / "run")
    assert np.mean([r["loss"] for r in log[-5:]]) < 0.5 * np.mean([r["loss"] for r in log[:5]])
    model = load_raster_ar(tmp_path / "run")
    assert model.cfg.classes == ("box", "cone", "torus")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_acc"] > 0.5


def test_resume_gives_the_weights_of_a_straight_run(token_data, tmp_path):
    assert _train(token_data, tmp_path / "straight", 6) == 0
    assert _train(token_data, tmp_path / "split", 6, "--stop-at", "3") == 0
    assert _train(token_data, tmp_path / "split", 6, "--resume") == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_compute_the_losses_of_one(token_data, tmp_path, parallel):
    no_dropout = [x for k in ("attn_drop", "resid_drop", "mlp_drop") for x in ("--set", f"{k}=0")]  # draws differ by batch shape
    common = [*FAST, "--batch-size", "4", "--max-steps", "3", "--data-dir", str(token_data), *no_dropout,
              "--set", f"train.parallel={parallel}", "--set", "train.save_every=3", "--set", "train.eval_every=3"]
    with pytest.raises(SystemExit):
        run(lambda: train_ar.main([*common, "--out-dir", str(tmp_path / "one")]))
    torchrun("train_ar.py", [*common, "--out-dir", tmp_path / "two"])
    one, two = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    w1, w2 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    if parallel == "fsdp":       # the sharded run resumes from its gathered state
        torchrun("train_ar.py", [*common, "--max-steps", "4", "--resume", "--out-dir", tmp_path / "two"])
        assert len(train_log(tmp_path / "two")) == 4


def test_missing_tokens_and_a_mismatched_config_are_one_line(token_data, tmp_path, capsys):
    empty = tmp_path / "no_tokens"
    (empty / "box" / "0001").mkdir(parents=True)
    write_split_lists(empty, "box", {"train": ["0001"]})
    assert _train(empty, tmp_path / "a", 2) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and OCCUPANCY_TOKENS in err and "--occupancy-vqvae" in err
    assert _train(token_data, tmp_path / "b", 2, "--set", "num_tokens=32") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_tokens" in err


def test_a_text_guided_generator_trains_on_the_pooled_embeddings(token_data, tmp_path):
    assert _train(token_data, tmp_path / "text", 40, "--set", "condition=text", "--set", "pooled_dim=3",
                  "--set", "train.lr=3e-3") == 0
    model = load_raster_ar(tmp_path / "text")
    assert model.cfg.condition == "text" and not hasattr(model, "class_embedding")
    from models.ar import Condition
    ids = model.sample(None, Condition(pooled=torch.tensor([[0.0, 1.0, 0.0]])), batch=2, guidance=2.0, seed=0)
    assert ids.shape == (2, 16)
