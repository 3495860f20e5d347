"""The Argus-3D tokenizer against the official modules' outputs on filled weights
(official/argus/refs), its official parameter names, and the training pass."""
import json
import math
import zlib

import pytest
import torch

from models.occupancy_vqvae import PLANES, OccupancyVQVAE, OccupancyVQVAEConfig
from tests.official import OFFICIAL_DIR, rel_err

ARGUS = OFFICIAL_DIR / "argus"
needs_argus = pytest.mark.skipif(not (ARGUS / "refs").is_dir(), reason=f"Argus-3D references not found at {ARGUS}")
TINY = OccupancyVQVAEConfig(c_dim=8, hidden=8, n_blocks=2, plane_resolution=32, down_channels=(8, 8),
                            e_dim=16, n_e=64, up_channels=(8, 8), unet_depth=2, unet_filters=8, encoder_unet=False)


def argus_fill(key: str, shape) -> torch.Tensor:
    """The references' fill rule for stage-1 tensors (no norm layers in stage 1)."""
    g = torch.Generator("cpu").manual_seed(zlib.crc32(key.encode()))
    std = 0.02 if len(shape) == 1 else 1 / math.sqrt(math.prod(shape[1:]))
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def stage1_keys() -> list:
    return json.loads((ARGUS / "stage1_keys.json").read_text())["keys"]


def refs(name: str) -> dict:
    from safetensors.torch import load_file
    return load_file(str(ARGUS / "refs" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def official():
    keys = stage1_keys()
    state = {k: argus_fill(k, shape) for k, shape, _, _ in keys}
    checks = json.loads((ARGUS / "refs" / "fill_check.json").read_text())["stage1"]
    for k in ("decoder.fc_c.0.weight", "quantizer.down.6.weight", "quantizer.unet_2d.conv_final.bias"):
        assert state[k].double().sum().item() == pytest.approx(checks[k]["sum"], rel=1e-9)
    model = OccupancyVQVAE(OccupancyVQVAEConfig()).eval()
    model.load_state_dict(state, strict=True)
    return model


@needs_argus
def test_the_paper_config_has_the_official_tensors():
    model = OccupancyVQVAE(OccupancyVQVAEConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(shape) for k, shape, _, _ in stage1_keys()}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == 7_258_821


@needs_argus
@torch.no_grad()
def test_encoder_matches_the_official(official):
    r = refs("s1_a_encoder")
    p = r["input_points"]
    cells = official.encoder.cells(p)
    for name in PLANES:
        assert torch.equal(cells[name][0], r[f"point_cell_{name}"])
    acts = official.encoder.point_features(p, cells)
    for got, key in zip(acts, ["enc_fc_pos", *[f"enc_block{i}" for i in range(5)], "enc_fc_c"]):
        assert rel_err(got, r[key]) <= 1e-5, key
    planes = official.encoder(p)
    for name in PLANES:
        flat = planes[name][0].flatten(1)
        cells_ref = r[f"plane_{name}_cells"]
        assert rel_err(flat[:, cells_ref], r[f"plane_{name}_vals"]) <= 1e-5
        assert flat.ne(0).any(0).sum() <= len(cells_ref)            # every other cell is exactly 0


@needs_argus
@torch.no_grad()
def test_tokens_and_decoded_planes_match_the_official(official):
    enc, tok, dec = refs("s1_a_encoder"), refs("s1_a_tokenize"), refs("s1_a_decode")
    q = official.quantizer
    x = q.encode_3plane_reso32(torch.cat([official.encoder(enc["input_points"])[n] for n in PLANES], 1))
    assert rel_err(x[..., 96:160, 96:160], tok["coupled256__crop96_160"]) <= 1e-5
    down = q.down(x)
    assert rel_err(down, tok["down32"]) <= 1e-5
    pre = q.project1(down.permute(0, 2, 3, 1))
    assert rel_err(pre, tok["pre_quant"]) <= 1e-5
    ids = official.tokenize(enc["input_points"])
    sure = tok["vq_margin"] > 1e-3                          # near ties may flip with the last bit
    assert torch.equal(ids[sure], tok["tokens"][sure]) and (ids == tok["tokens"]).float().mean() > 0.99
    zq = q.quantizer.embedding(tok["tokens"]).reshape(1, 32, 32, 4)
    assert torch.equal(zq, dec["zq"])
    assert rel_err(q.project2(zq), dec["project2"]) <= 1e-5
    assert rel_err(q.unet_after_quant(q.project2(zq).permute(0, 3, 1, 2)), dec["unet_after_quant"]) <= 1e-5
    planes = official.decode_tokens(tok["tokens"])
    for name in PLANES:
        assert rel_err(planes[name], refs(f"s1_a_plane_{name}")["plane"]) <= 1e-5, name
    logits = official.query(planes, enc["query_points"])
    assert rel_err(logits, dec["occ_logits"]) <= 1e-5


def test_training_pass_gives_gradients_and_a_falling_loss():
    torch.manual_seed(0)
    model = OccupancyVQVAE(TINY)
    points = torch.rand(2, 256, 3) - 0.5
    queries = torch.rand(2, 128, 3) - 0.5
    inside = (queries.norm(dim=-1) < 0.3).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits, vq, ids = model(points, queries)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, inside) + vq
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert ids.shape == (2, TINY.num_tokens) and logits.shape == (2, 128)
    assert model.encoder.fc_pos.weight.grad is not None and model.quantizer.quantizer.embedding.weight.grad is not None
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    model.eval()
    with torch.no_grad():
        ids = model.tokenize(points)
        _, _, forward_ids = model(points, queries)
        assert torch.equal(ids, forward_ids)                 # the training pass quantises as tokenize does
        planes = model.decode_tokens(ids)
    assert planes["xz"].shape == (2, TINY.c_dim, 32, 32)
