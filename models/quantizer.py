"""Multi-scale residual vector quantizer of SAR3D, applied to triplanes.

Layout: the VQVAE encoder emits (B, 3·Cvae, 16, 16); it is reshaped to (B·3, Cvae, 16, 16)
before quantization, row 3b+p being plane p of object b. Every method here therefore sees a
batch of B·3 independent planes that share one codebook; splitting the planes into the AR
model's order (per scale: plane 0 | plane 1 | plane 2) is the AR model's job.

Suffixes follow VAR: B batch (planes), C = Cvae, h/w spatial, l/L token counts, V vocab.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn import functional as F

# The official map for 10 scales and 4 φ convs. The rule it comes from (argmin over ticks) is
# an exact tie at scales 2 and 7 that floating-point rounding happens to break upward.
PAPER_PHI_MAP = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def phi_map(num_scales: int, num_phi: int) -> Tuple[int, ...]:
    """Scale index → φ index. Paper schedule hard-coded; otherwise the official rule: scale si
    sits at t = si/(S-1) and takes the nearest of K ticks, linspace(1/3K, 1-1/3K) when K == 4 and
    linspace(1/2K, 1-1/2K) otherwise (ties go to the first tick, as in np.argmin)."""
    if (num_scales, num_phi) == (10, 4):
        return PAPER_PHI_MAP
    lo = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    hi = 1 - lo
    step = (hi - lo) / max(num_phi - 1, 1)
    ticks = [lo + k * step for k in range(num_phi - 1)] + [hi]   # as np.linspace: last tick exact
    ts = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return tuple(min(range(num_phi), key=lambda k: (abs(ticks[k] - t), k)) for t in ts)


class TriplaneQuantizer(nn.Module):
    """VAR-style residual quantizer with cosine lookup and partially shared φ convs.

    Args:
        vocab_size, c_vae: codebook size V and code width Cvae.
        patch_nums: token-map side per scale, small to large; the last equals the plane side.
        beta: commitment weight of the VQ loss.
        phi_ratio: r in φ(h) = (1-r)·h + r·conv3x3(h).
        num_phi: number of φ convs shared across scales (see `phi_map`).
        official_quirks: reproduce the official code's codebook-row conventions. True: the
            training forward adds ℓ2-normalised rows at scales 0..S-2 but the raw row at the last
            scale, and the tokenizer `f_to_idx` adds raw rows at every scale (teacher forcing and
            sampling always use normalised rows). False: normalised rows everywhere, so all four
            paths build the same f̂ from the same indices, whatever the codebook norms.
    Parameter and buffer names equal the official ones under `decoder.superresolution.quantize.`.
    """

    def __init__(self, vocab_size: int = 16384, c_vae: int = 8,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), beta: float = 0.25,
                 phi_ratio: float = 0.5, num_phi: int = 4, official_quirks: bool = True):
        super().__init__()
        self.vocab_size, self.c_vae, self.beta = vocab_size, c_vae, beta
        self.patch_nums = tuple(patch_nums)
        self.phi_ratio, self.official_quirks = abs(phi_ratio), official_quirks
        self.phi_idx = phi_map(len(self.patch_nums), num_phi)
        self.embedding = nn.Embedding(vocab_size, c_vae)
        self.quant_resi = nn.ModuleDict({"qresi_ls": nn.ModuleList(
            nn.Conv2d(c_vae, c_vae, 3, padding=1) for _ in range(num_phi))})
        # Usage statistics only (the codebook is learnt by gradient, not by EMA).
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.hit_updates = 0            # forwards seen, for the EMA warm-up; not in the state dict (trainers save it)
        with torch.no_grad():           # official init: U(±1/V), then unit rows
            self.embedding.weight.uniform_(-1 / vocab_size, 1 / vocab_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def extra_repr(self) -> str:
        return (f"patch_nums={self.patch_nums}, beta={self.beta}, phi_ratio={self.phi_ratio}, "
                f"phi_idx={self.phi_idx}, official_quirks={self.official_quirks}")

    # ---- building blocks --------------------------------------------------------------------
    def phi(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """φ of scale si on a full-resolution contribution (B, C, H, W)."""
        conv = self.quant_resi["qresi_ls"][self.phi_idx[si]]
        return h_BChw.mul(1 - self.phi_ratio) + conv(h_BChw).mul_(self.phi_ratio)

    def lookup(self, idx_Bl: torch.Tensor, normalised: bool = True) -> torch.Tensor:
        """Token ids (B, pn²) → code map (B, C, pn, pn), rows ℓ2-normalised unless told not."""
        B, l = idx_Bl.shape
        pn = round(l ** 0.5)
        w_VC = F.normalize(self.embedding.weight, dim=-1) if normalised else self.embedding.weight
        return w_VC[idx_Bl].view(B, pn, pn, self.c_vae).permute(0, 3, 1, 2)

    def _nearest(self, f_rest_BChw: torch.Tensor, si: int) -> torch.Tensor:
        """Cosine-nearest code per cell of the area-downsampled residual → idx_Bl (B, pn²)."""
        B, C = f_rest_BChw.shape[:2]
        pn = self.patch_nums[si]
        if si != len(self.patch_nums) - 1:
            f_rest_BChw = F.interpolate(f_rest_BChw, size=(pn, pn), mode="area")
        z_NC = F.normalize(f_rest_BChw.permute(0, 2, 3, 1).reshape(-1, C), dim=-1)
        w_CV = F.normalize(self.embedding.weight.detach(), dim=-1).T
        return (z_NC @ w_CV).argmax(dim=1).view(B, pn * pn)

    def _contribution(self, si: int, idx_Bl: torch.Tensor, normalised: bool) -> torch.Tensor:
        """φ(bicubic-up(code map)) of scale si at full resolution (B, C, H, W); the last scale
        is already full size and is not resampled."""
        h_BChw = self.lookup(idx_Bl, normalised)
        if si != len(self.patch_nums) - 1:
            H = self.patch_nums[-1]
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        return self.phi(si, h_BChw.contiguous())

    def _record_hits(self, si: int, idx_Bl: torch.Tensor) -> None:
        hit_V = idx_Bl.flatten().bincount(minlength=self.vocab_size).float()
        if tdist.is_available() and tdist.is_initialized():
            tdist.all_reduce(hit_V)
        decay = 0.0 if self.hit_updates == 0 else 0.9 if self.hit_updates < 100 else 0.99
        self.ema_vocab_hit_SV[si].mul_(decay).add_(hit_V.mul(1 - decay))

    # ---- one method per use -----------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VQVAE training step on planes f (B·3, C, H, W), H = W = patch_nums[-1].

        Returns f̂ (float32, same shape; straight-through: its gradient goes to f unchanged),
        the VQ loss (scalar) = mean over scales of β·‖sg(f̂_s) − f‖² + ‖f̂_s − sg(f)‖² with f̂_s the
        cumulative reconstruction after scale s (MSE means), which alone trains codebook and φ,
        and the usage per scale (S,): % of codes whose EMA hit count exceeds 1% of uniform.
        """
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        assert H == W == self.patch_nums[-1], f"planes {H}x{W} != last scale {self.patch_nums[-1]}"
        f_no_grad = f_BChw.detach()
        f_rest, f_hat = f_no_grad.clone(), torch.zeros_like(f_no_grad)
        S = len(self.patch_nums)
        loss = f_BChw.new_zeros(())
        with torch.autocast(f_BChw.device.type, enabled=False):   # argmax/loss in fp32
            for si in range(S):
                idx_Bl = self._nearest(f_rest, si)
                if self.training:
                    self._record_hits(si, idx_Bl)
                h_BChw = self._contribution(si, idx_Bl, normalised=not (self.official_quirks and si == S - 1))
                f_hat = f_hat + h_BChw
                f_rest -= h_BChw.detach()          # the residual only picks the next indices
                loss = loss + F.mse_loss(f_hat.detach(), f_BChw).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad)
            loss = loss * (1.0 / S)
            f_hat = (f_hat.detach() - f_no_grad).add_(f_BChw)
        if self.training:
            self.hit_updates += 1
        margin_S = torch.tensor([B * pn * pn / self.vocab_size * 0.01 for pn in self.patch_nums],
                                device=f_BChw.device)
        usage_S = (self.ema_vocab_hit_SV > margin_S[:, None]).float().mean(dim=1) * 100
        return f_hat, loss, usage_S

    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor, to_fhat: bool = False) -> List[torch.Tensor]:
        """Tokenizer: planes (B·3, C, H, W) → per scale the ids idx_Bl (B·3, pn²), or with
        to_fhat the cumulative f̂ after that scale (B·3, C, H, W)."""
        assert f_BChw.shape[-1] == f_BChw.shape[-2] == self.patch_nums[-1], f_BChw.shape
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        for si in range(len(self.patch_nums)):
            idx_Bl = self._nearest(f_rest, si)
            h_BChw = self._contribution(si, idx_Bl, normalised=not self.official_quirks)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_Bl)
        return out

    def idx_to_var_input(self, idx_Bl: List[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input from per-scale ids [(B·3, pn_s²)]: for s = 1..S-1 the f̂ built from
        scales < s, area-downsampled to pn_s, as tokens. Returns x_BLCv_wo_first_l of shape
        (B·3, L - pn_0², C), L = Σ pn², scales concatenated per plane; the AR model regroups it
        to (B, 3·(L - pn_0²), C) ordered per scale as [plane 0 | plane 1 | plane 2]."""
        f_hat = torch.zeros(idx_Bl[0].shape[0], self.c_vae, self.patch_nums[-1], self.patch_nums[-1],
                            device=idx_Bl[0].device)
        next_scales = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self._contribution(si, idx_Bl[si], normalised=True)
            pn = self.patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def idx_to_fhat(self, idx_Bl: List[torch.Tensor]) -> torch.Tensor:
        """Decoding path: per-scale ids [(B·3, pn_s²)] → f̂ (B·3, C, H, W) with normalised rows,
        the rows the AR sampler adds."""
        return sum(self._contribution(si, idx, normalised=True) for si, idx in enumerate(idx_Bl))

    def next_autoregressive_input(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One sampling step: add scale si's code map h (B·3, C, pn_si, pn_si; normalised rows,
        see `lookup`) to f̂ (B·3, C, H, W). Returns (new f̂, next input), the next input being f̂
        area-downsampled to pn_{si+1} (or f̂ itself after the last scale). f̂ is not modified."""
        if si != len(self.patch_nums) - 1:
            H = self.patch_nums[-1]
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        f_hat_BChw = f_hat_BChw + self.phi(si, h_BChw)
        if si == len(self.patch_nums) - 1:
            return f_hat_BChw, f_hat_BChw
        pn = self.patch_nums[si + 1]
        return f_hat_BChw, F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")
