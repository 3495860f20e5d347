"""The VQVAE decoder (models/triplane_decoder.py): parity with the official, the token
interleave, a tiny config end to end, and the paper's parameter counts."""
import torch

from models.triplane_decoder import TriplaneDecoder, TriplaneDecoderConfig, official_to_ours, sincos_pos_embed_2d
from tests.official import filled_state, needs_official, reference, rel_err

TINY = TriplaneDecoderConfig(latent_channels=2, latent_size=4, hidden=16, depth=2, num_heads=2,
                             sr_ch=4, sr_ch_mult=(1, 2), sr_norm_groups=2, triplane_channels=3)


@needs_official
@torch.no_grad()
def test_parity_with_official():
    torch.manual_seed(0)
    dec = TriplaneDecoder().eval()
    state = filled_state("vqvae", "decoder.")
    mapped = {official_to_ours(k): v for k, v in state.items() if official_to_ours(k) is not None}
    dec.load_state_dict(mapped, strict=True)
    ref = reference("decoder")
    out = dec.stages(ref["f_hat"].float())
    for name in ("post_quant_conv", "ldm_upsample", "dit_out", "triplane"):
        assert out[name].shape == ref[name].shape, name
        err = rel_err(out[name], ref[name])
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_official_to_ours_prefixes():
    assert official_to_ours("decoder.superresolution.conv_sr.up.3.upsample.conv.weight") == "conv_sr.up.3.upsample.conv.weight"
    assert official_to_ours("decoder.superresolution.ldm_upsample.proj.bias") == "ldm_upsample.proj.bias"
    assert official_to_ours("decoder.vit_decoder.blocks.5.mlp.mlp.2.weight") == "vit_decoder.blocks.5.mlp.mlp.2.weight"
    for other in ("decoder.superresolution.quant_conv.weight", "decoder.superresolution.quantize.embedding.weight",
                  "decoder.w_avg", "decoder.triplane_decoder.decoder.net.0.weight", "encoder.conv_in.weight"):
        assert official_to_ours(other) is None, other


def test_token_interleave_is_3c_plus_p():
    """Token (plane p, pixel) channel c must be conv output channel 3c+p, not p·C+c."""
    dec = TriplaneDecoder(TINY)
    proj = dec.ldm_upsample.proj
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.copy_(torch.arange(proj.out_channels, dtype=torch.float32))    # output channel k carries k
    s, C = TINY.latent_size, TINY.hidden
    tokens = dec.ldm_upsample(torch.randn(2, 3 * TINY.latent_channels, s, s))
    assert tokens.shape == (2, 3 * s * s, C)
    tokens = tokens.view(2, 3, s * s, C)
    c = torch.arange(C, dtype=torch.float32)
    for p in range(3):
        assert torch.equal(tokens[:, p], (3 * c + p).expand(2, s * s, C))


def test_token_embed_groups_read_their_own_plane():
    """groups=3: conv output channels gC..(g+1)C-1 read only input plane g (channels g·Cvae..)."""
    dec = TriplaneDecoder(TINY)
    s, C, Cv = TINY.latent_size, TINY.hidden, TINY.latent_channels
    x = torch.randn(1, 3 * Cv, s, s)
    y = x.clone()
    y[:, Cv:2 * Cv] += 1.0                                   # change plane 1 only
    with torch.no_grad():
        changed = (dec.ldm_upsample.proj(x) - dec.ldm_upsample.proj(y)).abs().amax(dim=(0, 2, 3)) > 0
    assert changed[C:2 * C].all() and not changed[:C].any() and not changed[2 * C:].any()


def test_tiny_shapes_and_gradients():
    torch.manual_seed(0)
    dec = TriplaneDecoder(TINY)
    B, s = 2, TINY.latent_size
    f_hat = torch.randn(B * 3, TINY.latent_channels, s, s)

    # adaLN-Zero: a fresh decoder ignores its input, yet pos_embed and adaLN already learn.
    out = dec.stages(f_hat)
    assert out["post_quant_conv"].shape == (B, 3 * TINY.latent_channels, s, s)
    assert out["ldm_upsample"].shape == out["dit_out"].shape == (B, 3 * s * s, TINY.hidden)
    R = s * 2 ** (len(TINY.sr_ch_mult) - 1)
    assert out["triplane"].shape == (B, 3 * TINY.triplane_channels, R, R)
    assert torch.allclose(out["dit_out"], dec.vit_decoder.pos_embed.expand(B, -1, -1))
    out["triplane"].square().mean().backward()
    assert dec.vit_decoder.pos_embed.grad.abs().sum() > 0
    assert dec.vit_decoder.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0

    # Once adaLN is non-zero the latent reaches the triplane: gradients reach both convs.
    dec.zero_grad()
    with torch.no_grad():
        for blk in dec.vit_decoder.blocks:
            blk.adaLN_modulation[1].weight.normal_(std=0.1)
    triplane = dec(f_hat)
    assert torch.isfinite(triplane).all()
    triplane.square().mean().backward()
    for p in (dec.vit_decoder.pos_embed, dec.ldm_upsample.proj.weight, dec.post_quant_conv.weight,
              dec.conv_sr.conv_in.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0

    # Each object's triplane depends on its own latent only (planes are not mixed across the batch).
    f2 = f_hat.clone()
    f2[3:] += 1.0
    with torch.no_grad():
        a, b = dec(f_hat), dec(f2)
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_tokens_in_stream_reach_a_fresh_decoder():
    """With tokens_in_stream the latent tokens join pos_embed in the query stream, so even a fresh
    (adaLN-zero) decoder passes them through: dit_out = pos_embed + ldm_upsample tokens."""
    torch.manual_seed(0)
    dec = TriplaneDecoder(TriplaneDecoderConfig(**{**TINY.__dict__, "tokens_in_stream": True}))
    f_hat = torch.randn(6, TINY.latent_channels, TINY.latent_size, TINY.latent_size)
    out = dec.stages(f_hat)
    assert torch.allclose(out["dit_out"], dec.vit_decoder.pos_embed + out["ldm_upsample"], atol=1e-6)
    out["triplane"].square().mean().backward()
    assert dec.post_quant_conv.weight.grad.abs().sum() > 0 and dec.ldm_upsample.proj.weight.grad.abs().sum() > 0


def test_bfloat16_compute_runs():
    dec = TriplaneDecoder(TriplaneDecoderConfig(**{**TINY.__dict__, "compute_dtype": "bfloat16"}))
    with torch.no_grad():
        out = dec.stages(torch.randn(3, TINY.latent_channels, TINY.latent_size, TINY.latent_size))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_pos_embed_sincos_layout():
    """Fresh pos_embed: 2-D sin-cos on a (3·s, s) grid, first half of the channels from the column."""
    pe = sincos_pos_embed_2d(768, 48, 16)
    assert pe.shape == (768, 768)
    row, col = 37, 5                                         # token row·16 + col (plane 2, row 5)
    t = pe[row * 16 + col]
    col_, row_ = torch.tensor(float(col)), torch.tensor(float(row))
    expected = torch.stack([col_.sin(), col_.cos(), row_.sin(), row_.cos()])
    assert torch.allclose(t[[0, 192, 384, 576]], expected, atol=1e-6)
    assert torch.allclose(t[191], torch.tensor(col * 10000 ** (-191 / 192)).sin(), atol=1e-6)
    dec = TriplaneDecoder(TINY)
    s = TINY.latent_size
    assert torch.equal(dec.vit_decoder.pos_embed[0], sincos_pos_embed_2d(TINY.hidden, 3 * s, s))


def test_paper_parameter_counts():
    dec = TriplaneDecoder()
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(dec.vit_decoder) == 128_083_968
    assert count(dec.ldm_upsample) == 168_192
    assert count(dec.conv_sr) == 2_754_944
    assert count(dec.post_quant_conv) == 584
    assert dec.vit_decoder.pos_embed.shape == (1, 768, 768)
