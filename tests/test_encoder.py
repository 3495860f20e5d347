"""The multi-view encoder: official keys and parity, parameter count, and the properties of a
tiny configuration (shapes, gradients, how views interact)."""
import pytest
import torch

from models.encoder import EncoderConfig, MultiViewEncoder
from models.layout import split_planes
from tests.official import filled_state, key_table, needs_official, reference, rel_err

PREFIX = "encoder."
TINY = dict(  # 16² views → 8² latents: one downsample
    ch=32, ch_mult=(1, 2), num_res_blocks=1, num_views=6, num_heads=2, head_dim=16)


def tiny_encoder(seed: int = 0) -> MultiViewEncoder:
    """A float64 tiny encoder whose mid attention is not the identity: proj_out is zero at
    construction, which would hide every cross-view interaction from the tests."""
    torch.manual_seed(seed)
    enc = MultiViewEncoder(**TINY).double().eval()
    torch.nn.init.normal_(enc.mid.attn_1.proj_out.weight, std=0.2)
    return enc


def tiny_input(num_objects: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_objects * TINY["num_views"], 10, 16, 16, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- official

@needs_official
def test_state_dict_matches_official_keys_and_shapes():
    with torch.device("meta"):
        enc = MultiViewEncoder()
    official = {k[len(PREFIX):]: tuple(s) for k, s, _, _ in key_table("vqvae") if k.startswith(PREFIX)}
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert ours == official


@needs_official
@pytest.mark.slow
def test_parity_with_official_encoder():
    enc = MultiViewEncoder().eval()
    state = {k[len(PREFIX):]: v for k, v in filled_state("vqvae", PREFIX).items()}
    enc.load_state_dict(state, strict=True)        # every key present, none extra
    ref = reference("encoder")
    with torch.no_grad():
        out = enc(ref["x_fp16"].float())            # 6 views × 10 × 256² → (1, 24, 16, 16)
    assert out.shape == ref["encoder_out"].shape
    assert rel_err(out, ref["encoder_out"]) <= 1e-5
    assert rel_err(split_planes(out), ref["latent_planes"]) <= 1e-5


def test_paper_config_parameter_count():
    with torch.device("meta"):                      # no memory, no init: only the shapes
        enc = MultiViewEncoder()
    assert sum(p.numel() for p in enc.parameters()) == 45_085_648
    assert enc.cfg == EncoderConfig()


# ----------------------------------------------------------------------------- tiny config

def test_tiny_shapes_planes_and_gradients():
    enc = tiny_encoder().train()
    x = tiny_input(2).requires_grad_()
    out = enc(x)
    assert out.shape == (2, 24, 8, 8)
    planes = enc.encode_planes(x)
    assert planes.shape == (6, 8, 8, 8)
    # Plane p of object b is channels 8p..8p+7 of that object's latent.
    assert torch.equal(planes[1 * 3 + 2], out[1, 16:24])
    out.square().mean().backward()
    assert enc.conv_in.weight.grad is not None and enc.conv_in.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_fresh_mid_attention_starts_as_identity():
    enc = MultiViewEncoder(**TINY)
    assert enc.mid.attn_1.proj_out.weight.abs().sum() == 0 and enc.mid.attn_1.proj_out.bias.abs().sum() == 0
    h = torch.randn(6, 64, 8, 8)
    assert torch.equal(enc.mid.attn_1(h, 6), h)


def test_views_mix_within_an_object_but_not_across_objects():
    """attn1 joins the tokens of the V views of one object (and only those): changing view 0
    of object 0 changes its other views' maps and leaves object 1 bit-identical."""
    enc, x = tiny_encoder(), tiny_input(2)
    x2 = x.clone()
    x2[0] += torch.randn_like(x2[0])
    with torch.no_grad():
        f, f2 = enc.encode_views(x), enc.encode_views(x2)
    V = TINY["num_views"]
    assert torch.equal(f[V:], f2[V:])
    for v in range(1, V):
        assert (f[v] - f2[v]).abs().max() > 1e-6, f"view {v} did not see view 0"


def test_view_order_matters_only_through_fusion():
    """Everything before fusion is view-permutation equivariant (no view embedding; joint
    attention is order-free), so with a fusion conv that weights every view alike the latent
    is invariant, while the official-style per-view fusion weights make it order dependent."""
    enc, x = tiny_encoder(), tiny_input(2)
    V, Z = TINY["num_views"], 24
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    x_perm = x.view(2, V, *x.shape[1:])[:, perm].reshape_as(x)      # permute views of each object
    with torch.no_grad():
        f, f_perm = enc.encode_views(x), enc.encode_views(x_perm)
        torch.testing.assert_close(f_perm.view(2, V, Z, 8, 8), f.view(2, V, Z, 8, 8)[:, perm])
        assert (enc(x) - enc(x_perm)).abs().max() > 1e-3             # the fusion weights see order
        w = enc.fusion_layer.weight.view(Z, V, Z, 3, 3)
        enc.fusion_layer.weight.copy_(w[:, :1].expand_as(w).reshape(Z, V * Z, 3, 3))
        torch.testing.assert_close(enc(x_perm), enc(x))


def test_rejects_incomplete_objects():
    enc = MultiViewEncoder(**TINY)
    with pytest.raises(ValueError, match="num_views"):
        enc(torch.randn(5, 10, 16, 16))
