"""A tqdm progress bar when tqdm is installed (the dev extra), else a silent stand-in."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


class _NoBar:
    def __init__(self, total: int = 0, desc: str = "") -> None:
        self.total = total

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, bar) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_description(self, desc: str) -> None:
        self._bar.set_description(desc, refresh=False)

    def write(self, text: str) -> None:
        self._bar.write(text, file=sys.stdout)

    def close(self) -> None:
        self._bar.close()


def progress_bar(total: int, enabled: bool = True, desc: str = ""):
    """An object with update / set_description / write / close; the bar goes to stderr."""
    if not enabled:
        return _NoBar(total, desc)
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(total, desc)
    return _TqdmBar(tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                         leave=False))
