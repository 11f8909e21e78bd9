"""``python -m perf.compile_check``: see the package docstring."""

import sys

from . import main

sys.exit(main())
