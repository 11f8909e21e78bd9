"""Keras 3 tests. Keras reads KERAS_BACKEND once, at import, for the whole process, so these run
only in a process started with KERAS_BACKEND=torch: ``tests/test_keras3.py`` starts one (and
skips when keras is not installed); a run of the whole suite otherwise leaves this folder out."""

import os

if os.environ.get("KERAS_BACKEND") != "torch":
    collect_ignore_glob = ["*.py"]
