#!/usr/bin/env python
"""``python perf/compile_check.py [options]``: the compile check of the package ``perf/compile_check/``
(its docstring says what it does; ``--help`` lists the options). The same as
``python -m perf.compile_check`` from the repository root. A package directory takes precedence over
this module of the same name when ``perf.compile_check`` is imported."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.compile_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
