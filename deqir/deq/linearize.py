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
