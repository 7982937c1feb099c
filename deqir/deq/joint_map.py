"""The joint fixed-point map of the whole T-step restoration chain (DeqIR, Cao et al. 2024, Sec. 3, generalised; docs/solvers.md).

State X (B, T, C, H, W): X[:, j] is the output of step j (the state at time t'_j; X[:, T-1] is x0).
One evaluation runs the eps-model once on all B*T slots (micro-batched by ``max_batch``): slot j reads
x_T for j = 0 and X[:, j-1] otherwise. The explicit part is rebuilt from x_T, A^+ y, the noise and the
eps predictions, never from X (as the official sampler: "the null-space content of X is used only through the UNet").

Unrolling the chain of :mod:`deqir.diffusion.chain` with the range projector P = A^+A and N = I - P:

    N x_{j+1} = r_j N x_j + g_j N eps_j + c1_j N z_j
    P x_{j+1} = r_j (1 - lam_j) P x_j + h_j P eps_j + c1_j P z_j + sqrt(a'_j) lam_j A^+ y

with r_j = sqrt(a'_j / a_j), g_j = c2_j - sqrt(a'_j) e_j, h_j = c2_j - sqrt(a'_j) (1 - lam_j) e_j and
e_j = sqrt((1 - a_j) / a_j). Because a_j = a'_{j-1}, the null-space products telescope
(prod_{k=i+1..j} r_k = sqrt(a'_j / a'_i)), giving the cumulative-sum form of the spec:

    N X_j = sqrt(a'_j) [ N x_T / sqrt(a_0) + sum_{i<=j} (g_i N eps_i + c1_i N z_i) / sqrt(a'_i) ]

With lam = 1 (noiseless DDNM, the official chain) the range part has no memory:
P X_j = c2_j P eps_j + c1_j P z_j + sqrt(a'_j) A^+ y. With lam < 1 (noise-aware) it is the lower-triangular
product W^P[j, i] = prod_{k=i+1..j} r_k (1 - lam_k), applied as a (T x T) matrix over the slot axis.

Two forms of the same fixed point (``form=``):

* ``cumsum`` (the paper's, Sec. 3): the explicit part is rebuilt from x_T and all eps predictions. Its
  per-round Jacobian holds the chain's large early-step weights sqrt(a'_j / a'_i) g_i that only cancel at
  the fixed point; it converges well for the deterministic chain (etw ~ 0, nw = 0) and badly for the
  stochastic one (measured: diverges with etw = nw = 1).
* ``step``: F(X)_j = Phi_j(X_{j-1}), one sequential step (DDIM x0 prediction, optional clipping of x0 to
  [-1, 1], DDNM rectification, re-noising) applied to the previous slot, all slots in one batch. Its
  per-round Jacobian is the one-step Jacobian; it converges fast for the stochastic chain (etw = nw = 1
  with per-step noise: 45 dB to the sequential result in 6-8 rounds at T = 25) and allows the nonlinear
  ``clip_x0``. For this form ``eval_eps`` returns the new states themselves and ``states`` is the identity.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deqir.chains import ChainStep, DDNMStep, eps_and_vjp, slot_vjp
from deqir.diffusion.chain import ChainCoefficients
from deqir.diffusion.protocols import EpsModel, LinearOperator
from deqir.deq.linearize import RadialGain, measure_radial_gain

EpsEvaluator = Callable[[Tensor, Tensor], Tensor]
FORMS = ("cumsum", "step")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(J,) float64 coefficients -> (1, J, 1, 1, 1) in ``like``'s dtype/device."""
    return v.to(device=like.device, dtype=like.dtype).view(1, -1, *([1] * (like.ndim - 2)))


def evaluate_in_chunks(model: EpsModel, x: Tensor, t: Tensor, max_batch: int | None) -> Tensor:
    """eps = model(x, t) for (N, C, H, W) in chunks of at most ``max_batch`` images."""
    if max_batch is None or max_batch >= x.shape[0]:
        return model(x, t)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 (or None for no limit), got {max_batch}")
    return torch.cat([model(x[i : i + max_batch], t[i : i + max_batch]) for i in range(0, x.shape[0], max_batch)])


class ChainMap:
    """F(X) for the T-step chain; implements the solvers' ``TriangularMap`` protocol.

    Args:
        model: eps-model, ``eps = model(x, t)``.
        coeffs: chain coefficients (T steps).
        x_T: (B, C, H, W) initial noise, fixed input of the map (gradients w.r.t. it flow through the
            explicit part when it requires grad).
        operator, y: degradation and measurements (B, ...); none for unconditional sampling.
        z: (B, T or 1, C, H, W) noise for the c1 term (shared image or one per step).
        max_batch: largest number of images per model call (results do not depend on it).
        eps_evaluator: optional replacement for the model call, ``(x (N,C,H,W), t (N,)) -> eps`` — e.g. a
            distributed evaluator that splits the slots across ranks and all-gathers.
        step_fn: the chain's step for the ``step`` form (:mod:`deqir.chains`, bound to this problem);
            default: the DDNM step of ``coeffs``. Steps that need the model's VJP (PiGDM, DPS) make every
            evaluation run the model under autograd.
    """

    def __init__(
        self,
        model: EpsModel,
        coeffs: ChainCoefficients,
        x_T: Tensor,
        *,
        operator: LinearOperator | None = None,
        y: Tensor | None = None,
        z: Tensor | None = None,
        max_batch: int | None = None,
        eps_evaluator: EpsEvaluator | None = None,
        form: str,
        clip_x0: bool = False,
        step_fn: ChainStep | None = None,
    ):
        if form not in FORMS:
            raise ValueError(f"unknown map form {form!r}; valid: {', '.join(FORMS)}")
        if clip_x0 and form != "step":
            raise ValueError("clip_x0=true makes the step nonlinear in eps and needs form=step; "
                             "set sampler.form=step or sampler.clip_x0=false")
        if (operator is None) != (y is None):
            raise ValueError("operator and y must be given together")
        T = len(coeffs)
        if bool((coeffs.c1 > 0).any()) and z is None:
            raise ValueError("the chain has a noise term (nw > 0): pass z")
        if z is not None and (z.ndim != x_T.ndim + 1 or z.shape[1] not in (1, T)):
            raise ValueError(f"z must have shape (B, {T} or 1, C, H, W), got {tuple(z.shape)}")
        self.model, self.coeffs, self.x_T = model, coeffs, x_T
        self.operator, self.max_batch = operator, max_batch
        self.form, self.clip_x0, self.z = form, clip_x0, z
        self.num_slots = T
        self.eps_evaluator = eps_evaluator or (lambda x, t: evaluate_in_chunks(model, x, t, max_batch))

        ref = x_T.unsqueeze(1)  # (B, 1, C, H, W), dtype/device reference
        self.sqrt_an = _bcast(torch.sqrt(coeffs.a_next), ref)
        e = coeffs.x0_eps
        sqrt_an64 = torch.sqrt(coeffs.a_next)
        g = coeffs.c2 - sqrt_an64 * e
        h = coeffs.c2 - sqrt_an64 * (1 - coeffs.lam) * e
        self.g_over = _bcast(g / sqrt_an64, ref)  # null-space eps weights inside the cumsum
        self.h = _bcast(h, ref)
        self.hard = bool((coeffs.lam == 1).all())
        if not self.hard:
            rho = torch.sqrt(coeffs.a_next / coeffs.a) * (1 - coeffs.lam)
            self.W_P = _lower_products(rho)  # (T, T) float64, W[j, i] = prod_{k=i+1..j} rho_k
            self.W0_P = torch.cumprod(rho, 0)  # (T,)
        self.t_all = coeffs.t.to(x_T.device)
        self._build_constants(x_T, y, z)
        # the step of the ``step`` form (deqir.chains); default: the DDNM chain of ``coeffs``
        if step_fn is not None and step_fn.name != "ddnm" and form != "step":
            raise ValueError(f"chain {step_fn.name!r} is solved in the map's step form: set sampler.form=step")
        self.step_fn = step_fn or DDNMStep(coeffs, operator=operator, y=y, z=z, clip_x0=clip_x0, pinv_y=self.pinv_y)
        self._vjp = None
        if self.step_fn.needs_vjp:  # PiGDM / DPS: the model runs under autograd; its VJP feeds the step
            plain_eval = self.eps_evaluator

            def eval_with_vjp(x: Tensor, t: Tensor) -> Tensor:
                eps, self._vjp = eps_and_vjp(plain_eval, x, t)
                return eps

            self.eps_evaluator = eval_with_vjp

    # -- constant (eps-independent) part -------------------------------------------------------
    def _build_constants(self, x_T: Tensor, y: Tensor | None, z: Tensor | None) -> None:
        co, T = self.coeffs, self.num_slots
        op = self.operator
        B, img = x_T.shape[0], x_T.shape[1:]
        ref = x_T.unsqueeze(1)
        c1 = _bcast(co.c1, ref)
        a0 = float(co.a[0])
        if op is not None:
            self.pinv_y = op.A_pinv(y).to(x_T.dtype)
            Px_T = op.A_pinv(op.A(x_T))
            Nx_T = x_T - Px_T
        else:
            self.pinv_y, Px_T, Nx_T = None, None, x_T
        # null space: sqrt(a'_j) [N x_T / sqrt(a_0) + sum_{i<=j} c1_i N z_i / sqrt(a'_i)]
        const_N = (Nx_T / a0**0.5).unsqueeze(1).expand(B, T, *img)
        const_P = None
        if z is not None and bool((co.c1 > 0).any()):
            zz = z.expand(B, T, *img) if z.shape[1] == 1 else z
            if op is not None:
                Pz = self.project(zz)
                Nz = zz - Pz
            else:
                Pz, Nz = None, zz
            const_N = const_N + torch.cumsum(c1 * Nz / self.sqrt_an, dim=1)
            if op is not None:
                const_P = c1 * Pz
        self.const_N = self.sqrt_an * const_N
        if op is not None:
            lam = _bcast(co.lam, ref)
            u = self.sqrt_an * lam * self.pinv_y.unsqueeze(1)
            const_P = u if const_P is None else const_P + u
            if not self.hard:
                const_P = self._apply_W(const_P) + _bcast(self.W0_P, ref) * Px_T.unsqueeze(1)
            self.const_P = const_P

    def project(self, v: Tensor) -> Tensor:
        """A^+A applied to every slot of (B, J, C, H, W)."""
        B, J = v.shape[:2]
        return self.operator.A_pinv(self.operator.A(v.reshape(B * J, *v.shape[2:]))).reshape(v.shape)

    def _apply_W(self, u: Tensor) -> Tensor:
        J = u.shape[1]
        W = self.W_P[:J, :J].to(device=u.device, dtype=u.dtype)
        return torch.einsum("ji,bi...->bj...", W, u)

    # -- TriangularMap protocol ----------------------------------------------------------------
    def slot_inputs(self, X: Tensor, lo: int, hi: int) -> Tensor:
        """UNet inputs of slots lo..hi-1: x_T for slot 0, X[:, j-1] otherwise. (B, hi-lo, C, H, W)."""
        parts = []
        if lo == 0:
            parts.append(self.x_T.unsqueeze(1))
            lo_x = 0
        else:
            lo_x = lo - 1
        if hi - 1 > lo_x:
            parts.append(X[:, lo_x : hi - 1])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def eval_eps(self, X: Tensor, lo: int = 0, hi: int | None = None) -> Tensor:
        """The expensive part of slots lo..hi-1, (B, hi-lo, C, H, W): one batched model call (chunked).

        ``cumsum``: the eps predictions. ``step``: the new states Phi_j(input_j) themselves.
        """
        hi = self.num_slots if hi is None else hi
        if not 0 <= lo < hi <= self.num_slots:
            raise ValueError(f"slot range [{lo}, {hi}) outside [0, {self.num_slots})")
        Z, E, _ = self._eval_window(X, lo, hi)
        return E if self.form == "cumsum" else self._steps(Z, E, lo, hi)

    def _eval_window(self, X: Tensor, lo: int, hi: int, extra_x: Tensor | None = None,
                     extra_t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The UNet inputs Z (B, J, ...) of slots lo..hi-1 and their eps E, plus the eps of ``extra_x`` (N, ...)
        at timesteps ``extra_t`` (N,), all in one evaluator call."""
        Z = self.slot_inputs(X, lo, hi)
        B, J = Z.shape[:2]
        x = Z.reshape(B * J, *Z.shape[2:])
        t = self.t_all[lo:hi].repeat(B)  # image-major: (b, j) -> b * J + j
        if extra_x is not None:
            x, t = torch.cat([x, extra_x]), torch.cat([t, extra_t])
        E = self.eps_evaluator(x, t).to(X.dtype)
        E_extra = E[B * J :] if extra_x is not None else None
        return Z, E[: B * J].reshape(B, J, *E.shape[1:]), E_extra

    def eval_eps_calibrated(self, X: Tensor, lo: int, hi: int, levels: int, h: float = 1e-2,
                            nbins: int | None = None) -> tuple[Tensor, RadialGain]:
        """``eval_eps(X, lo, hi)`` plus the ε-model's measured linearisation, in the same model call.

        At ``levels`` slots spread evenly over the window, the slot's input x is probed with one fixed white v
        (the same for every image; seed 0): with the window's own eps(x), the forward difference
        eps(x + h v) - eps(x) gives u = (d x0_hat / d x) v, and
        :func:`~deqir.deq.linearize.measure_radial_gain` turns (v, u) into each image's Fourier gain between
        colour channels (docs/solvers.md). Costs B ``levels`` extra image evaluations, batched with the window.
        ``nbins`` rings (None: min(H, W) // 5, between 4 and 24, so every ring averages enough frequencies).
        Returns ``(new states of slots lo..hi-1, RadialGain)``; step form of a linearizable (DDNM) chain only.
        """
        if not self.linearizable:
            raise ValueError("a measured linearisation needs the DDNM chain in the step form")
        if not 0 <= lo < hi <= self.num_slots:
            raise ValueError(f"slot range [{lo}, {hi}) outside [0, {self.num_slots})")
        if not 1 <= levels <= hi - lo:
            raise ValueError(f"calibration levels must be in [1, {hi - lo}] (the window), got {levels}")
        js = torch.linspace(lo, hi - 1, levels).round().long().unique().tolist()
        B = X.shape[0]
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn((len(js), *X.shape[2:]), generator=g, dtype=torch.float64).to(device=X.device, dtype=X.dtype)
        rel = [j - lo for j in js]
        probes = self.slot_inputs(X, lo, hi)[:, rel] + h * v  # (B, L, C, H, W)
        Z, E_win, E_p = self._eval_window(X, lo, hi, probes.reshape(-1, *X.shape[2:]), self.t_all[js].repeat(B))
        E_p = E_p.reshape(B, len(js), *E_p.shape[1:])
        a = self.coeffs.a[js].to(device=X.device, dtype=torch.float64).view(1, -1, 1, 1, 1)
        d_eps = (E_p - E_win[:, rel]).double()
        u = (h * v.double()[None] - torch.sqrt(1 - a) * d_eps) / (torch.sqrt(a) * h)
        if nbins is None:
            nbins = min(24, max(4, min(X.shape[-2:]) // 5))
        gain = measure_radial_gain(self.coeffs.a[js].double(), v.double(), u, nbins)
        return self._steps(Z, E_win, lo, hi), gain

    def eval_slot(self, x_in: Tensor, j: int) -> Tensor:
        """``step`` form: Phi_j(x_in), the output of slot j for the (B, C, H, W) input ``x_in`` (x_T for slot 0,
        the state of slot j - 1 otherwise); one model call on B images. The building block of the sequential
        schedule and of the adjoint's back-substitution (:mod:`deqir.deq.grad`)."""
        if self.form != "step":
            raise ValueError("eval_slot needs the map's step form (form='step')")
        if not 0 <= j < self.num_slots:
            raise ValueError(f"slot {j} outside [0, {self.num_slots})")
        B = x_in.shape[0]
        t = self.t_all[j : j + 1].repeat(B)
        E = self.eps_evaluator(x_in, t).to(x_in.dtype)
        return self._steps(x_in.unsqueeze(1), E.unsqueeze(1), j, j + 1)[:, 0]

    def _steps(self, Z: Tensor, E: Tensor, lo: int, hi: int) -> Tensor:
        """One step of the chain (deqir.chains) per slot: inputs Z and eps E (B, J, ...) -> outputs."""
        vjp, self._vjp = slot_vjp(self._vjp), None
        return self.step_fn(Z, E, lo, hi, vjp=vjp)

    def states(self, E: Tensor) -> Tensor:
        """States of slots 0..J-1 from their eval_eps outputs E (B, J, C, H, W) (identity for ``step``)."""
        if self.form == "step":
            return E
        J = E.shape[1]
        if self.operator is None:
            NE, PE = E, None
        else:
            PE = self.project(E)
            NE = E - PE
        X = self.const_N[:, :J] + self.sqrt_an[:, :J] * torch.cumsum(self.g_over[:, :J] * NE, dim=1)
        if self.operator is not None:
            P_part = self.h[:, :J] * PE
            if not self.hard:
                P_part = self._apply_W(P_part)
            X = X + self.const_P[:, :J] + P_part
        return X

    def __call__(self, X: Tensor) -> Tensor:
        return self.states(self.eval_eps(X, 0, self.num_slots))

    def initial_state(self) -> Tensor:
        """The paper's initialisation: every slot equal to x_T. (B, T, C, H, W)."""
        return self.x_T.detach().unsqueeze(1).expand(-1, self.num_slots, *self.x_T.shape[1:]).clone()

    # -- Newton-like sweeps (deqir.deq.linearize, docs/solvers.md) --------------------------------
    @property
    def slot_noise_std(self) -> Tensor:
        """(T,) float64 sqrt(1 - a'_j): the noise level of slot j's state (0 for x0, the last slot)."""
        return torch.sqrt(torch.clamp(1 - self.coeffs.a_next, min=0.0))

    @property
    def fresh_noise(self) -> bool:
        """Whether the chain's steps add fresh noise (``ChainStep.fresh_noise``): stochastic chains let a solver
        accept errors far below that noise (deqir.deq.solvers.newton)."""
        return bool(self.step_fn.fresh_noise)

    @property
    def linearizable(self) -> bool:
        """Whether :meth:`linear_step` models this chain (the DDNM step; other chains sweep with M = 0)."""
        return self.form == "step" and self.step_fn.name == "ddnm"

    def linear_step(self, v: Tensor, j: int, prior) -> Tensor:
        """M_j v ~ (d Phi_j / d x) v for (B, C, H, W) v, with the eps-model replaced by the posterior-mean
        denoiser of ``prior`` (a :class:`~deqir.deq.linearize.SpectralGaussianPrior`):

            M_j v = sqrt(a'_j) (I - lam_j A^+A) K v + c2_j (v - sqrt(a_j) K v) / sqrt(1 - a_j),   K = K_{a_j}
        """
        if not self.linearizable:
            return torch.zeros_like(v)
        co = self.coeffs
        a, an, lam, c2 = float(co.a[j]), float(co.a_next[j]), float(co.lam[j]), float(co.c2[j])
        Kv = prior.gain(v, a)
        out = an**0.5 * Kv
        if self.operator is not None and lam != 0.0:
            out = out - lam * self.project(out.unsqueeze(1))[:, 0]
        if c2 != 0.0:
            out = out + c2 * (v - a**0.5 * Kv) / (1 - a) ** 0.5
        return out

    def surrogate_state(self, prior) -> Tensor:
        """A zero-cost initial chain: the chain itself run sequentially with the eps-model replaced by the
        posterior-mean denoiser of a Gaussian image prior (``prior``, :mod:`deqir.deq.linearize`; zero mean),
        x0_hat_j = K_{a_j} x_j, through the chain's own step (data consistency and noise z_j included). For
        DDNM this is DDNM with a Gaussian prior: holes and lost frequencies are filled smoothly from the
        measurements. The base point of :meth:`linear_step`. Returns (B, T, C, H, W); no model call."""
        co, x, out = self.coeffs, self.x_T.detach(), []
        zero_vjp = (lambda w: torch.zeros_like(w)) if self.step_fn.needs_vjp else None
        for j in range(self.num_slots):
            a = float(co.a[j])
            eps = (x - a**0.5 * prior.gain(x, a)) / (1 - a) ** 0.5
            x = self.step_fn(x.unsqueeze(1), eps.unsqueeze(1), j, j + 1, vjp=zero_vjp)[:, 0]
            out.append(x)
        return torch.stack(out, dim=1)

    def extrapolated_state(self, x0_hat: Tensor | None = None) -> Tensor:
        """A zero-cost initial chain (ParaSolver's DDIM-jump fill, Lu et al. 2025): every step is taken with
        the eps that is consistent with a fixed clean estimate x0_hat, eps_j = (x_j - sqrt(a_j) x0_hat) /
        sqrt(1 - a_j), through the chain's own step (data consistency and noise z_j included). x0_hat
        (B, C, H, W) defaults to A^+ y (0 without an operator). Returns (B, T, C, H, W); no model call."""
        if x0_hat is None:
            x0_hat = self.pinv_y if self.pinv_y is not None else torch.zeros_like(self.x_T)
        x0_hat = x0_hat.detach().to(self.x_T.dtype)
        co, x, out = self.coeffs, self.x_T.detach(), []
        zero_vjp = (lambda w: torch.zeros_like(w)) if self.step_fn.needs_vjp else None
        for j in range(self.num_slots):
            a = float(co.a[j])
            eps = (x - a**0.5 * x0_hat) / (1 - a) ** 0.5
            x = self.step_fn(x.unsqueeze(1), eps.unsqueeze(1), j, j + 1, vjp=zero_vjp)[:, 0]
            out.append(x)
        return torch.stack(out, dim=1)


def _lower_products(rho: Tensor) -> Tensor:
    """W[j, i] = prod_{k=i+1..j} rho_k for i <= j (1 on the diagonal), 0 above. Float64, robust to rho = 0."""
    T = rho.numel()
    W = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        W[i, i] = 1.0
        for j in range(i + 1, T):
            W[j, i] = W[j - 1, i] * rho[j]
    return W
