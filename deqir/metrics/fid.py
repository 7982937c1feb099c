"""FID through torchmetrics + torch-fidelity, with Inception weights found offline.

torch-fidelity's ``pt_inception-2015-12-05`` weights (``weights-inception-2015-12-05-6726825d.pth``)
are looked up in: an explicit path (argument, else ``$DEQIR_FID_WEIGHTS``), then the torch hub cache
(``$TORCH_HOME/hub/checkpoints``). Nothing is downloaded; when the weights (or torch-fidelity) are
missing, :meth:`FIDMetric.create` warns once and returns None.

torch-fidelity reads the weights with ``torch.load(..., weights_only=False)``. The file is therefore read
exactly once, by us, with ``weights_only=True``; unless it is a plain tensor state dict it is refused. What
torch-fidelity unpickles is an in-memory copy of those tensors, so a file swapped on disk after the check
is never read.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

from deqir.metrics._warn import warn_once
from deqir.metrics.fidelity import to_uint8_batch

__all__ = ["ENV_FID_WEIGHTS", "INCEPTION_FILE", "FIDMetric", "find_inception_weights"]

ENV_FID_WEIGHTS = "DEQIR_FID_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _candidates(weights: str | Path | None, hub_dir: str | Path | None) -> list[Path]:
    out: list[Path] = []
    explicit = weights if weights is not None else os.environ.get(ENV_FID_WEIGHTS)
    if explicit:
        p = Path(explicit).expanduser()
        out.append(p / INCEPTION_FILE if p.is_dir() else p)
    hub = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    out.append(hub / INCEPTION_FILE)
    return out


def find_inception_weights(
    weights: str | Path | None = None, *, hub_dir: str | Path | None = None
) -> Path | None:
    """Locate torch-fidelity's Inception-v3 weights without loading them.

    Args:
        weights: Explicit file, or directory holding ``weights-inception-2015-12-05-6726825d.pth``;
            when None, ``$DEQIR_FID_WEIGHTS``.
        hub_dir: Replaces ``$TORCH_HOME/hub/checkpoints`` (tests).

    Returns:
        The first existing file, or None.
    """
    return next((p for p in _candidates(weights, hub_dir) if p.is_file()), None)


def load_checked_weights(path: Path) -> io.BytesIO:
    """Read the Inception weights once (``weights_only=True``) and return them re-serialised in memory.

    Raises:
        ValueError: the file is unreadable, or is not a plain ``{str: Tensor}`` state dict (refused).
    """
    from deqir.models.safe_read import describe_refused, quiet_torch_load

    try:
        sd = quiet_torch_load(path, [])
    except pickle.UnpicklingError as err:
        raise ValueError(f"FID Inception weights: {describe_refused(path, str(err))}") from None
    except (RuntimeError, EOFError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"FID Inception weights {path} are not readable ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: not a plain tensor state dict; refusing to pass it to torch-fidelity")
    buf = io.BytesIO()
    torch.save(dict(sd), buf)  # tensors only: unpickling this copy can run nothing but tensor rebuilds
    buf.seek(0)
    return buf


class FIDMetric:
    """Accumulating FID between restored ("fake") and target ("real") images on [0, 1].

    Images are rounded to uint8 (as saved PNGs) and fed to torch-fidelity's Inception-v3 (2048-d pool
    features, bilinear resize to 299 as in the TF reference). State lives in a torchmetrics ``Metric``,
    so ``compute()`` sums the statistics over DDP ranks when ``torch.distributed`` is initialised.
    FID from 100-1000 images is biased and high-variance: always report the sample size.

    Args:
        metric: A ``torchmetrics.image.fid.FrechetInceptionDistance`` taking uint8 images.
    """

    def __init__(self, metric: torch.nn.Module) -> None:
        self.metric = metric

    @classmethod
    def create(
        cls,
        weights: str | Path | None = None,
        *,
        hub_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        feature: int = 2048,
    ) -> FIDMetric | None:
        """Build the metric, or return None (one warning) when torch-fidelity or the weights are missing.

        Args:
            weights: Explicit Inception weights file or directory (else ``$DEQIR_FID_WEIGHTS``).
            hub_dir: Replaces ``$TORCH_HOME/hub/checkpoints`` (tests).
            device: Where the Inception network and the statistics live.
            feature: Inception feature layer; 2048 (pool3) is the standard FID. Smaller layers
                (64, 192, 768) exist for cheap tests only: their values are not comparable to FID.

        Returns:
            The metric, or None.
        """
        if importlib.util.find_spec("torch_fidelity") is None:
            warn_once(
                "fid-import", "FID disabled: torch-fidelity is not installed (pip install torch-fidelity)."
            )
            return None
        path = find_inception_weights(weights, hub_dir=hub_dir)
        if path is None:
            where = "; ".join(str(p) for p in _candidates(weights, hub_dir))
            warn_once(
                f"fid:{where}",
                f"FID disabled: Inception weights {INCEPTION_FILE} not found (searched {where}); "
                f"set ${ENV_FID_WEIGHTS} to a local copy.",
            )
            return None
        weights_copy = load_checked_weights(path)
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(
            feature=feature,
            normalize=False,
            reset_real_features=True,
            feature_extractor_weights_path=weights_copy,  # torch.load accepts a file object
        )
        return cls(metric.to(device))

    @property
    def num_samples(self) -> tuple[int, int]:
        """Number of (restored, target) images accumulated on this rank."""
        m = self.metric
        return int(m.fake_features_num_samples), int(m.real_features_num_samples)

    @torch.no_grad()
    def update(self, pred: Tensor | None, target: Tensor | None) -> None:
        """Add a batch: ``pred`` (restored or generated) and ``target`` (real) are ``(N, 3, H, W)`` on [0, 1];
        either may be None (generation adds its samples and the reference images separately)."""
        dev = self.metric.device
        if pred is not None:
            self.metric.update(to_uint8_batch(pred).to(dev), real=False)
        if target is not None:
            self.metric.update(to_uint8_batch(target).to(dev), real=True)

    def compute(self) -> float:
        """FID of everything accumulated (needs at least 2 images on each side)."""
        return float(self.metric.compute())

    def reset(self) -> None:
        """Forget all accumulated statistics."""
        self.metric.reset()
