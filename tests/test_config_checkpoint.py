import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.builder import BuildConfig, write_indices
from utils.checkpoint import CheckpointError, load_model, save_model
from utils.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_and_matches_defaults():
    cfg = load_config(BuildConfig, ROOT / "configs/data/build.yaml")
    assert to_dict(cfg) == to_dict(BuildConfig())


def test_unknown_or_misspelt_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("render:\n  radious: 2.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'render.radious' .*did you mean 'radius'"):
        load_config(BuildConfig, bad)
    with pytest.raises(ConfigError, match="unknown key 'view'"):
        load_config(BuildConfig, None, ["view=6"])


def test_types_are_checked_and_overrides_apply(tmp_path):
    with pytest.raises(ConfigError, match=r"render.ssaa: expected an integer"):
        load_config(BuildConfig, None, ["render.ssaa=1.5"])
    with pytest.raises(ConfigError, match=r"occupancy.float16: expected true or false"):
        load_config(BuildConfig, None, ["occupancy.float16='True'"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(BuildConfig, tmp_path / "missing.yaml")
    cfg = load_config(BuildConfig, None, ["render.res=64", "render.radius=2", "views=6"])
    assert cfg.render.res == 64 and cfg.render.radius == 2.0 and isinstance(cfg.render.radius, float) and cfg.views == 6


def test_split_lists_hold_out_the_last_objects(tmp_path):
    ids = [f"{i:06d}" for i in range(20)]
    index = write_indices(tmp_path, {"chair": ids[::-1]}, 0.1)
    assert index["chair"] == [f"chair/{i}" for i in ids]
    lists = {s: (tmp_path / "chair" / f"{s}.lst").read_text().split() for s in ("train", "val", "test")}
    assert lists == {"train": ids[:18], "val": ids[18:19], "test": ids[19:]}
    assert json.loads((tmp_path / "dataset.json").read_text()) == index


def test_checkpoint_roundtrip_is_bit_exact_and_carries_config(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    cfg = to_dict(BuildConfig())
    save_model(tmp_path / "ckpt", net.state_dict(), cfg, kind="test")
    state, cfg2, kind = load_model(tmp_path / "ckpt", kind="test")
    assert cfg2 == cfg and kind == "test"
    assert json.loads((tmp_path / "ckpt/config.json").read_text())["render"] == cfg["render"]
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    net2.load_state_dict(state)
    x = torch.randn(5, 4)
    assert torch.equal(net(x), net2(x))


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*model.safetensors"):
        load_model(tmp_path / "nothing")
    save_model(tmp_path / "c", {"w": torch.ones(1000)}, {}, kind="vqvae")
    with pytest.raises(CheckpointError, match="holds a 'vqvae' model, expected 'ar'"):
        load_model(tmp_path / "c", kind="ar")
    f = tmp_path / "c/model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="c/model.safetensors: unreadable or truncated"):
        load_model(f)
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_model(tmp_path / "foreign.safetensors")


def test_transformers_imports_from_the_repository_root(tmp_path):
    """Our top-level datasets/ shadows Hugging Face's; transformers must still load models."""
    code = ("import datasets, transformers; assert datasets.__file__.startswith(%r); "
            "from transformers import CLIPTextConfig, CLIPTextModel; "
            "m = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)); "
            "m.save_pretrained(%r); CLIPTextModel.from_pretrained(%r); print('ok')") % (str(ROOT), str(tmp_path), str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
