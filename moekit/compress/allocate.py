"""Bit allocation: one width per item (a routed expert, a shared expert) minimising the summed measured error under
a budget of stored bits, solved exactly.

Legend: n items, W candidate widths, C budget in cost units.

The problem is a multiple-choice knapsack: item i takes option j at cost c_ij (its stored bits at width j, scales
and zeros included: ``quantize.bits_of``, an integer) and loss l_ij (its measured error, ``layer_quant``), with
sum_i c_ij <= budget. Errors add over items (the MC-MoE assumption, Huang et al. 2025, eq. 6: experts are
quantized independently and their output errors are measured one at a time). The dynamic program runs over the
budget in units of u = gcd of every cost: every allocation's cost is a multiple of u, so "cost <= budget" and
"cost / u <= floor(budget / u)" are the same condition and the program is exact in the integer bit counts. For a
stack of equal experts u is large (the costs of the widths share most of their factors), so the table is small;
should it still exceed ``MAX_CELLS``, costs are rounded *up* to a coarser unit (still within the budget, no longer
provably optimal; ``Allocation.exact`` says so).

Per layer, each MoE layer gets the budget of its own weights; ``global`` pools every item under one budget, so a
layer whose experts are cheap to quantize gives bits to one that is not.

Imports: numpy and ``moekit.compress.quantize``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moekit.compress.quantize import WIDTHS, QuantSpec, bits_of

MAX_CELLS = 50_000_000  # DP table entries (items x budget units) before costs are coarsened


@dataclass
class Allocation:
    """The chosen option of every item, their summed cost (bits) and loss, and whether optimality is proven."""

    choice: list[int]
    cost: int
    loss: float
    exact: bool


def solve_mckp(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int) -> Allocation:
    """min sum_i losses[i][j_i]  s.t.  sum_i costs[i][j_i] <= budget, one option j_i per item, by dynamic
    programming over the budget in gcd units (see the module docstring). Raises ValueError when even the
    cheapest option of every item exceeds the budget."""
    n = len(costs)
    if n == 0:
        return Allocation([], 0, 0.0, True)
    if len(losses) != n or any(len(c) != len(v) or not c for c, v in zip(costs, losses)):
        raise ValueError("solve_mckp: costs and losses must give the same non-empty options for every item")
    if any(int(c) != c or c < 0 for row in costs for c in row):
        raise ValueError("solve_mckp: costs must be non-negative integers (bits)")
    budget = int(budget)
    cheapest = sum(min(row) for row in costs)
    if cheapest > budget:
        raise ValueError(f"budget: {budget} bits is below the cheapest allocation ({cheapest} bits)")
    unit = 0
    for row in costs:
        for c in row:
            unit = math.gcd(unit, int(c))
    unit = max(unit, 1)
    cap = budget // unit
    exact = True
    if n * (cap + 1) > MAX_CELLS:  # coarsen: costs rounded up, so any solution still fits the budget
        unit = unit * math.ceil(n * (cap + 1) / MAX_CELLS)
        cap, exact = budget // unit, False
    w = [np.array([math.ceil(int(c) / unit) for c in row], dtype=np.int64) for row in costs]
    v = [np.asarray(row, dtype=np.float64) for row in losses]
    inf = np.inf
    dp = np.full(cap + 1, inf)  # dp[c]: the least loss of the items so far at total cost exactly c units
    dp[0] = 0.0
    pick = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):  # items in turn; every budget value at once
        new = np.full(cap + 1, inf)
        for j, (wj, vj) in enumerate(zip(w[i], v[i])):
            if wj > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[wj:] = dp[: cap + 1 - wj] + vj
            better = cand < new
            new[better] = cand[better]
            pick[i, better] = j
        dp = new
    if not np.isfinite(dp).any():  # only after coarsening (the exact check above passed)
        raise ValueError(f"budget: {budget} bits cannot be met after coarsening costs to units of {unit} bits")
    c = int(np.argmin(dp))  # the first (cheapest) of the least-loss totals
    best = float(dp[c])
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        j = int(pick[i, c])
        choice[i] = j
        c -= int(w[i][j])
    cost = sum(int(costs[i][j]) for i, j in enumerate(choice))
    return Allocation(choice, cost, best, exact)


@dataclass
class Item:
    """One unit that gets a width: its weight shapes (all stored at the item's width) and its loss per width."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    losses: dict[int, float]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def cost(self, spec: QuantSpec, bits: int) -> int:
        return sum(bits_of(s, spec.with_bits(bits)) for s in self.shapes)


def budget_bits(bits: float, numel: int) -> int:
    """The budget in whole bits of ``numel`` weights at an average of ``bits`` (floor: never above the average)."""
    return math.floor(bits * numel + 1e-9)


def smallest_error(items: Sequence[Item], spec: QuantSpec, widths: Sequence[int], bits: float, fixed: int = 0,
                   fixed_numel: int = 0) -> str:
    """The message for a budget below the cheapest allocation, with the numbers."""
    lo = min(widths)
    numel = sum(it.numel for it in items) + fixed_numel
    cheapest = (sum(it.cost(spec, lo) for it in items) + fixed) / max(1, numel)
    fixed = (f", with the {fixed_numel} weights quantized at a fixed width (attention, dense FFNs) counted"
             if fixed_numel else "")
    return (f"bits: a budget of {bits:g} bits per weight is below the smallest width: {lo}-bit in groups of "
            f"{spec.group_size or 'a whole row'} ({'symmetric' if spec.symmetric else 'asymmetric'}) costs "
            f"{cheapest:.4f} effective bits per weight with its scales and zeros{fixed}")


def allocate(items: Sequence[Item], spec: QuantSpec, bits: float, widths: Sequence[int] = WIDTHS,
             fixed_bits: int = 0, fixed_numel: int = 0) -> tuple[dict[str, int], Allocation]:
    """{item name: width} minimising the summed loss with the items' stored bits plus ``fixed_bits`` (weights
    quantized at a fixed width elsewhere, ``fixed_numel`` of them) at most ``bits`` per weight on average."""
    widths = sorted(widths)
    numel = sum(it.numel for it in items) + fixed_numel
    budget = budget_bits(bits, numel) - fixed_bits
    costs = [[it.cost(spec, b) for b in widths] for it in items]
    if sum(min(c) for c in costs) > budget:
        raise ValueError(smallest_error(items, spec, widths, bits, fixed_bits, fixed_numel))
    losses = [[it.losses[b] for b in widths] for it in items]
    sol = solve_mckp(costs, losses, budget)
    return {it.name: widths[j] for it, j in zip(items, sol.choice)}, sol


def uniform_width(items: Sequence[Item], spec: QuantSpec, bits: float, widths: Sequence[int] = WIDTHS,
                  fixed_bits: int = 0, fixed_numel: int = 0) -> int:
    """The widest single width at which every item fits the budget (the uniform allocation)."""
    numel = sum(it.numel for it in items) + fixed_numel
    budget = budget_bits(bits, numel) - fixed_bits
    fits = [b for b in sorted(widths) if sum(it.cost(spec, b) for it in items) <= budget]
    if not fits:
        raise ValueError(smallest_error(items, spec, widths, bits, fixed_bits, fixed_numel))
    return fits[-1]
