"""Composition A = A_n ... A_2 A_1 of operators (first applied first), with an exact or a CG pseudo-inverse.

(A_2 A_1)+ = A_1+ A_2+ holds only for some pairs (e.g. colorization and a mask shared by the channels:
old-photo restoration). With ``pinv="exact"`` the composition checks the four Moore-Penrose conditions
for P = A_1+ ... A_n+ on seeded random probes at construction and refuses (``ValueError``) when they fail;
``pinv="cg"`` always works and solves A+ y by CGLS instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from deqir.operators.base import Operator
from deqir.operators.general import cgls

PINV_MODES = ("exact", "cg")


class ComposedOperator(Operator):
    """y = A_n(...A_2(A_1(x))); each operator's image shape must equal the previous measurement shape.

    Args:
        operators: [A_1, ..., A_n] (n >= 2), applied in this order.
        pinv: ``"exact"`` (A+ = A_1+ ... A_n+, verified) or ``"cg"`` (CGLS on the composition).
        max_iter, tol: CGLS settings for ``pinv="cg"``.
        check_tol: relative tolerance of the Moore-Penrose check.

    Example:
        >>> from deqir.operators import make_operator
        >>> gray = make_operator("colorize", (3, 16, 16))
        >>> holes = make_operator("inpaint", (1, 16, 16), mask_type="box")
        >>> old_photo = ComposedOperator([gray, holes])  # exact: colour + mask
        >>> old_photo.measurement_shape
        (1, 16, 16)
    """

    def __init__(self, operators: Sequence[Operator], pinv: str = "exact", *, max_iter: int = 200,
                 tol: float = 1e-6, check_tol: float = 1e-6) -> None:
        ops = list(operators)
        if len(ops) < 2 or not all(isinstance(op, Operator) for op in ops):
            raise ValueError("compose needs a list of at least two deqir operators, applied first to last")
        if pinv not in PINV_MODES:
            raise ValueError(f"unknown pinv mode {pinv!r}; valid: {', '.join(PINV_MODES)}")
        super().__init__(ops[0].image_shape)
        for prev, nxt in zip(ops[:-1], ops[1:]):
            if tuple(nxt.image_shape) != tuple(prev.measurement_shape):
                raise ValueError(f"cannot compose {type(prev).__name__} (measurements {prev.measurement_shape}) with "
                                 f"{type(nxt).__name__} (built for images {nxt.image_shape}); build the second "
                                 f"operator with image_shape={prev.measurement_shape}")
        self.ops = nn.ModuleList(ops)
        self.pinv_mode, self.max_iter, self.tol = pinv, int(max_iter), float(tol)
        if pinv == "exact":
            self._check_exact(float(check_tol))

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return tuple(self.ops[-1].measurement_shape)

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        for op in self.ops:
            x = op.A(x)
        return x

    def observed(self, y: Tensor) -> Tensor:
        return self.ops[-1].observed(y)  # the last operator makes the measurement

    def A_adjoint(self, y: Tensor) -> Tensor:
        for op in reversed(self.ops):
            y = op.A_adjoint(y)
        return y

    def A_pinv(self, y: Tensor) -> Tensor:
        if self.pinv_mode == "cg":
            self.check_measurement(y)
            return cgls(self.A, self.A_adjoint, y, max_iter=self.max_iter, tol=self.tol)
        for op in reversed(self.ops):
            y = op.A_pinv(y)
        return y

    def _measurement_noise(self, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.ops[-1]._measurement_noise(y, generator)

    def y_to_image(self, y: Tensor) -> Tensor:
        """Each operator's picture of its measurement, last to first."""
        for op in reversed(self.ops):
            y = op.y_to_image(y)
        return y

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        paths: list[Path] = []
        for i, op in enumerate(self.ops, start=1):
            paths += op.save_artifacts(Path(directory) / f"op{i}_{type(op).__name__}")
        return paths

    def _check_exact(self, tol: float) -> None:
        """Verify the Moore-Penrose conditions of (A, A_1+ ... A_n+) on seeded probes (float64)."""
        g = torch.Generator().manual_seed(0)
        dev = self._probe_device()
        x = torch.randn((2, *self.image_shape), generator=g, dtype=torch.float64).to(dev)
        y = torch.randn((2, *self.measurement_shape), generator=g, dtype=torch.float64).to(dev)
        M, P = self.A, self.A_pinv

        def rel(a: Tensor, b: Tensor) -> float:
            return float((a - b).norm() / b.norm().clamp_min(1e-30))

        def sym(f, v: Tensor) -> float:  # |<f v1, v2> - <v1, f v2>| / (|v1| |v2|); f is a projector
            fv = f(v)
            lhs, rhs = (fv[0] * v[1]).sum(), (v[0] * fv[1]).sum()
            return float((lhs - rhs).abs() / (v[0].norm() * v[1].norm()))

        checks = {
            "A A+ A = A": rel(M(P(M(x))), M(x)),
            "A+ A A+ = A+": rel(P(M(P(y))), P(y)),
            "A A+ symmetric": sym(lambda v: M(P(v)), y),
            "A+ A symmetric": sym(lambda v: P(M(v)), x),
        }
        failed = {k: v for k, v in checks.items() if not v <= tol}
        if failed:
            names = " then ".join(type(op).__name__ for op in self.ops)
            detail = ", ".join(f"{k} (relative error {v:.2e})" for k, v in failed.items())
            raise ValueError(
                f"the pseudo-inverse of {names} is not the product of the pseudo-inverses: {detail}. "
                f"Exact compositions include colorize + inpaint (either order, mask shared by the channels), "
                f"anything + denoise, inpaint + inpaint; use pinv='cg' for a CG pseudo-inverse of any composition")

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, pinv={self.pinv_mode}"
