"""matplotlib for the reports that draw (``moekit compare``, ``moekit compress --sweep``): imported where used, with
the extra to install named when it is missing.

Imports: matplotlib only (optional).
"""

from __future__ import annotations


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'moekit[plot]' (or pass --no-plots)") from e
    return plt
