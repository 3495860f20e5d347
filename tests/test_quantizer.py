"""TriplaneQuantizer: official parity, internal consistency of its four paths, gradients, training."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.quantizer import PAPER_PHI_MAP, TriplaneQuantizer, phi_map
from tests.official import filled_state, key_table, needs_official, reference, rel_err

PREFIX = "decoder.superresolution.quantize."


def official_quantizer() -> TriplaneQuantizer:
    q = TriplaneQuantizer()
    state = {k[len(PREFIX):]: v for k, v in filled_state("vqvae", PREFIX).items()}
    state["ema_vocab_hit_SV"] = q.ema_vocab_hit_SV.clone()   # buffers keep their constructed value
    q.load_state_dict(state, strict=True)
    return q


def tiny(official_quirks=True, patch_nums=(1, 2, 3, 4), vocab=64, c=4, seed=0) -> TriplaneQuantizer:
    torch.manual_seed(seed)
    q = TriplaneQuantizer(vocab, c, patch_nums, official_quirks=official_quirks)
    with torch.no_grad():   # non-unit rows, so raw and normalised rows differ (the quirk shows)
        q.embedding.weight.mul_(torch.rand(vocab, 1) + 0.5)
    return q


def split_per_scale(g_L: torch.Tensor, patch_nums) -> list:
    """AR order (per scale: plane 0 | plane 1 | plane 2) → per-scale (3, pn²)."""
    out, o = [], 0
    for pn in patch_nums:
        out.append(g_L[o:o + 3 * pn * pn].view(3, pn * pn))
        o += 3 * pn * pn
    return out


@needs_official
def test_official_parity():
    q = official_quantizer()
    table = {k[len(PREFIX):]: shape for k, shape, _, _ in key_table("vqvae") if k.startswith(PREFIX)}
    assert {k: list(v.shape) for k, v in q.state_dict().items()} == table
    ref = reference("quant")
    f = ref["f"].float()
    idx, fhat = q.f_to_idx(f), q.f_to_idx(f, to_fhat=True)
    for s in range(10):
        assert torch.equal(idx[s], ref[f"idx_s{s}"]), s
        assert rel_err(fhat[s], ref[f"fhat_s{s}"]) <= 1e-5, s
    q.train()
    f_hat, loss, usage = q(f)
    assert rel_err(f_hat.detach(), ref["fhat_forward"]) <= 1e-5
    assert rel_err(loss.detach().reshape(1), ref["vq_loss_forward"]) <= 1e-5
    assert usage.shape == (10,) and q.ema_vocab_hit_SV.sum() == 3 * sum(pn * pn for pn in q.patch_nums)


@needs_official
def test_official_decode_and_teacher_forcing():
    """gt ids (AR order) → f̂ of the official decoder and the official teacher-forcing input."""
    q, dec, var = official_quantizer(), reference("decoder"), reference("var_image")
    idx = split_per_scale(dec["gt_idx"][0], q.patch_nums)
    with torch.no_grad():
        assert rel_err(q.idx_to_fhat(idx), dec["f_hat"]) <= 1e-5
        x = q.idx_to_var_input(idx)                    # (3, 679, 8), scales concatenated per plane
        sizes = [pn * pn for pn in q.patch_nums[1:]]
        x_ar = torch.cat([t.reshape(1, -1, 8) for t in x.split(sizes, dim=1)], dim=1)
    assert rel_err(x_ar, var["x_BLCv_wo_first_l"]) <= 1e-5


def test_phi_map_follows_official_rule():
    assert phi_map(10, 4) == PAPER_PHI_MAP
    for S in range(2, 14):
        for K in range(1, 7):
            ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
            assert phi_map(S, K) == tuple(int(np.argmin(np.abs(ticks - si / (S - 1)))) for si in range(S)), (S, K)


def manual_contribution(q, si, idx_Bl, normalised):
    """Independent recomputation: rows → bicubic up (not at the last scale) → φ (differentiable
    in the codebook and φ)."""
    w = q.embedding.weight
    w = F.normalize(w, dim=-1) if normalised else w
    pn, H = q.patch_nums[si], q.patch_nums[-1]
    h = w[idx_Bl].reshape(-1, pn, pn, w.shape[1]).permute(0, 3, 1, 2)
    if si < len(q.patch_nums) - 1:
        h = F.interpolate(h, size=(H, H), mode="bicubic", align_corners=False)
    conv = q.quant_resi["qresi_ls"][q.phi_idx[si]]
    return 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)


def manual_residual_loop(q, f, normalised_at):
    """Independent residual quantization: per scale, cosine argmax on the area-downsampled
    residual, then add that scale's contribution. Returns per-scale ids and cumulative f̂."""
    w = F.normalize(q.embedding.weight.detach(), dim=-1)
    rest, acc, ids, fhats, S = f.clone(), torch.zeros_like(f), [], [], len(q.patch_nums)
    for si, pn in enumerate(q.patch_nums):
        z = F.adaptive_avg_pool2d(rest, pn).permute(0, 2, 3, 1).reshape(f.shape[0], pn * pn, -1)
        idx = torch.einsum("blc,vc->blv", F.normalize(z, dim=-1), w).argmax(-1)
        h = manual_contribution(q, si, idx, normalised_at(si, S))
        acc, rest = acc + h, rest - h
        ids.append(idx)
        fhats.append(acc)
    return ids, fhats


@pytest.mark.parametrize("quirks", [True, False])
def test_fhat_is_sum_of_scale_contributions(quirks):
    q = tiny(quirks).eval()
    f = torch.randn(6, 4, 4, 4)
    # tokenizer: raw rows with the quirk
    ids, fhats = manual_residual_loop(q, f, lambda si, S: not quirks)
    for a, b in zip(q.f_to_idx(f), ids):
        assert torch.equal(a, b)
    for a, b in zip(q.f_to_idx(f, to_fhat=True), fhats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # training forward (eval: no statistics): normalised rows, raw at the last scale with the quirk
    _, fw_fhats = manual_residual_loop(q, f, lambda si, S: not (quirks and si == S - 1))
    f_hat, loss, _ = q(f)
    torch.testing.assert_close(f_hat, fw_fhats[-1], rtol=1e-5, atol=1e-6)
    expected_loss = sum(1.25 * F.mse_loss(fh, f) for fh in fw_fhats) / len(fw_fhats)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
    # decoding path: normalised rows everywhere
    expected = sum(manual_contribution(q, si, idx, normalised=True) for si, idx in enumerate(ids))
    torch.testing.assert_close(q.idx_to_fhat(ids), expected, rtol=1e-5, atol=1e-6)
    assert quirks == (not torch.allclose(fhats[-1], expected, atol=1e-4))   # the quirk is visible


def test_teacher_forcing_matches_sampling_steps():
    """True ids through next_autoregressive_input give the teacher-forcing tokens and f̂ of idx_to_fhat;
    without the quirks, the tokenizer's f̂ is exactly what the ids decode to."""
    q = tiny(official_quirks=False)
    f = torch.randn(6, 4, 4, 4)
    idx = q.f_to_idx(f)
    with torch.no_grad():
        x = q.idx_to_var_input(idx)
        assert x.shape == (6, sum(pn * pn for pn in q.patch_nums[1:]), 4)
        f_hat, steps = torch.zeros_like(f), []
        for si in range(len(q.patch_nums)):
            f_hat, nxt = q.next_autoregressive_input(si, f_hat, q.lookup(idx[si]))
            steps.append(nxt.flatten(2).transpose(1, 2))
        torch.testing.assert_close(torch.cat(steps[:-1], dim=1), x)
        torch.testing.assert_close(steps[-1], f_hat.flatten(2).transpose(1, 2))
        torch.testing.assert_close(f_hat, q.idx_to_fhat(idx))
        torch.testing.assert_close(q.f_to_idx(f, to_fhat=True)[-1], f_hat)


def test_gradients_straight_through_and_loss():
    q = tiny(patch_nums=(1, 2, 3, 4)).train()
    assert sorted(set(q.phi_idx)) == [0, 1, 2, 3]
    f = torch.randn(6, 4, 4, 4, requires_grad=True)
    f_hat, loss, _ = q(f)
    g = torch.randn_like(f)
    (gf,) = torch.autograd.grad((f_hat * g).sum(), f, retain_graph=True)
    torch.testing.assert_close(gf, g)                       # straight-through: identity to the encoder
    loss.backward()
    # f only sees the β (commitment) term: β/S Σ_s 2(f − f̂_s)/N, f̂_s the forward's cumulative f̂
    S = len(q.patch_nums)
    idx, fhats = manual_residual_loop(q, f.detach(), lambda si, S: si != S - 1)
    expected = sum(0.25 / S * 2 * (f.detach() - fh) / f.numel() for fh in fhats)
    torch.testing.assert_close(f.grad, expected, rtol=1e-4, atol=1e-7)
    # codebook and φ only see the codebook term: mean_s ‖f̂_s − sg(f)‖²
    params = [q.embedding.weight] + [p for c in q.quant_resi["qresi_ls"] for p in c.parameters()]
    expected = torch.autograd.grad(sum(F.mse_loss(fh, f.detach()) for fh in fhats) / S, params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-8)
    used = torch.cat(idx, dim=1).unique()
    rows_with_grad = q.embedding.weight.grad.abs().sum(1).nonzero().flatten()
    assert torch.equal(rows_with_grad, used)                # exactly the chosen codes learn
    for conv in q.quant_resi["qresi_ls"]:
        assert conv.weight.grad.abs().sum() > 0 and conv.bias.grad.abs().sum() > 0


def test_small_config_trains():
    q = tiny(patch_nums=(1, 2, 4), vocab=64).train()
    f = torch.randn(6, 4, 4, 4)
    losses = []
    for _ in range(60):              # plain gradient descent (torch.optim's first use is slow to import)
        _, loss, usage = q(f)
        q.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in q.parameters():
                if p.grad is not None:   # φ conv 1 is unused by a 3-scale schedule
                    p -= 3.0 * p.grad
        losses.append(loss.item())
    # floor ≈ 0.55·start: one code per plane at scale 0 cannot fit random f
    assert sum(losses[-10:]) / 10 < 0.7 * losses[0], losses[::10]
    assert usage.shape == (3,) and (usage > 0).all()        # hit statistics were recorded
    assert q.ema_vocab_hit_SV[0].sum() == pytest.approx(6)  # one code per plane at scale 0
