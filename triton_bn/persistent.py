"""The persistent training forward and backward (kernels/persistent.py): plan, capacity check
and launch.

OPT-IN, DEFAULT OFF: it runs only with the environment variable TRITON_BN_PERSISTENT=1, and it
has NOT been run on a GPU yet (only its two-launch form has run, in Triton's CPU interpreter).

When it is taken (``forward`` / ``backward`` return True; ops falls back to the split path when
they return False, and the plan's ``reason`` says why):
  * training, no sync BN, no ghost batches, no renorm (forward; the backward takes renorm), a
    non-empty input that the single-pass kernels (one program per channel slice) do not already
    cover;
  * on a GPU: Triton offers ``launch_cooperative_grid`` (>= 3.2), which makes the driver run
    every program at once or refuse the launch, never a partial grid that would spin forever;
    and the grid fits the co-resident capacity computed from the compiled kernel's registers,
    shared memory and warps, less a margin (``MARGIN``) for SMs that other streams keep busy.
    A launch the driver still refuses falls back to the split path and is not tried again;
  * in the interpreter (tests): the kernel runs as two launches split at the barrier (PHASE 1,
    PHASE 2); ``limits(max_programs=...)`` stands in for the GPU's capacity.
``explain(x)`` says in one line which path a tensor takes and why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from . import tuning
from .kernels.backward import grad_parts_shape
from .kernels.persistent import bn_persistent_backward_kernel, bn_persistent_forward_kernel
from .launch import FP_FUSION

ENV = "TRITON_BN_PERSISTENT"
MARGIN = 0.875  # fraction of the computed co-resident capacity a grid may use
BLOCK_P = 32  # parts merged as one tree (as ops._FINALIZE_PARTS)

# Values one program holds in registers (fp32; fp64 half) and, in the interpreter, the stand-in
# for the GPU's capacity. Chosen from the sm_90 compile (perf/compile_check, 8 warps): channels
# fast 16384 values take 177-255 registers, no spill (1 program per SM: 16k values); reduction
# fast 8192 take ~80 (3 per SM: 24k values, against 1 x 16k at 149 registers). Channel tiles
# narrower than 16 spill at 16384 ([4096, 4] fp16: 100 B), so they get half.
_LIMITS = {"tile_channels_fast": 16384, "tile_reduction_fast": 8192, "max_block_channels": 64,
           "max_programs": 2 * 132}


def requested() -> bool:
    """Whether the user asked for the persistent path (TRITON_BN_PERSISTENT=1)."""
    return os.environ.get(ENV, "0") not in ("", "0")


@contextlib.contextmanager
def limits(**kwargs) -> Iterator[None]:
    """Temporarily sets ``tile_channels_fast`` / ``tile_reduction_fast`` (values per program, a
    power of two), ``max_block_channels`` and ``max_programs`` (the interpreter's stand-in for the
    GPU's co-resident capacity)."""
    for k, v in kwargs.items():
        if k not in _LIMITS:
            raise TypeError(f"limits: unknown limit {k!r}; expected one of {', '.join(_LIMITS)}")
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"limits({k}=...): expected a positive integer, got {v!r}")
    old = dict(_LIMITS)
    _LIMITS.update(kwargs)
    _plan.cache_clear()
    try:
        yield
    finally:
        _LIMITS.clear()
        _LIMITS.update(old)
        _plan.cache_clear()


@dataclass(frozen=True)
class Plan:
    """A persistent launch: ``tiles`` (a_chunk == BLOCK_A, and b_chunk == BLOCK_B reduction fast:
    one tile per program), or None with ``reason`` saying why the split path runs instead."""

    tiles: Optional[tuning.TilePlan]
    reason: str

    @property
    def programs(self) -> int:
        return self.tiles.grid[0] if self.tiles else 0


@functools.lru_cache(maxsize=None)
def cooperative_supported() -> bool:
    """Whether this Triton compiles the ``launch_cooperative_grid`` kernel option (CUDA)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def plan(geo, dtype: torch.dtype, renorm: int, kind: str = "forward") -> Plan:
    """The tiles of a persistent ``kind`` ("forward" or "backward": it holds x and dy, so half
    the values per program) of this geometry, before the capacity check."""
    return _plan(geo, dtype, renorm, kind, tuple(sorted(_LIMITS.items())))


@functools.lru_cache(maxsize=1024)
def _plan(geo, dtype, renorm, kind, _limits) -> Plan:
    if geo.G != 1:
        return Plan(None, "ghost batches: the split path merges each group's statistics")
    if renorm and kind == "forward":
        return Plan(None, "renorm: every program would read the statistics part 0 updates")
    if geo.R == 0 or geo.S == 0:
        return Plan(None, "empty input")
    # fp64 takes twice the registers; backward holds two tiles (x and dy)
    half = (2 if dtype == torch.float64 else 1) * (2 if kind == "backward" else 1)
    nxt = tuning.next_pow2
    if geo.channels_fast:  # a program: BLOCK_B channels x BLOCK_A rows
        A, B = geo.R, geo.S
        tile = _LIMITS["tile_channels_fast"] // half
        block_b = min(nxt(B), _LIMITS["max_block_channels"], tile)
        if block_b < 16:
            tile = max(block_b, tile // 2)
        block_a = max(1, min(nxt(A), tile // block_b))
        n_ct, n_b, b_chunk = tuning.cdiv(B, block_b), 1, 1
    else:  # a program: one channel, BLOCK_A x BLOCK_B of (batch, spatial)
        A, B = geo.R0, geo.R1
        tile = _LIMITS["tile_reduction_fast"] // half
        block_b = min(nxt(B), tile)
        block_a = max(1, min(nxt(A), tile // block_b))
        n_ct, n_b, b_chunk = geo.S, tuning.cdiv(B, block_b), block_b
    n_a = tuning.cdiv(A, block_a)
    warps = 8 if block_a * block_b >= 8192 // (2 if kind == "backward" else 1) else 4
    tiles = tuning.TilePlan(False, block_a, block_b, A, B, block_a, b_chunk, n_ct, n_a, n_b, warps)
    return Plan(tiles, f"persistent {kind}: {tiles.grid[0]} programs of {block_a}x{block_b}")


def explain(x: torch.Tensor, kind: str = "forward", axes: tuple = (1,), groups: int = 1,
            renorm: int = 0) -> str:
    """Which path a training ``kind`` ("forward" or "backward") of ``x`` takes and why, in one
    line (the capacity part is known on a GPU only after a first call has compiled the kernel)."""
    from .layout import plan_geometry

    if kind not in ("forward", "backward"):
        raise ValueError(f"explain: kind must be 'forward' or 'backward', got {kind!r}")
    if not requested():
        return f"split or single pass: the persistent path is off (set {ENV}=1)"
    geo = plan_geometry(x.shape, [x.stride()], tuple(axes), groups)
    if geo is None:
        return "split: this layout is copied first (not planned here)"
    if tuning.plan_tiles(geo, kind, x.device, x.dtype).fused:
        return "single pass: one program holds each channel slice"
    p = plan(geo, x.dtype, renorm, kind)
    if p.tiles is None:
        return f"split: {p.reason}"
    if tuning.interpreting():
        cap, where = _LIMITS["max_programs"], "the interpreter's max_programs"
    else:
        # capacities of kernels already compiled for these tiles (any flags, strides)
        known = [c for k, c in _CAPACITY.items() if k[0] == kind and k[-1] == p]
        if not cooperative_supported():
            return "split: this Triton has no launch_cooperative_grid"
        if not known:
            return f"{p.reason}, if they fit (capacity computed at the first call)"
        cap, where = min(known), "the co-resident capacity"
    if p.programs > cap:
        return f"split: {p.programs} programs > {cap} ({where})"
    return f"{p.reason} (<= {cap}, {where})"


_WORKSPACE: dict = {}


def barrier_counter(device: torch.device) -> torch.Tensor:
    """The int32 barrier counter of the current stream on ``device`` (zeroed once; the kernel
    leaves its low bits as it found them). One per stream, so kernels running at once on two
    streams never share one. Made during a CUDA-graph capture, it belongs to that graph (its
    zeroing is replayed with it) and is not cached."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    t = _WORKSPACE.get(key)
    if t is None:
        t = torch.zeros(1, device=device, dtype=torch.int32)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _WORKSPACE[key] = t
    return t


# Co-residency of compiled kernels: {(kernel cache key...): capacity in programs}; and the plans
# whose cooperative launch the driver refused (never tried again in this process).
_CAPACITY: dict = {}
_REFUSED: set = set()


def occupancy(n_regs: int, shared: int, num_warps: int, props) -> int:
    """Programs of a kernel one SM holds at once: limited by registers (allocated per warp in
    units of 256), threads, shared memory (1 KiB reserved per block) and 32 blocks."""
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    per_warp = -(-max(1, n_regs) * 32 // 256) * 256
    blocks = min(32, regs_sm // (per_warp * num_warps), threads_sm // (32 * num_warps))
    if shared:
        blocks = min(blocks, smem_sm // (shared + 1024))
    return blocks


def capacity(compiled, device: torch.device) -> int:
    """Programs a cooperative launch of ``compiled`` may use on ``device`` (with the margin)."""
    compiled._init_handles()  # fills n_regs / n_spills
    props = torch.cuda.get_device_properties(device)
    per_sm = occupancy(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, props)
    return int(per_sm * props.multi_processor_count * MARGIN)


def forward(fw, state, relu: bool) -> bool:
    """Runs the persistent forward of ``fw`` (ops._Forward) when requested and possible; False
    leaves the work to the split path. ``state`` is ops._state_args(...)."""
    if not requested() or fw.x.numel() == 0:
        return False
    tensors, hyper, flags, _, _ = state
    geo = fw.geo
    p = plan(geo, fw.x.dtype, flags["RENORM"])
    if p.tiles is None:
        return False
    t = p.tiles

    def args():
        part_sum = torch.empty((t.n_parts, geo.S), device=fw.x.device, dtype=fw.acc)
        part_m2 = torch.empty_like(part_sum)
        xs, ys, zs, st_x, st_y, st_z = fw.views()
        return (xs, ys, zs, part_sum, part_m2, barrier_counter(fw.x.device), fw.offset, fw.rstd,
                *tensors, t.sizes(geo), t.b_extent, hyper, fw.cut,
                st_x, st_y, st_z)

    kw = dict(CHANNELS_FAST=geo.channels_fast, INT64=fw.int64, RELU=relu, BLOCK_A=t.BLOCK_A,
              BLOCK_B=t.BLOCK_B, BLOCK_P=BLOCK_P, num_warps=t.num_warps, **FP_FUSION, **flags)
    key = ("forward", geo, fw.x.dtype, fw.x.device, fw.int64, relu, fw.has_residual,
           tuple(flags.items()), tuple(a is None for a in tensors), fw.cut is None, p)
    ran = _run(bn_persistent_forward_kernel, key, t.grid, args, kw)
    if ran and flags["COUNT_BATCH"]:
        # the kernel read the count as the one before this batch (COUNT_BATCH); unlike the
        # split and single-pass kernels it does not increment it itself (one more device op)
        tensors[8].add_(1)  # num_batches_tracked
    return ran


def backward(bw, saved, dweight, dbias, training: bool, relu: bool) -> bool:
    """Runs the persistent training backward of ``bw`` (ops._Backward; ``saved``: ops._Saved)
    when requested and possible (not for sync BN: the caller asks only without it); False leaves
    it to the split path."""
    x = bw.prep.tensors[0]
    if not requested() or not training or x.numel() == 0:
        return False
    geo = bw.geo
    p = plan(geo, x.dtype, 0, "backward")
    if p.tiles is None:
        return False
    t = p.tiles
    (xs, dys, ys, dxs, dzs), strides = bw.views()

    def args():
        parts = torch.empty(grad_parts_shape(t.n_parts, geo.S), device=x.device,
                            dtype=saved.rstd.dtype)
        return (xs, dys, ys, dxs, dzs, parts, barrier_counter(x.device),
                *saved.args(), dweight, dbias, t.sizes(geo), geo.R, *strides)

    kw = dict(CHANNELS_FAST=geo.channels_fast, INT64=bw.int64, RELU=relu, BLOCK_A=t.BLOCK_A,
              BLOCK_B=t.BLOCK_B, BLOCK_P=BLOCK_P, num_warps=t.num_warps, **FP_FUSION)
    key = ("backward", geo, x.dtype, x.device, bw.int64, relu, bw.has_residual,
           tuple(None if a is None else a.dtype
                 for a in (ys, dxs, dzs, *saved.args(), dweight, dbias)), p)
    return _run(bn_persistent_backward_kernel, key, t.grid, args, kw)


def _run(kernel, key, grid, make_args, kw) -> bool:
    """Launches ``kernel`` with ``make_args()`` (which allocates the partial slots) if its grid
    fits (see the module docstring); False: it did not run."""
    if tuning.interpreting():
        if grid[0] > _LIMITS["max_programs"]:
            return False
        _launch(kernel, grid, make_args(), kw, (1, 2))
        return True
    # on a GPU (or CPU tensors outside the interpreter: perf/compile_check records GPU code)
    if not cooperative_supported() or key in _REFUSED:
        return False
    cap = _CAPACITY.get(key)
    if cap is not None and grid[0] > cap:
        return False  # known not to fit: nothing allocated
    args = make_args()
    if cap is None:
        compiled = kernel.warmup(*args, grid=grid, PHASE=0, launch_cooperative_grid=True, **kw)
        cap = _CAPACITY[key] = capacity(compiled, args[0].device)
    if grid[0] > cap:
        return False
    try:
        _launch(kernel, grid, args, kw, (0,))
    except RuntimeError as e:  # e.g. the driver refuses a cooperative grid larger than it holds
        _REFUSED.add(key)
        warnings.warn(f"triton_bn: persistent kernel not launched ({e}); using the split path",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


_COUNTS = {"forward": 0, "backward": 0}


def launch_counts() -> dict:
    """How many persistent forwards and backwards this process has launched (``triton-bn bench``
    reports the path a case took from the difference)."""
    return dict(_COUNTS)


def _launch(kernel, grid, args, kw, phases) -> None:
    """One cooperative launch (PHASE 0), or the interpreter's two launches (PHASE 1, 2)."""
    _COUNTS["forward" if kernel is bn_persistent_forward_kernel else "backward"] += 1
    for phase in phases:
        extra = {"launch_cooperative_grid": True} if phase == 0 else {}
        kernel[grid](*args, PHASE=phase, **extra, **kw)
