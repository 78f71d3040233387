"""``python -m moekit``: the command line (``moekit.cli``)."""

import sys

from moekit.cli import main

sys.exit(main())
