"""Expert shift: how far a modified model's routing moved from a reference's (``moekit shift REF OTHER``).

    metrics.py  per-layer shift from two routings of the same tokens (changed top-k shares, top-1 agreement, KL,
                per-expert load), as exact counts that add over batches
    measure.py  recording a model's routing on real text (forward pre-hooks), comparing two models, the report
                (JSON, markdown table, per-layer plot) and ``shift()``, the function behind the verb

Imports: ``moekit.layer``, ``moekit.formats``, ``moekit.train`` (the stages below it) and ``moekit.plotting``;
``moekit.compress`` (its report's shift, router calibration, pruning) imports this.
"""

from moekit.shift.measure import RoutingRecorder, ShiftReport, compare_routings, record, shift
from moekit.shift.metrics import LayerShift, ShiftCounts, layer_shift, shift_counts

__all__ = ["LayerShift", "RoutingRecorder", "ShiftCounts", "ShiftReport", "compare_routings", "layer_shift", "record",
           "shift", "shift_counts"]
