"""The bit allocator: the dynamic program's optimum equals brute force, it never exceeds the budget, and an
impossible budget is a clear error with the numbers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moekit.compress.allocate import Item, allocate, budget_bits, solve_mckp, uniform_width
from moekit.compress.quantize import QuantSpec, bits_of


def brute_force(costs, losses, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][j] for i, j in enumerate(choice))
        if cost <= budget:
            loss = sum(losses[i][j] for i, j in enumerate(choice))
            if best is None or loss < best[0]:
                best = (loss, cost, choice)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_dp_equals_brute_force_on_random_instances(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 7, (), generator=g))
    options = int(torch.randint(2, 5, (), generator=g))
    # costs with a common factor (as bit counts of equal experts have) and without
    scale = 1 if seed % 2 else 36
    costs = (torch.randint(1, 30, (n, options), generator=g) * scale).tolist()
    losses = torch.rand(n, options, generator=g, dtype=torch.float64).tolist()
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for budget in sorted({lo, (lo + hi) // 2, lo + (hi - lo) // 5, hi, hi + 7}):
        sol = solve_mckp(costs, losses, budget)
        ref = brute_force(costs, losses, budget)
        assert sol.exact
        assert sol.cost <= budget
        assert sol.cost == sum(costs[i][j] for i, j in enumerate(sol.choice))
        assert sol.loss == pytest.approx(sum(losses[i][j] for i, j in enumerate(sol.choice)))
        assert sol.loss == pytest.approx(ref[0], rel=1e-12)


def test_budget_below_the_cheapest_allocation_is_an_error():
    with pytest.raises(ValueError, match=r"budget: 9 bits is below the cheapest allocation \(10 bits\)"):
        solve_mckp([[5, 8], [5, 9]], [[1.0, 0.5], [1.0, 0.2]], 9)


def _items(n: int, seed: int) -> list[Item]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for e in range(n):
        err = {b: float(torch.rand((), generator=g)) * 4.0**-b for b in (2, 3, 4, 8)}
        items.append(Item(f"experts.{e}", ((128, 64), (64, 64)), err))
    return items


@pytest.mark.parametrize("seed", range(3))
def test_allocate_respects_the_budget_to_the_bit_and_is_optimal(seed):
    spec = QuantSpec(4, 32)
    items = _items(5, seed)
    numel = sum(it.numel for it in items)
    for bits in (3.0, 3.3, 3.9, 4.6, 6.2, 9.0):  # g32 widths cost 3, 4, 5 and 9 effective bits
        widths, sol = allocate(items, spec, bits)
        stored = sum(bits_of(s, spec.with_bits(widths[it.name])) for it in items for s in it.shapes)
        assert stored == sol.cost <= math.floor(bits * numel)
        costs = [[it.cost(spec, b) for b in (2, 3, 4, 8)] for it in items]
        losses = [[it.losses[b] for b in (2, 3, 4, 8)] for it in items]
        assert sol.loss == pytest.approx(brute_force(costs, losses, budget_bits(bits, numel))[0])


def test_more_bits_go_to_the_expert_whose_error_falls_most():
    spec = QuantSpec(4, 32)
    shapes = ((128, 64), (64, 64))
    cheap = Item("rarely_used", shapes, {2: 1.0, 3: 0.9, 4: 0.85, 8: 0.8})
    costly = Item("hot", shapes, {2: 100.0, 3: 20.0, 4: 5.0, 8: 1.0})
    widths, _ = allocate([cheap, costly], spec, 3.5)
    assert widths["hot"] > widths["rarely_used"]


def test_smallest_width_error_names_the_numbers():
    spec = QuantSpec(4, 128)
    items = [Item("e0", ((256, 128),), {b: 1.0 for b in (2, 3, 4, 8)})]
    with pytest.raises(ValueError, match=r"bits: a budget of 2 bits per weight is below the smallest width: 2-bit "
                                         r"in groups of 128 \(asymmetric\) costs 2.2500 effective bits"):
        allocate(items, spec, 2.0)
    with pytest.raises(ValueError, match="below the smallest width"):
        uniform_width(items, spec, 1.5)
    assert uniform_width(items, spec, 4.25) == 4 and uniform_width(items, spec, 4.24) == 3
