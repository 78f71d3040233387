"""The MoE layer: route -> dispatch -> experts -> combine, usable on its own as a drop-in FFN.

    router.py    Router: scores, group-limited top-k, weights, aux-loss-free bias; RoutingResult
    losses.py    Switch/GShard, sequence-level and z losses
    dispatch.py  DispatchPlan: rows sorted by expert; capacity, drop policies, reroute; gather and combine
    ffn.py       what an expert computes: the FFN and its activations, plain PyTorch
    experts.py   the dense MLP and the stacked Experts with their backends
    moe.py       the MoE layer (one visible forward), MoEOutput, MoEStats
    kernels/     the fast paths, apart from the math they speed up: threads, scratch, the sorted-rows autograd
                 function, grouped_mm, the custom op, decode and combine kernels, backend selection, the
                 compiled layer

Imports: ``moekit.config`` and ``moekit.host`` only (nothing above the layer: no model, formats or training).
"""

from moekit.layer.experts import MLP, Experts
from moekit.layer.moe import MoE, MoEOutput, MoEStats
from moekit.layer.router import Router, RoutingResult

__all__ = ["MLP", "Experts", "MoE", "MoEOutput", "MoEStats", "Router", "RoutingResult"]
