"""Launch plans: which path (single pass or split), tile sizes and how the reduction is split.

The plan is a pure function of the geometry, the dtype and the device, so the same input gives the
same partial sums in the same order (bitwise determinism). A JSON cache written by ``triton-bn tune``
can override the heuristic per shape and GPU; tests and sweeps can force values with ``override(...)``.
What is forced is one frozen ``Policy``, part of the key the plans are memoized under.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import torch

from .layout import Geometry

__all__ = ["TilePlan", "Policy", "plan_tiles", "orient", "override", "use_entries", "use_policy",
           "current_policy", "interpreting", "cache_path", "load_cache", "cache_key", "cached_entry",
           "device_name", "validate_entry", "CACHE_FIELDS", "NUM_WARPS"]


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
    def b_extent(self) -> int:
        """Reduction extent along b (1 in the channels-fast orientation)."""
        return 1 if self.n_b_parts == 1 and self.b_chunk == 1 else self.B

    def sizes(self, geo) -> tuple:
        """The split kernels' ``sizes`` argument (kernels/common.SIZE_FIELDS) for this plan of
        ``geo`` (a layout.Geometry)."""
        return (geo.R1, geo.K, geo.S, self.A, self.B, self.a_chunk, self.b_chunk,
                self.n_channel_tiles, self.n_b_parts)


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
    num_warps: int | None = None  # warps of the split kernels (None: 4)
    # every layout in the channels-fast orientation: one program per tile of channels instead of
    # one per channel for NCHW (the CPU-interpreter model smoke, whose time is per program)
    channels_fast: bool = False
    # elements of a channels-fast tile of under 16 channels (0: no cap; the interpreter's)
    narrow_tile: int = 0
    # parts per load of the reductions' finalize (BLOCK_P, a power of two; None: ops.finalize_parts),
    # so that tests reach the two-level finalize (more than 4 * BLOCK_P parts) with few parts
    finalize_parts: int | None = None


KNOB_NAMES = tuple(f.name for f in fields(Knobs))
NUM_WARPS = (1, 2, 4, 8, 16, 32)  # what the GPU compiler accepts (a power of two, <= 32 warps)
TILE_MIN, TILE_MAX = 16, 65536

# The fields of a cache entry that plan_tiles reads (the rest of an entry is the tuning record:
# timings of every candidate, device, versions). fused=False forbids the single-pass path; tile,
# num_warps and target_programs set the split path's tile size, warps and program count.
CACHE_FIELDS = ("fused", "tile", "num_warps", "target_programs")


_OPTIONAL_KNOBS = ("force_fused", "parts", "num_warps", "finalize_parts")  # None: the heuristic decides


def _check_value(name: str, value, where: str, *, knob: bool = False):
    """``value`` of cache field (or, with knob=True, knob) ``name``, or a ValueError saying where
    and what is expected."""
    if knob and name in _OPTIONAL_KNOBS and value is None:
        return value
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if name in ("fused", "force_fused", "channels_fast"):
        ok, want = isinstance(value, bool), "true or false"
    elif name == "num_warps":
        ok, want = is_int and value in NUM_WARPS, "one of 1, 2, 4, 8, 16, 32"
    elif name == "tile":
        ok = is_int and TILE_MIN <= value <= TILE_MAX and value & (value - 1) == 0
        want = f"a power of two from {TILE_MIN} to {TILE_MAX}"
    elif name == "finalize_parts":
        ok, want = is_int and 2 <= value <= 128 and value & (value - 1) == 0, \
            "a power of two from 2 to 128"
    else:  # target_programs, parts and the other size knobs
        ok, want = is_int and value >= 1, "a positive integer"
    if not ok:
        if knob and name in _OPTIONAL_KNOBS:
            want += " (or None)"
        raise ValueError(f"{where}: {name} must be {want}, got {value!r}")
    return value


def validate_entry(entry, where: str) -> tuple:
    """The plan fields (CACHE_FIELDS) of a tune-cache entry as (name, value) pairs; a
    ValueError naming ``where`` (the file and the key) when the entry or one of them is invalid."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an entry must be a JSON object, got {type(entry).__name__}")
    return tuple((name, _check_value(name, entry[name], where))
                 for name in CACHE_FIELDS if name in entry)


@dataclass(frozen=True)
class Policy:
    """Everything plan_tiles reads besides the geometry, kind, device and dtype: the knobs forced
    by ``override(...)`` and the entries forced by ``use_entries(...)``, as sorted (name, value)
    pairs. Frozen and hashable: it is part of the key the plans are memoized under, so a sweep
    over tiles or warps gets a plan (and kernel specialization) per value."""

    overrides: tuple = ()  # ((knob name, value), ...)
    entries: tuple = ()  # ((cache key, ((field, value), ...)), ...)

    def knob_overrides(self) -> dict:
        return dict(self.overrides)

    def entry(self, key: str) -> dict | None:
        for k, fields_ in self.entries:
            if k == key:
                return dict(fields_)
        return None


_policy = Policy()


def current_policy() -> Policy:
    """The policy in force (set by ``override`` and ``use_entries``)."""
    return _policy


@contextlib.contextmanager
def use_policy(policy: Policy) -> Iterator[None]:
    """Makes ``policy`` the one in force for the duration (process-wide, so autograd's backward
    threads see it too)."""
    global _policy
    if not isinstance(policy, Policy):
        raise TypeError(f"use_policy: policy must be a tuning.Policy, got {type(policy).__name__}")
    old, _policy = _policy, policy
    try:
        yield
    finally:
        _policy = old


@contextlib.contextmanager
def override(**kwargs) -> Iterator[None]:
    """Temporarily forces knobs, e.g. ``override(force_fused=False, parts=3)`` in tests or
    ``override(force_fused=False, tile=8192, num_warps=8)`` in a sweep. While any knob is forced
    the tune cache file is not read."""
    for name, value in kwargs.items():
        if name not in KNOB_NAMES:
            raise TypeError(f"override: unknown knob {name!r}; expected one of {', '.join(KNOB_NAMES)}")
        _check_value(name, value, f"override({name}=...)", knob=True)
    merged = {**_policy.knob_overrides(), **kwargs}
    with use_policy(replace(_policy, overrides=tuple(sorted(merged.items())))):
        yield


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def knobs(device: torch.device, policy: Policy | None = None) -> Knobs:
    if device.type == "cuda" and not interpreting():
        base = Knobs(tile=4096, fused_forward_max=16384, fused_backward_max=8192,
                     max_block_channels=128, max_block_inner=1024,
                     target_programs=4 * _sm_count(device.index or 0), narrow_tile=2048)
    else:  # the interpreter runs programs one by one: few, large tiles
        base = Knobs(tile=4096, fused_forward_max=16384, fused_backward_max=16384,
                     max_block_channels=64, max_block_inner=256, target_programs=1)
    policy = _policy if policy is None else policy
    return replace(base, **policy.knob_overrides()) if policy.overrides else base


@functools.lru_cache(maxsize=None)
def _cuda_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def device_name(device: torch.device) -> str:
    """The name tune-cache entries are keyed by: the GPU's name (torch.cuda.get_device_name), or
    "cpu-interpreter" when the kernels run in Triton's CPU interpreter."""
    if device.type == "cuda" and not interpreting():
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return "cpu-interpreter"


def cache_path() -> Path:
    """Where ``triton-bn tune`` writes its choices (env TRITON_BN_TUNE_CACHE overrides)."""
    env = os.environ.get("TRITON_BN_TUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "triton_bn" / "tune.json"


KINDS = ("forward", "backward", "apply")


def is_legacy_key(key: str) -> bool:
    """A key without a device name (written before entries were keyed by GPU)."""
    return key.split("|", 1)[0] in KINDS


class _JsonCache:
    """``load_cache(path)``: the JSON cache at ``path`` as {cache_key: plan fields} ({} when the
    file does not exist), every entry validated: a ValueError names the file and the key of an
    invalid entry, of a key without a device name (a cache written by an older triton_bn: rerun
    ``triton-bn tune`` or delete it), or says the file is not a JSON object. Read once per process
    and path: call ``load_cache.cache_clear()`` after rewriting the file (that also drops the
    memoized launch plans)."""

    def __init__(self) -> None:
        self._data: dict = {}
        self.generation = 0

    def __call__(self, path: str) -> dict:
        data = self._data.get(path)
        if data is None:
            data = self._data[path] = self._read(path)
        return data

    @staticmethod
    def _read(path: str) -> dict:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ValueError(f"tune cache {path}: cannot be read ({e})") from None
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ValueError(f"tune cache {path}: not valid JSON ({e}); rerun `triton-bn tune` "
                             "or delete the file") from None
        if not isinstance(raw, dict):
            raise ValueError(f"tune cache {path}: expected a JSON object {{key: entry}}, got "
                             f"{type(raw).__name__}")
        out = {}
        for key, entry in raw.items():
            if is_legacy_key(key):
                raise ValueError(f"tune cache {path}, key {key!r}: the key names no GPU (written by "
                                 "an older triton_bn, whose entries could be applied on another "
                                 "card); rerun `triton-bn tune` or delete the file")
            out[key] = dict(validate_entry(entry, f"tune cache {path}, key {key!r}"))
        return out

    def cache_clear(self) -> None:
        self._data.clear()
        self.generation += 1


load_cache = _JsonCache()


def cache_key(kind: str, geo: Geometry, dtype: torch.dtype, device: torch.device) -> str:
    """The key of a tune-cache entry: the device's name (``device_name``), the kernel kind, the
    geometry and the dtype."""
    return (f"{device_name(device)}|{kind}|R0={geo.R0}|R1={geo.R1}|G={geo.G}|K={geo.K}"
            f"|cf={int(geo.channels_fast)}|{dtype}")


@contextlib.contextmanager
def use_entries(entries: dict) -> Iterator[None]:
    """Temporarily makes plan_tiles use these {cache_key: entry} before the file (the tuner's
    candidates); they win over ``override(...)`` too. Entries are validated like the file's."""
    new = {k: validate_entry(e, f"use_entries, key {k!r}") for k, e in entries.items()}
    merged = {**dict(_policy.entries), **new}
    with use_policy(replace(_policy, entries=tuple(sorted(merged.items())))):
        yield


def cached_entry(kind: str, geo: Geometry, dtype: torch.dtype, device: torch.device,
                 policy: Policy | None = None) -> dict | None:
    """The tuned plan fields plan_tiles honours for this geometry on this device, or None
    (heuristic): a forced entry, else (when no knob is overridden) the cache file's."""
    policy = _policy if policy is None else policy
    key = cache_key(kind, geo, dtype, device)
    entry = policy.entry(key)
    if entry is not None or policy.overrides:
        return entry
    return load_cache(str(cache_path())).get(key)


def orient(geo: Geometry, device: torch.device) -> Geometry:
    """``geo``, in the channels-fast orientation when the ``channels_fast`` knob is forced (see
    Knobs; never by default, so GPU plans and the orientations the tests cover are the layout's)."""
    if not _policy.overrides or geo.channels_fast or geo.K == 1 \
            or not knobs(device).channels_fast:
        return geo
    return replace(geo, channels_fast=True)


def _split(extent_tiles: int, wanted: int) -> int:
    return max(1, min(extent_tiles, wanted))


_PLANS: dict = {}


def plan_epoch() -> tuple:
    """What plan_tiles and orient read besides their arguments: the policy in force and, when it
    overrides no knob, the tune cache file. Plans kept under an epoch stay valid while it holds."""
    if _policy.overrides:
        return (_policy,)
    return (_policy, os.environ.get("TRITON_BN_TUNE_CACHE"), load_cache.generation)


def plan_tiles(geo: Geometry, kind: str, device: torch.device, dtype: torch.dtype,
               allow_fused: bool = True, policy: Policy | None = None) -> TilePlan:
    """kind: 'forward' or 'backward' (the reduction kernels) or 'apply' (element-wise kernels).

    A pure function of its arguments, the policy (default: the one in force) and, when the policy
    overrides no knob, the tune cache file; memoized on all of them, since it runs several times
    per call."""
    policy = _policy if policy is None else policy
    source = None if policy.overrides else (str(cache_path()), load_cache.generation)
    key = (geo, kind, device, dtype, allow_fused, policy, source)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = _plan_tiles(geo, kind, device, dtype, allow_fused, policy)
    return plan


def _plan_tiles(geo: Geometry, kind: str, device: torch.device, dtype: torch.dtype,
                allow_fused: bool, policy: Policy) -> TilePlan:
    kn = knobs(device, policy)
    cached = cached_entry(kind, geo, dtype, device, policy)
    if cached:  # a tuned entry's fields are knobs for this one geometry
        tuned = {k: cached[k] for k in ("tile", "num_warps", "target_programs") if k in cached}
        if kind != "apply" and cached.get("fused") is False:
            tuned["force_fused"] = False
        kn = replace(kn, **tuned)
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
    if fused:
        block_a = next_pow2(A)
        tile = block_a * fused_block_b
        warps = 8 if tile >= 8192 else 4
        n_tiles = cdiv(B, fused_block_b) if geo.channels_fast else geo.S
        return TilePlan(True, block_a, fused_block_b, A, B, A, B, n_tiles, 1, 1, warps)

    tile = kn.tile
    wide_backward = False
    if geo.channels_fast:
        block_b = min(next_pow2(B), kn.max_block_channels)
        # backward tiles of 128 channels: 64 x 128 on 8 warps, 32 elements per thread like
        # 64 x 64 on 4 (32 x 128 on 4 warps spilled 16 B on sm_90; on 8 its loops were longer
        # per element), unless the warps are tuned or forced (the tuner and the sweeps set both).
        # bf16 tiles of 64 channels likewise, as 128 x 64 on 8 warps: at 64 x 64 on 4 the
        # training sums' third accumulator spilled 16 B (ptxas stopped at 168 registers; issue
        # #10). Not fp16 / fp32: at 128 x 64 on 8 warps ptxas stopped some of theirs at 128
        # registers and spilled 4-8 B (fp16 residual + ReLU apply, fp32 int64 residual + ReLU).
        wide_backward = (kind == "backward" and kn.num_warps is None and dtype != torch.float64
                         and (block_b >= 128 or block_b == 64 and dtype == torch.bfloat16))
        block_a = max(1, min(next_pow2(A), (2 if wide_backward else 1) * tile // block_b))
        if block_b < 16 and kn.narrow_tile and kn.num_warps is None and "tile" not in (cached or {}):
            # rows of under 16 channels hold a pointer per element, not per 16-byte vector: at
            # 1024 x 4 (3 channels) the backward kernels spilled 16-1460 B on sm_90 (triton 3.9
            # and 3.6); at 512 x 4 none does (issue #10). Not a tuned tile, nor the sweeps'
            # (they force the warps)
            block_a = min(block_a, max(1, kn.narrow_tile // block_b))
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
        want = max(1, cdiv(kn.target_programs, n_channel_tiles))
        n_a = _split(a_tiles, want)
        n_b = _split(b_tiles, cdiv(want, n_a))
    a_chunk = cdiv(a_tiles, n_a) * block_a
    n_a = cdiv(A, a_chunk)
    if geo.channels_fast:
        b_chunk, n_b = 1, 1
    else:
        b_chunk = cdiv(b_tiles, n_b) * block_b
        n_b = cdiv(B, b_chunk)
    # The backward reduction holds x, dy (and the residual) of a tile beside two per-lane
    # accumulators. Reduction fast (NCHW), its tiles of 4096 and more get 8 warps (16 elements
    # per thread; at 32 the fp32 loops were longer per element). Channels fast, 32 elements per
    # thread (4 warps; 8 for the wide tiles above): the loops carry pointers and read whole
    # tiles unmasked, and a tile's fixed cost (addresses, loop) is spread over twice the
    # elements of 16 per thread, with no spill on sm_90 (perf/README.md, issue #10). float64
    # keeps 16 per thread (at 32 its synchronized reduction spilled 68 B on sm_90, triton 3.9).
    if kn.num_warps:
        warps = kn.num_warps
    elif wide_backward:
        warps = 8
    else:
        warps = 8 if (kind == "backward" and block_a * block_b >= 4096
                      and (not geo.channels_fast or dtype == torch.float64)) else 4
    return TilePlan(False, block_a, block_b, A, B, a_chunk, b_chunk, n_channel_tiles, n_a, n_b,
                    warps)
