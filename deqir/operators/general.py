"""General linear operators from a user's ``A`` (and optional adjoint): pseudo-inverse by CGLS.

Users restore through a custom kernel, mask or physics model without deriving an SVD: give ``A``; the
adjoint is the vector-Jacobian product of A (autograd) unless given; A+ y is the minimum-norm least-squares
solution, computed by conjugate gradients on the normal equations (CGLS) started from 0, which stays in
range(A^T) and so converges to exactly A+ y.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from deqir.operators.base import Operator


def cgls(
    A: Callable[[Tensor], Tensor],
    A_adjoint: Callable[[Tensor], Tensor],
    y: Tensor,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> Tensor:
    """Minimum-norm least-squares solution x = A+ y by CGLS, batched with per-sample step sizes.

    Args:
        A, A_adjoint: the operator and its adjoint on batches.
        y: measurements (B, ...).
        max_iter: iteration cap (each iteration costs one A and one A^T).
        tol: stop once |A^T (y - A x)| <= tol |A^T y| for every sample.

    Returns:
        x (B, ...image shape).
    """
    r = y.clone()
    s = A_adjoint(r)
    x = torch.zeros_like(s)
    p = s.clone()
    dims = tuple(range(1, s.ndim))
    gamma = s.pow(2).sum(dims)
    stop = (tol * gamma.sqrt()).pow(2)
    for _ in range(int(max_iter)):
        active = gamma > stop
        if not bool(active.any()):
            break
        q = A(p)
        qq = q.pow(2).sum(tuple(range(1, q.ndim)))
        alpha = torch.where(active & (qq > 0), gamma / _nonzero(qq), torch.zeros_like(qq))
        x = x + _bc(alpha, x) * p
        r = r - _bc(alpha, q) * q
        s = A_adjoint(r)
        gamma_new = s.pow(2).sum(dims)
        beta = torch.where(active, gamma_new / _nonzero(gamma), torch.zeros_like(gamma))
        p = s + _bc(beta, p) * p
        gamma = torch.where(active, gamma_new, gamma)
    return x


class GeneralLinearOperator(Operator):
    """Any linear map given as a function; A+ by CGLS, A^T by autograd unless given.

    Args:
        A: x (B, C, H, W) -> y (B, ...), linear, batch-size agnostic.
        image_shape: (C, H, W).
        A_adjoint: y -> (B, C, H, W); default: the vector-Jacobian product of ``A`` (exact for linear A).
        max_iter, tol: CGLS settings; ``A_pinv`` is exact only up to ``tol`` (relative normal-equation
            residual), so for tight identities use float64 and a small tol.
        y_to_image: optional picture of a measurement; default A+ y.
        measurement_shape: shape of one y; default: read off the first call of A.

    The callables keep their own tensors: ``.to()`` does not move them. No SVD is exposed.

    Example:
        >>> import torch
        >>> op = GeneralLinearOperator(lambda x: x[..., ::2, :], (1, 4, 4), tol=1e-12)
        >>> x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
        >>> bool(torch.allclose(op.A_pinv(op.A(x))[..., ::2, :], x[..., ::2, :]))
        True
    """

    def __init__(
        self,
        A: Callable[[Tensor], Tensor],
        image_shape: Sequence[int],
        A_adjoint: Callable[[Tensor], Tensor] | None = None,
        *,
        max_iter: int = 200,
        tol: float = 1e-6,
        y_to_image: Callable[[Tensor], Tensor] | None = None,
        measurement_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(image_shape)
        if not callable(A) or (A_adjoint is not None and not callable(A_adjoint)):
            raise ValueError("A (and A_adjoint when given) must be callables on tensor batches")
        if int(max_iter) < 1 or not float(tol) > 0:
            raise ValueError(f"CG needs max_iter >= 1 and tol > 0, got max_iter={max_iter!r}, tol={tol!r}")
        self._forward_fn = A
        self._adjoint_fn = A_adjoint
        self._picture_fn = y_to_image
        self.max_iter, self.tol = int(max_iter), float(tol)
        self._meas_shape = None if measurement_shape is None else tuple(int(s) for s in measurement_shape)

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        """Given, or read off the first call of A (probed with float64 zeros on the CPU if asked first)."""
        if self._meas_shape is None:
            self._infer_shape(torch.zeros(1, dtype=torch.float64))
        return self._meas_shape

    def _infer_shape(self, like: Tensor) -> None:
        with torch.no_grad():
            y = self._forward_fn(torch.zeros(1, *self.image_shape, dtype=like.dtype, device=like.device))
        self._meas_shape = tuple(y.shape[1:])

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        y = self._forward_fn(x)
        if self._meas_shape is None:
            self._meas_shape = tuple(y.shape[1:])
        return y

    def A_adjoint(self, y: Tensor) -> Tensor:
        if self._meas_shape is None:
            self._infer_shape(y)
        self.check_measurement(y)
        if self._adjoint_fn is not None:
            return self._adjoint_fn(y)
        return vjp_adjoint(self._forward_fn, y, self.image_shape)

    def A_pinv(self, y: Tensor) -> Tensor:
        if self._meas_shape is None:
            self._infer_shape(y)
        self.check_measurement(y)
        return cgls(self._forward_fn, self.A_adjoint, y, max_iter=self.max_iter, tol=self.tol)

    def y_to_image(self, y: Tensor) -> Tensor:
        return self._picture_fn(y) if self._picture_fn is not None else self.A_pinv(y)

    def extra_repr(self) -> str:
        adj = "given" if self._adjoint_fn is not None else "autograd"
        return f"image_shape={self.image_shape}, adjoint={adj}, max_iter={self.max_iter}, tol={self.tol:g}"


def vjp_adjoint(forward: Callable[[Tensor], Tensor], y: Tensor, image_shape: Sequence[int]) -> Tensor:
    """A^T y as the vector-Jacobian product of a linear ``forward`` at 0 (works under no_grad / inference_mode)."""
    outer_grad = torch.is_grad_enabled() and y.requires_grad
    with torch.inference_mode(False), torch.enable_grad():
        x0 = torch.zeros(y.shape[0], *image_shape, dtype=y.dtype, device=y.device, requires_grad=True)
        out = forward(x0)
        v = y if outer_grad else y.detach().clone()
        (g,) = torch.autograd.grad(out, x0, grad_outputs=v, create_graph=outer_grad)
    return g


def _nonzero(v: Tensor) -> Tensor:
    """v with zeros replaced by ones (a safe denominator; the zero entries are masked by the caller)."""
    return torch.where(v > 0, v, torch.ones_like(v))


def _bc(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> broadcastable against (B, ...)."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))
