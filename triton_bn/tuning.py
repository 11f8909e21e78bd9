"""Launch plans: which path (single pass or split), tile sizes and how the reduction is split.

The plan is a pure function of the geometry, the dtype and the device, so the same input gives the
same partial sums in the same order (bitwise determinism). A JSON cache written by ``triton-bn tune``
can override the heuristic per shape; tests and sweeps can force values with ``override(...)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from .layout import Geometry

__all__ = ["TilePlan", "plan_tiles", "override", "interpreting", "cache_path", "load_cache",
           "cache_key", "cached_entry", "use_entries", "CACHE_FIELDS"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TilePlan:
    """How one element kernel covers the activation (see kernels/common.py for the orientations).

    A, B: extents of the tile axes (channels fast: A = R, B = S; else A = R0, B = R1).
    The grid has n_channel_tiles * n_a_parts * n_b_parts programs; the stats/backward-reduce
    kernels write one partial per (a part, b part).
    """

    fused: bool
    BLOCK_A: int
    BLOCK_B: int
    A: int
    B: int
    a_chunk: int
    b_chunk: int
    n_channel_tiles: int
    n_a_parts: int
    n_b_parts: int
    num_warps: int

    @property
    def grid(self) -> tuple[int]:
        return (self.n_channel_tiles * self.n_a_parts * self.n_b_parts,)

    @property
    def n_parts(self) -> int:
        return self.n_a_parts * self.n_b_parts

    @property
    def b_count(self) -> int:
        """Reduction extent along b (1 in the channels-fast orientation)."""
        return 1 if self.n_b_parts == 1 and self.b_chunk == 1 else self.B


@dataclass(frozen=True)
class Knobs:
    tile: int  # elements per tile of the split kernels
    fused_forward_max: int  # largest tile (elements) of the single-pass forward
    fused_backward_max: int  # likewise backward (it holds x and dy)
    max_block_channels: int
    max_block_inner: int
    target_programs: int  # programs the split kernels aim for
    force_fused: bool | None = None  # None: heuristic
    parts: int | None = None  # force this many reduction parts (tests)


_OVERRIDES: dict = {}


@contextlib.contextmanager
def override(**kwargs) -> Iterator[None]:
    """Temporarily forces knobs, e.g. ``override(force_fused=False, parts=3)`` in tests."""
    old = dict(_OVERRIDES)
    _OVERRIDES.update(kwargs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def knobs(device: torch.device) -> Knobs:
    if device.type == "cuda" and not interpreting():
        base = Knobs(tile=4096, fused_forward_max=16384, fused_backward_max=8192,
                     max_block_channels=128, max_block_inner=1024,
                     target_programs=4 * _sm_count(device.index or 0))
    else:  # the interpreter runs programs one by one: few, large tiles
        base = Knobs(tile=4096, fused_forward_max=16384, fused_backward_max=16384,
                     max_block_channels=64, max_block_inner=256, target_programs=1)
    return replace(base, **_OVERRIDES) if _OVERRIDES else base


def cache_path() -> Path:
    """Where ``triton-bn tune`` writes its choices (env TRITON_BN_TUNE_CACHE overrides)."""
    env = os.environ.get("TRITON_BN_TUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "triton_bn" / "tune.json"


# The fields of a cache entry that plan_tiles reads (the rest of an entry is the tuning record:
# timings of every candidate, device, versions). fused=False forbids the single-pass path; tile,
# num_warps and target_programs set the split path's tile size, warps and program count.
CACHE_FIELDS = ("fused", "tile", "num_warps", "target_programs")

_FORCED_ENTRIES: dict = {}


class _JsonCache:
    """``load_cache(path)``: the JSON cache at ``path`` as {cache_key: entry}; {} when missing or
    unreadable. Read once per process and path: call ``load_cache.cache_clear()`` after rewriting
    the file (that also drops the memoized launch plans)."""

    def __init__(self) -> None:
        self._data: dict = {}
        self.generation = 0

    def __call__(self, path: str) -> dict:
        data = self._data.get(path)
        if data is None:
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                data = {}
            self._data[path] = data = data if isinstance(data, dict) else {}
        return data

    def cache_clear(self) -> None:
        self._data.clear()
        self.generation += 1


load_cache = _JsonCache()


def cache_key(kind: str, geo: Geometry, dtype: torch.dtype) -> str:
    return f"{kind}|R0={geo.R0}|R1={geo.R1}|G={geo.G}|K={geo.K}|cf={int(geo.channels_fast)}|{dtype}"


@contextlib.contextmanager
def use_entries(entries: dict) -> Iterator[None]:
    """Temporarily makes plan_tiles use these {cache_key: entry} before the file (the tuner's
    candidates); they win over ``override(...)`` too."""
    old = dict(_FORCED_ENTRIES)
    _FORCED_ENTRIES.update(entries)
    try:
        yield
    finally:
        _FORCED_ENTRIES.clear()
        _FORCED_ENTRIES.update(old)


def cached_entry(kind: str, geo: Geometry, dtype: torch.dtype) -> dict | None:
    """The tuned entry plan_tiles should honour for this geometry, or None (heuristic)."""
    key = cache_key(kind, geo, dtype)
    if _FORCED_ENTRIES:
        entry = _FORCED_ENTRIES.get(key)
        if entry is not None:
            return entry
    if _OVERRIDES:
        return None
    entry = load_cache(str(cache_path())).get(key)
    return entry if isinstance(entry, dict) else None


def _split(extent_tiles: int, wanted: int) -> int:
    return max(1, min(extent_tiles, wanted))


_PLANS: dict = {}


def plan_tiles(geo: Geometry, kind: str, device: torch.device, dtype: torch.dtype,
               allow_fused: bool = True) -> TilePlan:
    """kind: 'forward' or 'backward' (the reduction kernels) or 'apply' (element-wise kernels).

    Memoized per (geometry, kind, device, dtype) and the knobs / cache in force, since it runs
    several times per call."""
    forced = json.dumps(_FORCED_ENTRIES, sort_keys=True, default=str) if _FORCED_ENTRIES else None
    key = (geo, kind, device, dtype, allow_fused, tuple(sorted(_OVERRIDES.items())) or None,
           forced, os.environ.get("TRITON_BN_TUNE_CACHE"), load_cache.generation)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = _plan_tiles(geo, kind, device, dtype, allow_fused)
    return plan


def _plan_tiles(geo: Geometry, kind: str, device: torch.device, dtype: torch.dtype,
                allow_fused: bool) -> TilePlan:
    kn = knobs(device)
    cached = cached_entry(kind, geo, dtype)
    fused_max = kn.fused_forward_max if kind == "forward" else kn.fused_backward_max
    if dtype == torch.float64:
        fused_max //= 2  # fp64 tiles take twice the registers (16384 spills on sm_90)
    if geo.channels_fast:
        A, B = max(1, geo.R), geo.S
        fused_block_b = min(next_pow2(B), kn.max_block_channels, max(1, fused_max // next_pow2(A)))
        fits = next_pow2(A) * fused_block_b <= fused_max and fused_block_b >= min(next_pow2(B), 16)
    else:
        A, B = max(1, geo.R0), max(1, geo.R1)
        fits = next_pow2(A) * next_pow2(B) <= fused_max
        fused_block_b = next_pow2(B)
    fused = allow_fused and kind != "apply" and geo.G == 1 and fits and kn.force_fused is not False
    if cached is not None and kind != "apply":
        fused = fused and bool(cached.get("fused", True))
    if fused:
        block_a = next_pow2(A)
        tile = block_a * fused_block_b
        warps = 8 if tile >= 8192 else 4
        n_tiles = cdiv(B, fused_block_b) if geo.channels_fast else geo.S
        return TilePlan(True, block_a, fused_block_b, A, B, A, B, n_tiles, 1, 1, warps)

    tile = int(cached.get("tile", kn.tile)) if cached else kn.tile
    if geo.channels_fast:
        block_b = min(next_pow2(B), kn.max_block_channels)
        block_a = max(1, min(next_pow2(A), tile // block_b))
        n_channel_tiles = cdiv(B, block_b)
        b_tiles = 1
    else:
        block_b = min(next_pow2(B), kn.max_block_inner)
        block_a = max(1, min(next_pow2(A), tile // block_b))
        n_channel_tiles = geo.S
        b_tiles = cdiv(B, block_b)
    a_tiles = cdiv(A, block_a)
    if kind == "apply":  # element-wise: a few tiles per program
        n_a = _split(a_tiles, cdiv(a_tiles, 4))
        n_b = b_tiles
    elif kn.parts is not None:
        n_a = _split(a_tiles, kn.parts)
        n_b = _split(b_tiles, cdiv(kn.parts, n_a))
    else:
        target = int(cached.get("target_programs", kn.target_programs)) if cached else \
            kn.target_programs
        want = max(1, cdiv(target, n_channel_tiles))
        n_a = _split(a_tiles, want)
        n_b = _split(b_tiles, cdiv(want, n_a))
    a_chunk = cdiv(a_tiles, n_a) * block_a
    n_a = cdiv(A, a_chunk)
    if geo.channels_fast:
        b_chunk, n_b = 1, 1
    else:
        b_chunk = cdiv(b_tiles, n_b) * block_b
        n_b = cdiv(B, b_chunk)
    warps = int(cached.get("num_warps", 4)) if cached else 4
    return TilePlan(False, block_a, block_b, A, B, a_chunk, b_chunk, n_channel_tiles, n_a, n_b,
                    warps)
