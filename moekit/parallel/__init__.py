"""Expert parallelism (EP) composed with data parallelism (DP) on torch.distributed.

Legend: T tokens of this rank, D dim, E experts (global), R = ep ranks in an expert-parallel group,
L = E / R experts held per rank, A rows (token-expert assignments, sorted by expert), N rows an
expert-parallel rank received, C capacity slots per (rank, expert), W = dp * ep processes.

Layout: a DeviceMesh ("dp", "ep") of shape (dp, ep); global rank = dp_rank * ep + ep_rank. EVERY rank
holds its own tokens (the data is split W ways: EP borrows ranks from DP, as torchtitan's "dp2ep" and
Megatron-Core's expert-data-parallel do). Rank ``ep_rank`` holds experts [ep_rank * L, (ep_rank + 1) * L),
replicated over the dp ranks; all other parameters are replicated over all W ranks.

The MoE pipeline is unchanged: route -> plan_dispatch -> experts -> combine. ``shard_model`` gives each
MoE layer an ``AllToAllDispatcher`` that stands between the plan and the experts:

    rows sorted by expert = sorted by destination rank (experts of a rank are contiguous)
    dropless  1. exchange the [R, L] row counts (all_to_all_single, equal splits)
              2. one host sync for the split sizes (as MegaBlocks, torchtitan and OLMo-core's dropless EP)
              3. all_to_all_single of the rows with variable splits (autograd: backward = same exchange,
                 splits swapped), regroup (source, expert) -> (expert, source), run the L local experts
              4. the results return the same way and ``combine`` puts them back in token order
    capacity  each rank packs its rows into a static [E, C, D] buffer (dropped rows go nowhere): fixed
              splits, no host-device sync. The capacities of the R senders (host ints, differing only when
              local batch sizes do) are exchanged once per layer over a CPU (gloo) group.

Capacity is per rank ("micro-batch" = the rank's tokens, GShard's groups): EP output on rank r equals
the single-process layer applied to rank r's tokens, in both modes.

Balance loss: with W > 1 the Switch loss uses the expert-assignment fractions f of the GLOBAL batch
(one all-reduce of E+1 counts per layer, no gradient needed) and each rank contributes its share of
the mean router probability P, so the mean of the per-rank losses is exactly the single-process loss
on the global batch (Qwen's "global-batch" LBL, Megatron-Core's ``global_aux_loss``). Routing statistics
and the aux-loss-free bias loads are summed over all W ranks by ``ParallelContext.reduce_stats``.

Gradients: every rank's loss is the mean over its own tokens and the global loss is the mean over
ranks, so grad = (1/W) sum_r grad_r. Non-expert parameters: all-reduce over the W ranks / W (or DDP).
Expert parameters already hold the sum over the ep group of the grads of the tokens they processed
(the all-to-all backward brings them home), so they are summed over the dp group only and divided by
W. ``clip_grad_norm_`` sums squared expert norms over the ep group, so every replica clips alike.

Checkpoints are layout-independent and in the single-process format (``moekit.train.state``):
``save_model`` gathers the stacked expert tensors on rank 0, ``load_model`` reads the full model and
slices it. ``full_optimizer_state`` / ``shard_optimizer_state`` do the same for AdamW moments.

Processes: ``launch(fn, nproc)`` starts nproc local processes with torchrun's environment (127.0.0.1, the
launcher hosts the rendezvous store) and fails fast, never hanging: a failed rank stops all, and a
deadline kills everything.
``setup_parallel`` reads that environment (or torchrun's), so the same code runs under ``torchrun``
with NCCL on GPUs.

Modules: ``context.py`` (ParallelContext, setup, reductions), ``dispatcher.py`` (AllToAllDispatcher),
``sharding.py`` (shard_model, full state dicts, optimizer state), ``processes.py`` (local processes).
Imports: ``moekit.config``, ``moekit.layer``, ``moekit.model`` and ``moekit.formats`` (checkpoints); never
training, compare or the CLI.
"""

from moekit.parallel.context import ParallelContext, setup_parallel, teardown_parallel
from moekit.parallel.dispatcher import AllToAllDispatcher, CommMeter
from moekit.parallel.processes import launch
from moekit.parallel.sharding import (
    check_expert_parallel,
    full_optimizer_state,
    full_state_dict,
    load_full_state_dict,
    load_model,
    save_model,
    shard_model,
    shard_optimizer_state,
    unsharded,
)

__all__ = [
    "AllToAllDispatcher", "CommMeter", "ParallelContext", "check_expert_parallel", "full_optimizer_state",
    "full_state_dict", "launch", "load_full_state_dict", "load_model", "save_model", "setup_parallel",
    "shard_model", "shard_optimizer_state", "teardown_parallel", "unsharded",
]
