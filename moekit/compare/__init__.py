"""``moekit compare``: an MoE model against its dense twins under one budget, and the side-by-side report.

    runner.py  trains and measures every model in its own process; results.json
    report.py  report.md (the table, who wins what, plots inlined) and the PNG plots

Imports: everything below it (``moekit.train`` and what it builds on); never the CLI.
"""

from moekit.compare.runner import compare

__all__ = ["compare"]
