"""The two samplers of a restoration chain, side by side above the chains they run (docs/solvers.md):

* :func:`~deqir.samplers.sequential.sample_sequential` -- the chain step by step (T model calls per image), the
  ground truth of every DEQ test;
* :func:`~deqir.samplers.deq.sample_deq` -- the whole chain as one fixed point, all timesteps in one batch per
  round, solved by :mod:`deqir.deq.solvers`.

Both take the same chain (:mod:`deqir.chains` steps or the built-in DDNM chain of
:mod:`deqir.diffusion.chain`) and the same noise (:func:`~deqir.samplers.sequential.draw_chain_noise`), so they
solve the same problem. Layers: operators, models, schedule -> chains -> deq (joint map, solvers, gradients) ->
samplers -> optim -> lit / api.
"""
from __future__ import annotations

from deqir.samplers.deq import INITS, DEQResult, coarse_warm_start, sample_deq
from deqir.samplers.sequential import SequentialStats, chain_start, draw_chain_noise, rectify, sample_sequential

__all__ = ["INITS", "DEQResult", "SequentialStats", "chain_start", "coarse_warm_start", "draw_chain_noise", "rectify",
           "sample_deq", "sample_sequential"]
