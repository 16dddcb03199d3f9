"""``python -m jdiff.bench``: the engine benchmark of :mod:`jdiff.bench` (see its docstring)."""

import sys

from jdiff.bench import main

sys.exit(main())
