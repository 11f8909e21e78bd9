"""``python -m triton_bn`` = the ``triton-bn`` console script."""

from .cli import main

raise SystemExit(main())
