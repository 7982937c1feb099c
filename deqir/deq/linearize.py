"""A cheap linear model of one chain step, for Newton-like sweeps over the slots (docs/solvers.md).

The step form solves X_j = Phi_j(X_{j-1}). Picard lags all of Phi_j' one round, so an error in slot j-1 is
*transported* to slot j with gain ~ Phi_j' instead of being removed; in the low-noise end of the chain
Phi_j' ~ I on the null space and errors move one slot per round. A Newton step removes that lag:

    D = (I - M L)^{-1} (F(X) - X),   i.e.   D_j = R_j + M_j D_{j-1}   (a cheap sequential sweep)

with L the one-slot shift and M_j ~ Phi_j'. With M_j = Phi_j' exactly this is Newton's method on the
triangular system; with M_j = 0 it is Picard. We take M_j from the step with the eps-model replaced by the
posterior-mean denoiser of a stationary Gaussian image prior (DDIM eq. 12 notation, a = alpha_bar(t_j)):

    x_t = sqrt(a) x0 + sqrt(1 - a) n,   x0 ~ N(mu, Sigma)
    d x0_hat / d x_t = K_a = sqrt(a) Sigma (a Sigma + (1 - a) I)^{-1}

with Sigma diagonal in the 2-D Fourier basis, power spectrum P(f) = c (f^2 + f0^2)^(-slope/2) (natural
images: a power law; ``slope`` ~ 3 for the small photos the embedded model knows), scaled so the mean
per-pixel variance is ``variance``. K_a is one FFT multiplier per timestep: no model call.

The Gaussian prior is an assumption; :class:`RadialGain` is the same kind of linear model *measured* on the
ε-model itself. Around the chain's own states x at a few levels, one white probe v per level and a forward
difference give u = (d x0_hat / d x) v; a least-squares fit of U = K V on every ring of equal |f|, channel to
channel (K is C x C per ring), is the model's Fourier gain K_a(|f|) for that image (a stationary approximation
of a spatially varying Jacobian). Between measured levels it is interpolated linearly in log-SNR, log(a / (1 - a)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class SpectralGaussianPrior:
    """Power-law Gaussian image prior: the Fourier gain K_a of its posterior-mean denoiser.

    Args:
        slope: power-spectrum exponent (P ~ |f|^-slope), > 0.
        variance: mean per-pixel variance of x0 on the [-1, 1] scale, > 0.
    """

    def __init__(self, slope: float = 3.0, variance: float = 0.5):
        if not (slope > 0 and math.isfinite(slope)):
            raise ValueError(f"prior slope must be a finite number > 0, got {slope!r}")
        if not (variance > 0 and math.isfinite(variance)):
            raise ValueError(f"prior variance must be a finite number > 0, got {variance!r}")
        self.slope, self.variance = float(slope), float(variance)
        self._spectra: dict[tuple, Tensor] = {}

    def spectrum(self, H: int, W: int, device: torch.device | str = "cpu") -> Tensor:
        """P(f) on the (H, W) FFT grid (float64), mean = ``variance`` (orthonormal FFT: Parseval)."""
        key = (H, W, str(device))
        if key not in self._spectra:
            fy = torch.fft.fftfreq(H, dtype=torch.float64, device=device)[:, None]
            fx = torch.fft.fftfreq(W, dtype=torch.float64, device=device)[None, :]
            f0 = 1.0 / max(H, W)
            P = (fy**2 + fx**2 + f0**2) ** (-self.slope / 2)
            self._spectra[key] = P * (self.variance / P.mean())
        return self._spectra[key]

    def gain(self, v: Tensor, a: float) -> Tensor:
        """K_a v for v (..., H, W): the Jacobian of the Gaussian posterior mean E[x0 | x_t] at level a."""
        H, W = v.shape[-2:]
        P = self.spectrum(H, W, v.device)
        K = (math.sqrt(a) * P / (a * P + (1.0 - a))).to(v.dtype if v.dtype == torch.float64 else torch.float32)
        V = torch.fft.fft2(v, norm="ortho")
        return torch.fft.ifft2(V * K, norm="ortho").real.to(v.dtype)


class RadialGain:
    """A measured Fourier gain of d x0_hat / d x_t per image: K (B, L, C, C, nbins) at L levels ``a``.

    K[b, l, d, c, r] is the gain from channel c of the input to channel d of x0_hat on the ring r of equal |f|
    (the model couples colours: chroma is smoothed more than luminance). Drop-in for
    :class:`SpectralGaussianPrior` in :meth:`~deqir.deq.joint_map.ChainMap.linear_step`: ``gain(v, a)``
    applies the gain at level ``a`` (interpolated in log-SNR, clamped to the measured range).
    Built by :func:`measure_radial_gain`.
    """

    def __init__(self, levels: Tensor, K: Tensor, H: int, W: int):
        if levels.ndim != 1 or K.ndim != 5 or K.shape[1] != levels.numel() or K.shape[2] != K.shape[3] \
                or levels.numel() < 1:
            raise ValueError(f"RadialGain needs levels (L,) and K (B, L, C, C, nbins), got {tuple(levels.shape)}, "
                             f"{tuple(K.shape)}")
        order = torch.argsort(levels)
        self.levels = levels[order].double().cpu()
        self.K = K[:, order]
        self.nbins = K.shape[-1]
        self.ring = radial_bins(H, W, self.nbins, K.device)
        self._cache: dict[float, Tensor] = {}  # per level: the ring gains (B, C, C, nbins), small

    def multiplier(self, a: float) -> Tensor:
        """(B, C, C, H, W) Fourier multiplier at level ``a`` (output channel, input channel)."""
        return self._ring_gains(a)[..., self.ring]

    def _ring_gains(self, a: float) -> Tensor:
        if a not in self._cache:
            snr = torch.log(self.levels / (1 - self.levels).clamp_min(1e-300))
            x = math.log(a / max(1.0 - a, 1e-300))
            if x <= float(snr[0]) or len(snr) == 1:
                k = self.K[:, 0]
            elif x >= float(snr[-1]):
                k = self.K[:, -1]
            else:
                i = int((snr <= x).nonzero().max())
                w = (x - float(snr[i])) / float(snr[i + 1] - snr[i])
                k = (1 - w) * self.K[:, i] + w * self.K[:, i + 1]
            self._cache[a] = k
        return self._cache[a]

    def gain(self, v: Tensor, a: float) -> Tensor:
        """K_a v for v (B, C, H, W), each image with its own measured gain."""
        V = torch.fft.fft2(v, norm="ortho")
        K = self._ring_gains(a).to(V.dtype)[..., self.ring]
        return torch.fft.ifft2(torch.einsum("bdchw,bchw->bdhw", K, V), norm="ortho").real.to(v.dtype)


def radial_bins(H: int, W: int, nbins: int, device: torch.device | str = "cpu") -> Tensor:
    """(H, W) ring index in [0, nbins) of every FFT frequency: |f| / |f|_max, |f|_max = sqrt(0.5^2 + 0.5^2)."""
    fy = torch.fft.fftfreq(H, dtype=torch.float64, device=device)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64, device=device)[None, :]
    r = torch.sqrt(fy**2 + fx**2) / math.sqrt(0.5)
    return torch.clamp(torch.round(r * (nbins - 1)), max=nbins - 1).long()


def measure_radial_gain(levels: Tensor, v: Tensor, u: Tensor, nbins: int = 24) -> RadialGain:
    """The least-squares ring-wise gain of u = J v, channel to channel: per ring r, K minimises
    sum_f |U(f) - K V(f)|^2 + mu |K - K_diag|^2, i.e. K = (Q + mu K_diag)(G + mu I)^-1 with
    G = Re sum V V^H, Q = Re sum U V^H and K_diag the channel-wise gains Re sum conj(V_c) U_c / sum |V_c|^2
    (mu = 1e-6 tr(G) / C: a ring with fewer frequencies than channels, e.g. the DC one, falls back to the
    channel-wise gain instead of a minimum-norm guess). One white probe per level identifies the whole C x C
    coupling: exact for a model whose denoiser is a ring-wise multiplier.

    Args:
        levels: (L,) the levels a of the probed states.
        v: (L, C, H, W) the probes (one per level, shared by the images).
        u: (B, L, C, H, W) the responses (d x0_hat / d x) v per image and level.
        nbins: rings of equal |f|.
    """
    B, L, C, H, W = u.shape
    if v.shape != (L, C, H, W) or levels.shape != (L,):
        raise ValueError(f"probes {tuple(v.shape)} and levels {tuple(levels.shape)} do not match responses "
                         f"{tuple(u.shape)}")
    ring = radial_bins(H, W, nbins, u.device).flatten()
    G = torch.zeros(L, C, C, nbins, dtype=torch.float64, device=u.device)
    Q = torch.zeros(B, L, C, C, nbins, dtype=torch.float64, device=u.device)
    for l in range(L):  # one level at a time: the cross-products are (B, C, C, H*W) each
        V = torch.fft.fft2(v[l].double(), norm="ortho").flatten(1)  # (C, HW)
        U = torch.fft.fft2(u[:, l].double(), norm="ortho").flatten(2)  # (B, C, HW)
        G[l].index_add_(2, ring, (V[:, None] * V.conj()[None]).real)
        Q[:, l].index_add_(3, ring, (U[:, :, None] * V.conj()[None, None]).real)
    G, Q = G.permute(0, 3, 1, 2), Q.permute(0, 1, 4, 2, 3)  # (L, R, C, C), (B, L, R, C, C)
    g_diag = G.diagonal(dim1=-2, dim2=-1)  # (L, R, C)
    k_diag = torch.where(g_diag > 0, Q.diagonal(dim1=-2, dim2=-1) / g_diag.clamp_min(1e-300), torch.zeros_like(g_diag))
    mu = (1e-6 * g_diag.sum(-1) / C)[..., None, None]  # (L, R, 1, 1)
    eye = torch.eye(C, dtype=torch.float64, device=u.device)
    rhs = Q + mu * torch.diag_embed(k_diag)
    lhs = (G + mu * eye + 1e-300 * eye)[None].expand(B, -1, -1, -1, -1)
    K = torch.linalg.solve(lhs, rhs, left=False)  # X lhs = rhs
    K = torch.where(torch.isfinite(K), K, torch.zeros_like(K)).permute(0, 1, 3, 4, 2)  # (B, L, C, C, R)
    return RadialGain(levels.double(), K, H, W)
