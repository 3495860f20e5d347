"""The assembled VQVAE: official key mapping and conversion, a tiny model end to end, save/load."""
from pathlib import Path

import numpy as np
import pytest
import torch

from models.vqvae import (DROPPED, TriplaneVQVAE, VQVAEConfig, convert_official, official_key,
                          ours_to_official)
from scripts.convert_official import main as convert_main
from tests.official import fill, key_table, needs_official, reference, rel_err
from utils.cameras import normalized_intrinsics, orbit_c2w, pack_cameras
from utils.checkpoint import ConversionError, load_model, save_model
from utils.cli import run
from utils.config import from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml")


def _paper_on_meta():
    with torch.device("meta"):
        return TriplaneVQVAE(load_config(VQVAEConfig, ROOT / "configs/vqvae/paper.yaml"))


@needs_official
def test_official_keys_map_one_to_one_onto_the_paper_model():
    ours = _paper_on_meta().state_dict()
    table = key_table("vqvae")
    mapped = {official_key(k): (k, shape) for k, shape, _, _ in table if k not in DROPPED}
    assert len(mapped) == len(table) - len(DROPPED) and set(mapped) == set(ours)
    assert all(list(ours[name].shape) == shape for name, (_, shape) in mapped.items())
    assert sum(p.numel() for p in _paper_on_meta().parameters()) == 176_242_116


@needs_official
def test_convert_official_state_and_name_every_problem():
    model = _paper_on_meta()
    state = {k: fill(k, shape) if kind == "param" else torch.zeros(shape) for k, shape, _, kind in key_table("vqvae")}
    ours = convert_official(state, model)
    model.load_state_dict(ours, strict=True, assign=True)
    assert torch.equal(model.quantizer.embedding.weight, state["decoder.superresolution.quantize.embedding.weight"])
    broken = dict(state)
    del broken["decoder.vit_decoder.blocks.3.attn.qkv.bias"]
    with pytest.raises(ConversionError, match=r"missing tensor 'decoder.vit_decoder.blocks.3.attn.qkv.bias'"):
        convert_official(broken, model)
    broken = {**state, "encoder.conv_in.weight": torch.zeros(3, 3)}
    with pytest.raises(ConversionError, match=r"'encoder.conv_in.weight' has shape \(3, 3\), expected \(160, 10, 3, 3\)"):
        convert_official(broken, model)
    with pytest.raises(ConversionError, match=r"unexpected tensor 'decoder.extra.weight'"):
        convert_official({**state, "decoder.extra.weight": torch.zeros(1)}, model)


@needs_official
def test_quant_conv_matches_the_official_on_converted_weights():
    model = _paper_on_meta()
    state = {k: fill(k, shape) for k, shape, _, kind in key_table("vqvae") if kind == "param" and "quant_conv" in k
             and "post_quant_conv" not in k}
    model.quant_conv.load_state_dict({official_key(k)[len("quant_conv."):]: v for k, v in state.items()}, assign=True)
    ref = reference("encoder")
    with torch.no_grad():
        assert rel_err(model.quant_conv(ref["latent_planes"]), ref["quant_conv_out"]) <= 1e-5


def _views(B=1, V=2, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B * V, 10, res, res, generator=g)


def _cams(B=1):
    return torch.as_tensor(pack_cameras(np.stack([orbit_c2w(30 * i, 20, 2.0) for i in range(B)]), normalized_intrinsics()))


def test_tiny_model_end_to_end_with_gradients():
    torch.manual_seed(0)
    model = TriplaneVQVAE(TINY)
    triplane, vq_loss, usage = model(_views())
    assert triplane.shape == (1, 24, 16, 16) and usage.shape == (4,)
    out = model.render(triplane, _cams())
    assert out["image_raw"].shape == (1, 3, 16, 16)
    (out["image_raw"].mean() + vq_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.renderer.decoder.net[0].weight.grad.abs().sum() > 0
    idx = model.tokenize(_views())
    assert [i.shape for i in idx] == [(3, 1), (3, 4), (3, 16), (3, 64)]
    assert model.decode_tokens(idx).shape == (1, 24, 16, 16)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = TriplaneVQVAE(TINY).eval()
    save_model(tmp_path / "ckpt", model.state_dict(), to_dict(TINY), kind="vqvae")
    state, cfg, _ = load_model(tmp_path / "ckpt", kind="vqvae")
    again = TriplaneVQVAE(from_dict(VQVAEConfig, cfg)).eval()
    again.load_state_dict(state, strict=True)
    x, c = _views(), _cams()
    with torch.no_grad():
        a = model.render(model(x)[0], c, deterministic=True)["image_raw"]
        b = again.render(again(x)[0], c, deterministic=True)["image_raw"]
    assert torch.equal(a, b)


def _official_names(state: dict) -> dict:
    """Our tiny state dict under the official names, as an official file would hold it."""
    back = {ours_to_official(k): v for k, v in state.items()}
    assert all(official_key(k) == name for k, name in zip(back, state))
    return {**back, "decoder.w_avg": torch.zeros(512)}


def test_convert_official_script(tmp_path, capsys):
    torch.manual_seed(0)
    model = TriplaneVQVAE(TINY)
    official = _official_names(model.state_dict())
    torch.save(official, tmp_path / "vqvae-ckpt.pt")
    args = ["--kind", "vqvae", "--src", str(tmp_path / "vqvae-ckpt.pt"), "--out", str(tmp_path / "out"),
            "--config", str(ROOT / "configs/vqvae/tiny.yaml")]
    assert convert_main(args) == 0
    state, cfg, kind = load_model(tmp_path / "out", kind="vqvae")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert from_dict(VQVAEConfig, cfg) == TINY

    def fails(src_bytes=None, state=None):
        """Run the script on a bad file; -> its stderr, checked to be one clean error."""
        if state is not None:
            torch.save(state, tmp_path / "bad.pt")
        else:
            (tmp_path / "bad.pt").write_bytes(src_bytes)
        with pytest.raises(SystemExit) as e:
            run(lambda: convert_main([*args[:2], "--src", str(tmp_path / "bad.pt"), *args[4:]]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        return err

    data = (tmp_path / "vqvae-ckpt.pt").read_bytes()
    assert "not a readable PyTorch checkpoint, or truncated" in fails(data[: len(data) // 2])
    missing = {k: v for k, v in official.items() if k != "encoder.conv_out.bias"}
    assert "missing tensor 'encoder.conv_out.bias'" in fails(state=missing)
    no_codebook = {k: v for k, v in official.items() if k != "decoder.superresolution.quantize.embedding.weight"}
    assert "missing tensor 'decoder.superresolution.quantize.embedding.weight'" in fails(state=no_codebook)
    assert "expected a state dict of tensors" in fails(state={"model": {"w": torch.ones(1)}})
