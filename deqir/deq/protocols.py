"""Contracts between the DEQ solvers and the maps they solve.

State layout everywhere: ``z`` has shape (B, S, *rest): B independent problems (images) and S slots
(the T timesteps of the chain; S = 1 for a map without slot structure). A map ``f`` returns a tensor of
the same shape. Solvers never look inside ``rest``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class TriangularMap(Protocol):
    """A map whose slot j depends only on slots < j, evaluated in two halves (used by the sliding window).

    ``eval_eps(z, lo, hi)`` runs the expensive part (the model) for slots lo..hi-1 only and returns their
    outputs E (B, hi - lo, ...); slot j reads z[:, j - 1] (slot 0 reads the fixed input x_T).
    ``states(E)`` turns the cheap explicit part: E (B, J, ...) for slots 0..J-1 -> states (B, J, ...).
    ``f(z) = states(eval_eps(z, 0, S))``.
    """

    num_slots: int

    def __call__(self, z: Tensor) -> Tensor: ...

    def eval_eps(self, z: Tensor, lo: int, hi: int) -> Tensor: ...

    def states(self, E: Tensor) -> Tensor: ...
