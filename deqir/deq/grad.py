"""Gradients through the DeqIR equilibrium: attach IFT, phantom or unrolled gradients to a solved chain.

The forward solve (:mod:`deqir.deq.solvers`) runs without autograd and returns the equilibrium
``z* = F(z*; x_T)`` of the joint map :class:`~deqir.deq.joint_map.ChainMap` (states (B, T, C, H, W)).
:func:`attach_gradient` re-applies the map once (or a few times) with autograd enabled so that the returned
states carry a gradient to everything ``F`` reads that requires grad: the initial noise ``x_T`` (the
explicit affine term sqrt(a'_j / a_0) N x_T and slot 0's model input), and model parameters if they require
grad. Solving and differentiating are independent knobs (torchdeq's ``backward_factory`` split).

Modes (``DEQGradientConfig.mode``):

* ``"ift"`` -- implicit function theorem. With L(z*), z* = F(z*, x_T):

      dL/dx_T = (dF/dx_T)^T g,    g = J^T g + dL/dz*,   J = dF/dz at z*                     (1)

  The returned tensor is F(z*) evaluated with autograd (value: one Picard step past z*); a custom
  autograd function replaces the incoming gradient dL/dz by the solution g of the adjoint fixed point (1),
  computed with a solver of :mod:`deqir.deq.solvers` from vector-Jacobian products J^T g
  (``torch.autograd.grad``); autograd then continues through F to x_T. J is strictly block lower
  triangular in the slots, so J^T is nilpotent and Picard is exact after T rounds (``adjoint_solver=
  "picard"``, ``adjoint_max_iter=T``, ``adjoint_tol=0``); Anderson stops on a tolerance. Exact w.r.t.
  x_T when the forward and adjoint solves are exact. Picard runs up to T rounds of T slot-VJPs (~T^2
  slot-VJPs; T serial rounds of one batched call: the parallel schedule, for hardware with idle batch
  capacity).

  ``adjoint_solver="back_substitution"`` (step form, F_j = Phi_j(X_{j-1})): J has only the sub-diagonal
  blocks dPhi_j/dx, so (1) is block upper-bidiagonal and is solved exactly from the last slot back,

      g_{T-1} = dL/dX_{T-1},    g_{j-1} = dL/dX_{j-1} + (dPhi_j/dx)^T g_j                        (2)

  -- T - 1 single-slot VJPs (the sequential schedule of the adjoint). It is implemented by evaluating
  F(z*) slot by slot with autograd, slot j reading z*_{j-1} in value and slot j-1's output in gradient
  (straight-through), so autograd's own backward *is* (2), and gradients to model parameters come out as
  sum_j (dPhi_j/dtheta)^T g_j. Memory: the activations of the T single-slot calls (as backprop through the
  sequential chain). :func:`sequential_with_gradient` goes one step further for the sequential schedule:
  it solves the equilibrium by one sweep with autograd (the same value and gradient, no separate solve).
  ``"auto"`` = back_substitution for the step form, picard for the cumsum form (the app picks picard where
  solver=auto chose the all-slots schedule, docs/gradients.md).
* ``"phantom"`` -- k damped steps z <- tau F(z) + (1 - tau) z from the *detached* equilibrium (Geng et al.
  2021; torchdeq's phantom gradient; the official DeqIR inversion uses k = 1, tau = 0.1). With k = 1 the
  gradient reaching x_T is tau (dF/dx_T)^T dL/dz: the explicit term plus slot 0's model Jacobian;
  ``phantom_analytic=True`` drops the latter, giving the official code's Jacobian-free form
  dL/dx_T = tau sqrt(a'_j / a_0) N dL/dX_j (docs/gradients.md).
* ``"unroll"`` -- backpropagation through ``unroll_rounds`` Picard rounds z <- F(z) from the detached
  equilibrium. Exact after T rounds (F composed T times does not depend on its starting point).

Memory: slot 0 (which reads x_T) is evaluated in its own model call, so the batched call over slots
1..T-1 keeps no activations when neither the states nor the model parameters require grad. Phantom with
k = 1 therefore stores the activations of one image per chain, whatever T is. The IFT adjoint builds the
graph of F w.r.t. z only inside ``backward`` (T - 1 images), freed when ``backward`` returns.

Use under ``torch.no_grad()`` is fine (autograd is enabled internally), but not under
``torch.inference_mode()``: inference tensors cannot enter autograd (Lightning's ``Trainer`` runs
``predict``/``test`` in inference mode unless ``inference_mode=False``).

Example:
    >>> import torch
    >>> from deqir.diffusion.chain import make_chain
    >>> from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
    >>> from deqir.deq.solvers import picard
    >>> coeffs = make_chain(NoiseSchedule.create(), SamplingGrid.create(5), etw=0.0, nw=0.0)
    >>> model = lambda x, t: 0.5 * torch.tanh(x)                # any eps = model(x, t)
    >>> x_T = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    >>> fmap = ChainMap(model, coeffs, x_T, form="cumsum")        # built with autograd enabled
    >>> z_star, _ = picard(fmap, fmap.initial_state(), max_iter=5, tol=0.0)
    >>> states = attach_gradient(fmap, z_star, "ift")            # (1, 5, 3, 8, 8), value F(z*)
    >>> states[:, -1].square().sum().backward()                  # loss on x0
    >>> x_T.grad.shape
    torch.Size([1, 3, 8, 8])
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from deqir.deq.joint_map import ChainMap
from deqir.deq.solvers import get_solver, solver_options

__all__ = ["GRADIENT_MODES", "ADJOINT_SOLVERS", "DEQGradientConfig", "attach_gradient", "resolve_adjoint_solver",
           "sequential_with_gradient"]

GradientMode = Literal["ift", "phantom", "unroll"]
GRADIENT_MODES = ("ift", "phantom", "unroll")
#: Solvers usable for the adjoint (the sliding window needs a TriangularMap; the adjoint map is not one).
ADJOINT_SOLVERS = ("auto", "picard", "anderson", "back_substitution")
#: Adjoint solvers that run a fixed-point solver of deqir.deq.solvers.
_ITERATIVE = ("anderson", "picard")
#: Adjoint-solver options applied unless the caller sets them: gradients can be tiny, so the Anderson
#: regularisation must be scale-invariant (an absolute lam = 1e-3 would dominate the Gram matrix).
_ADJOINT_DEFAULTS: dict[str, dict[str, Any]] = {"anderson": {"lam_mode": "relative"}, "picard": {}}


@dataclass(frozen=True)
class DEQGradientConfig:
    """How gradients are attached to the equilibrium (plain values; maps onto a ``gradient=`` config group).

    Attributes:
        mode: ``"ift"`` | ``"phantom"`` | ``"unroll"`` (module docstring).
        phantom_steps: k, damped steps of the phantom gradient (official: 1).
        tau: damping of the phantom steps in (0, 1] (official: 0.1).
        phantom_analytic: phantom only: evaluate slot 0's model input x_T detached, so the gradient to x_T
            of one step is the official Jacobian-free term tau sqrt(a'_j / a_0) N (default False: keep
            slot 0's model Jacobian, the exact partial derivative dF/dx_T).
        unroll_rounds: k, Picard rounds backpropagated by ``"unroll"`` (T rounds: exact).
        adjoint_solver: ``"auto"`` (default: ``back_substitution`` for the step form, ``picard`` for the
            cumsum form) | ``"back_substitution"`` (eq. 2: exact, T - 1 single-slot VJPs; step form only) |
            ``"picard"`` (exact after T rounds of T slot-VJPs; the parallel schedule) | ``"anderson"``.
        adjoint_max_iter: vector-Jacobian products at most; None = T (Picard is exact after T rounds).
        adjoint_tol: stopping tolerance of the adjoint solve (0 = run all rounds).
        adjoint_stop_mode: ``"rel"`` | ``"abs"``.
        adjoint_options: extra solver keywords (Anderson defaults to ``lam_mode="relative"``).
    """

    mode: GradientMode = "ift"
    phantom_steps: int = 1
    tau: float = 0.1
    phantom_analytic: bool = False
    unroll_rounds: int = 2
    adjoint_solver: str = "auto"
    adjoint_max_iter: int | None = None
    adjoint_tol: float = 1e-4
    adjoint_stop_mode: str = "rel"
    adjoint_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {self.mode!r}; valid: {', '.join(GRADIENT_MODES)}")
        for name in ("phantom_steps", "unroll_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 < float(self.tau) <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        if self.adjoint_solver not in ADJOINT_SOLVERS:
            raise ValueError(f"unknown adjoint_solver {self.adjoint_solver!r}; valid: {', '.join(ADJOINT_SOLVERS)}")
        m = self.adjoint_max_iter
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"adjoint_max_iter must be an integer >= 1 or None, got {m!r}")
        valid = (set(solver_options(self.adjoint_solver)) - {"max_iter", "tol", "stop_mode", "callback"}
                 if self.adjoint_solver in _ITERATIVE else set())
        unknown = set(self.adjoint_options) - valid
        if unknown:
            raise ValueError(f"adjoint solver {self.adjoint_solver!r} has no option(s) {sorted(unknown)}; "
                             f"valid: {', '.join(sorted(valid))}")

    def attach(self, fmap: ChainMap, z_star: Tensor, *,
               on_backward: Callable[[dict[str, Any]], None] | None = None) -> Tensor:
        """:func:`attach_gradient` with this configuration."""
        return _attach(fmap, z_star, self, on_backward)


def attach_gradient(
    fmap: ChainMap,
    z_star: Tensor,
    mode: GradientMode = "ift",
    *,
    phantom_steps: int = 1,
    tau: float = 0.1,
    phantom_analytic: bool = False,
    unroll_rounds: int = 2,
    adjoint_solver: str = "auto",
    adjoint_max_iter: int | None = None,
    adjoint_tol: float = 1e-4,
    adjoint_stop_mode: str = "rel",
    adjoint_options: Mapping[str, Any] | None = None,
    on_backward: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """States equal (in value) to the equilibrium, carrying the chosen gradient to ``fmap``'s inputs.

    Args:
        fmap: the map whose equilibrium ``z_star`` is; its ``x_T`` may require grad (then build the map
            with autograd enabled, so its x_T-dependent constants are differentiable).
        z_star: (B, T, C, H, W) solver output (any grad state; it is detached).
        mode, phantom_steps, tau, phantom_analytic, unroll_rounds, adjoint_*: see
            :class:`DEQGradientConfig`.
        on_backward: IFT only: called once per backward pass with ``{"adjoint_stats": SolverStats,
            "adjoint_rounds": int, "adjoint_residual": float}`` (for logging; never prints).

    Returns:
        (B, T, C, H, W) states: ``F(z*)`` for ``"ift"`` (one Picard step past z*, equal at convergence),
        the last damped step for ``"phantom"``, the last Picard round for ``"unroll"``.

    Raises:
        RuntimeError: under ``torch.inference_mode()`` or for inference tensors.
        ValueError: invalid options, or ``fmap`` built under ``no_grad`` while its x_T requires grad.
    """
    cfg = DEQGradientConfig(
        mode=mode, phantom_steps=phantom_steps, tau=tau, phantom_analytic=phantom_analytic,
        unroll_rounds=unroll_rounds, adjoint_solver=adjoint_solver, adjoint_max_iter=adjoint_max_iter,
        adjoint_tol=adjoint_tol, adjoint_stop_mode=adjoint_stop_mode, adjoint_options=dict(adjoint_options or {}),
    )
    return _attach(fmap, z_star, cfg, on_backward)


# ---------------------------------------------------------------------------------------------------------
def _check_context(fmap: ChainMap, z_star: Tensor) -> None:
    if torch.is_inference_mode_enabled() or z_star.is_inference() or fmap.x_T.is_inference():
        raise RuntimeError(
            "DEQ gradients cannot be attached under torch.inference_mode() or to inference tensors: autograd "
            "cannot record them. Use torch.no_grad() (gradients are enabled internally) and, with Lightning, "
            "Trainer(inference_mode=False)."
        )
    if fmap.x_T.requires_grad and not fmap.const_N.requires_grad:
        raise ValueError(
            "fmap.x_T requires grad but the map's x_T-dependent constants do not: the ChainMap was built "
            "under torch.no_grad(). Build it inside `with torch.enable_grad():`."
        )
    if z_star.shape != fmap.const_N.shape:
        raise ValueError(f"z_star must have the map's state shape {tuple(fmap.const_N.shape)}, "
                         f"got {tuple(z_star.shape)}")


def _eval_eps(fmap: ChainMap, X: Tensor, *, detach_slot0: bool = False) -> Tensor:
    """All T eps predictions (B, T, C, H, W) with slot 0 (model input x_T) in a separate model call.

    Splitting keeps the batched call over slots 1..T-1 free of stored activations when neither ``X`` nor the
    model parameters require grad (a batch that contains x_T would record all of them).
    """
    T = fmap.num_slots
    if detach_slot0:
        with torch.no_grad():
            e0 = fmap.eval_eps(X, 0, 1)
    else:
        e0 = fmap.eval_eps(X, 0, 1)
    return e0 if T == 1 else torch.cat([e0, fmap.eval_eps(X, 1, T)], dim=1)


def _attach(fmap: ChainMap, z_star: Tensor, cfg: DEQGradientConfig,
            on_backward: Callable[[dict[str, Any]], None] | None) -> Tensor:
    _check_context(fmap, z_star)
    z = z_star.detach()
    with torch.enable_grad():
        if cfg.mode == "ift" and resolve_adjoint_solver(cfg.adjoint_solver, fmap.form) == "back_substitution":
            return _back_substitution_states(fmap, z)
        if cfg.mode == "ift":
            E = _eval_eps(fmap, z)
            out = fmap.states(E)  # F(z*) with autograd: paths to x_T and to the model parameters
            if not out.requires_grad or fmap.num_slots == 1:
                return out  # nothing to differentiate, or no slot coupling (J = 0)
            backward = _AdjointBackward(fmap, z, E[:, :1].detach(), cfg, on_backward)
            return _AdjointGradient.apply(out, backward)
        if cfg.mode == "phantom":
            tau = float(cfg.tau)
            for _ in range(cfg.phantom_steps):
                fz = fmap.states(_eval_eps(fmap, z, detach_slot0=cfg.phantom_analytic))
                z = tau * fz + (1.0 - tau) * z  # Geng et al. (2021) damped unrolling
            return z
        for _ in range(cfg.unroll_rounds):  # "unroll": plain Picard rounds, fully differentiated
            z = fmap.states(_eval_eps(fmap, z))
        return z


def resolve_adjoint_solver(name: str, form: str) -> str:
    """The adjoint solver ``name`` stands for with the map form ``form``: ``"auto"`` -> ``back_substitution``
    (step form) or ``picard`` (cumsum form). ValueError for back_substitution with the cumsum form."""
    if name == "auto":
        return "back_substitution" if form == "step" else "picard"
    if name == "back_substitution" and form != "step":
        raise ValueError("adjoint_solver=back_substitution needs the map's step form (sampler.form=step); "
                         "use gradient.adjoint_solver=picard with sampler.form=cumsum")
    return name


def _back_substitution_states(fmap: ChainMap, z: Tensor) -> Tensor:
    """F(z*) slot by slot: value Phi_j(z*_{j-1}), gradient through slot j-1's output (eq. 2 by autograd)."""
    resolve_adjoint_solver("back_substitution", fmap.form)  # ValueError for the cumsum form
    outs: list[Tensor] = []
    for j in range(fmap.num_slots):
        if j == 0:
            x_in = fmap.x_T
        else:
            prev = outs[-1]
            # value z*_{j-1}; gradient to slot j-1's output (prev - prev.detach() is exactly 0)
            x_in = z[:, j - 1] + (prev - prev.detach()) if prev.requires_grad else z[:, j - 1]
        outs.append(fmap.eval_slot(x_in, j))
    return torch.stack(outs, dim=1)


def sequential_with_gradient(fmap: ChainMap) -> Tensor:
    """The equilibrium solved by the sequential schedule *with* autograd: X_j = Phi_j(X_{j-1}), X_{-1} = x_T.

    Step form only. One sweep of T single-slot calls reaches the exact fixed point of the step-form map
    (J is nilpotent), and backpropagation through it is the adjoint back-substitution (eq. 2) at that fixed
    point: the IFT gradient of ``adjoint_solver="back_substitution"`` without a separate no-grad solve (T
    forward + T backward slot evaluations per optimisation step). Returns (B, T, C, H, W) states.
    """
    if fmap.form != "step":
        raise ValueError("sequential_with_gradient needs the map's step form (form='step')")
    if torch.is_inference_mode_enabled() or fmap.x_T.is_inference():
        raise RuntimeError("sequential_with_gradient needs autograd: call it outside torch.inference_mode()")
    outs: list[Tensor] = []
    with torch.enable_grad():
        for j in range(fmap.num_slots):
            outs.append(fmap.eval_slot(fmap.x_T if j == 0 else outs[-1], j))
    return torch.stack(outs, dim=1)


class _AdjointBackward:
    """Backward of the IFT gradient: solves g = J^T g + grad (eq. 1) with vector-Jacobian products.

    Holds only what one backward needs (the map, the detached equilibrium and slot 0's eps); the graph of
    F w.r.t. z is rebuilt inside ``__call__`` and freed when it returns, so nothing leaks between calls.
    """

    def __init__(self, fmap: ChainMap, z_star: Tensor, eps0: Tensor, cfg: DEQGradientConfig,
                 on_backward: Callable[[dict[str, Any]], None] | None) -> None:
        self.fmap, self.z_star, self.eps0, self.cfg, self.on_backward = fmap, z_star, eps0, cfg, on_backward

    def __call__(self, grad: Tensor) -> Tensor:
        fmap, cfg, T = self.fmap, self.cfg, self.fmap.num_slots
        with torch.enable_grad():
            z_req = self.z_star.detach().requires_grad_(True)
            # F(z) as a function of z only: slot 0 reads x_T (fixed), slots 1..T-1 read z[:, :-1].
            f_req = fmap.states(torch.cat([self.eps0, fmap.eval_eps(z_req, 1, T)], dim=1))
        grad = grad.detach()

        def adjoint_map(g: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(f_req, z_req, g, retain_graph=True, allow_unused=True)
            return grad if vjp is None else grad + vjp  # g <- J^T g + dL/dz   (1)

        name = resolve_adjoint_solver(cfg.adjoint_solver, fmap.form)
        opts = {**_ADJOINT_DEFAULTS[name], **dict(cfg.adjoint_options)}
        max_iter = cfg.adjoint_max_iter if cfg.adjoint_max_iter is not None else T
        g, stats = get_solver(name)(
            adjoint_map, grad, max_iter=max_iter, tol=float(cfg.adjoint_tol), stop_mode=cfg.adjoint_stop_mode,
            **opts,
        )
        f_req = z_req = None  # free the rebuilt graph before the callback runs
        if self.on_backward is not None:
            finite = stats.best_residual[torch.isfinite(stats.best_residual)]
            self.on_backward({
                "adjoint_stats": stats,
                "adjoint_rounds": int(stats.rounds),
                "adjoint_residual": float(finite.max()) if finite.numel() else float("inf"),
            })
        return g


class _AdjointGradient(torch.autograd.Function):
    """Identity in the forward pass; the backward maps dL/dz to the adjoint solution g of eq. (1)."""

    @staticmethod
    def forward(ctx, out: Tensor, backward: _AdjointBackward) -> Tensor:  # type: ignore[override]
        ctx.adjoint = backward
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.adjoint(grad), None
