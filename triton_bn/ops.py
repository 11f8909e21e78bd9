"""Launch helpers: validate, allocate, plan and launch the kernels; no autograd here.

``bn_forward`` and ``bn_backward`` take tensors (or None) and plain numbers only, so they can be
wrapped as ``torch.library`` custom operators as they are. The autograd wiring is in
``functional.py``; the layers call ``functional.normalize``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import persistent, tuning
from .kernels import forward as _forward_kernels
from .kernels.backward import (
    bn_backward_apply_kernel,
    bn_backward_finalize_kernel,
    bn_backward_reduce_kernel,
    bn_fused_backward_kernel,
    grad_parts_shape,
)
from .kernels.forward import (
    HYPER_FIELDS,
    bn_apply_kernel,
    bn_finalize_kernel,
    bn_fused_forward_kernel,
    bn_merge_kernel,
    bn_stats_kernel,
)
from .launch import launch
from .layout import Geometry, plan_geometry

# the kernels' RENORM values as plain ints (custom-op and config arguments)
RENORM_NONE, RENORM_KERAS, RENORM_TORCH = (int(c.value) for c in (
    _forward_kernels.RENORM_NONE, _forward_kernels.RENORM_KERAS, _forward_kernels.RENORM_TORCH))

__all__ = ["bn_forward", "bn_backward", "local_moments", "InferencePlan", "RENORM_NONE", "RENORM_KERAS", "RENORM_TORCH",
           "FLOAT_DTYPES", "ForwardResult", "saves_centre"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FINALIZE_BLOCK = 32  # channels per program of the separate finalize kernels
_FINALIZE_PARTS = 32  # parts a finalize merges at a time as one tree (see kernels merge_parts)
_FINALIZE_LOAD = 16  # elements per thread of one finalize load of a wide channel tile


def finalize_parts(n_parts: int, block_c: int = 1, num_warps: int = 4) -> int:
    """BLOCK_P of a finalize over n_parts parts, block_c channels at a time by num_warps warps:
    8 for at most 8 parts (ceil(n_parts / 8) + 3 <= 2 log2(n_parts) + 4 steps), else 32 for up
    to 32 channels; a whole channels-fast tile of more takes as many parts (16 to 128) as make a
    load of _FINALIZE_LOAD elements per thread (and array), so that the loads in sequence,
    ceil(n_parts / BLOCK_P), stay few without raising the registers of the kernel whose last
    program finalizes ([32, 128] took bn_stats_kernel from 124 to 164 registers on sm_90,
    [16, 128] keeps it at 128; 64 parts at a time spilled with ghost batches)."""
    if n_parts <= 8:
        return 8
    if block_c <= _FINALIZE_BLOCK:
        return _FINALIZE_PARTS
    return min(128, max(16, _FINALIZE_LOAD * 32 * num_warps // block_c))


def finalize_blocks(geo: Geometry, plan: tuning.TilePlan, kind: str, finalize: bool = True
                    ) -> dict:
    """BLOCK_C, BLOCK_P and GROUP_P of the finalize run by a split reduction's last program of a
    channel tile (kind: "forward" statistics or "backward" sums; ``finalize``: else only the part
    sums, merged by a separate kernel, and no groups).

    Channels fast, the whole tile of BLOCK_B channels at once: in blocks of 32 the last program
    walked a tile of 128 channels four times over, each walk ceil(n_parts / 32) loads in sequence
    (52 at 392 parts, each an L2 round trip and then a tree of Chan merges, three divisions per
    level; on an H200 the layers of 64 to 256 channels were 2-5x slower than torch). With more than 4 * BLOCK_P parts
    the merge takes two levels (GROUP_P = BLOCK_P, kernels/common.py arrive_in_group): 2 to 4 loads in
    sequence instead of up to 33. Not the statistics of 64-channel tiles: there the second level
    took bn_stats_kernel from 114 to 141 registers on sm_90 (triton 3.9; 4 to 3 programs per SM,
    where [8, 128] loads in two levels stay at 110-128), and one level of [32, 64] is 17 loads at the most
    (523 parts), within the issue's 2 log2(parts) + 4 steps. Ghost batches: the grid's last
    program finalizes every channel, 32 at a time. Reduction fast: one channel per tile."""
    if geo.G > 1:
        block_c = _FINALIZE_BLOCK
    elif geo.channels_fast:
        block_c = plan.BLOCK_B
    else:
        block_c = 1
    block_p = (tuning.current_policy().knob_overrides().get("finalize_parts")
               or finalize_parts(plan.n_parts, block_c, plan.num_warps))
    two_levels = (finalize and geo.channels_fast and geo.G == 1 and plan.n_parts > 4 * block_p
                  and not (kind == "forward" and block_c == 64))
    if two_levels and kind == "forward" and "finalize_parts" not in \
            tuning.current_policy().knob_overrides():
        # loads of half the size: with both levels' merges of sums and M2, [16, 128] spilled
        # 12-32 B at 168 registers on triton 3.6 (sm_90); [8, 128] takes 110-128 on 3.6 and 3.9
        block_p //= 2
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, GROUP_P=block_p if two_levels else 0)


def parts_rows(geo: Geometry, plan: tuning.TilePlan, kind: str, finalize: bool = True) -> int:
    """Rows of a split reduction's parts (each plane): one per part, then one per group of a
    two-level finalize (finalize_blocks)."""
    group = finalize_blocks(geo, plan, kind, finalize)["GROUP_P"]
    return plan.n_parts + (tuning.cdiv(plan.n_parts, group) if group else 0)


def finalize_counters(geo: Geometry, plan: tuning.TilePlan, kind: str) -> int:
    """Arrival counters of a finalizing split reduction (kernels/common.py last_to_arrive): one
    per channel tile, one for the batch count, one per channel tile and group."""
    return plan.n_channel_tiles * (1 + parts_rows(geo, plan, kind) - plan.n_parts) + 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32, or fp64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Prepared:
    """The activation-like tensors as the kernels will address them, and how to undo a copy."""

    geometry: Geometry
    tensors: list  # the (possibly permuted/copied) tensors, in the order given
    inverse_perm: Optional[list[int]]  # set when the tensors were permuted to [reduction, channels]


def prepare(shape: Sequence[int], tensors: Sequence[torch.Tensor], axes: tuple[int, ...],
            groups: int) -> Prepared:
    """Finds a zero-copy view; copies (permuted to [reduction..., channels...]) only for layouts that
    need more than two reduction groups or more than one channel group (rare: e.g. axis=[1, 3])."""
    device = tensors[0].device
    geo = plan_geometry(shape, [t.stride() for t in tensors], axes, groups)
    if geo is not None:
        return Prepared(tuning.orient(geo, device), list(tensors), None)
    nd = len(shape)
    perm = [d for d in range(nd) if d not in axes] + list(axes)
    if groups > 1:  # keep the batch first so ghost groups stay addressable
        perm = [0] + [d for d in perm if d != 0]
    permuted = [t.permute(perm).contiguous() for t in tensors]
    new_axes = tuple(range(nd - len(axes), nd))
    pshape = [shape[d] for d in perm]
    geo = plan_geometry(pshape, [t.stride() for t in permuted], new_axes, groups)
    assert geo is not None, "a [reduction..., channels...] contiguous tensor is always addressable"
    inverse = [perm.index(d) for d in range(nd)]
    return Prepared(tuning.orient(geo, device), permuted, inverse)


def _prepare_memo(memo: Optional[dict], name: str, shape, tensors, axes, groups: int) -> Prepared:
    """``prepare``, with a zero-copy geometry kept in ``memo`` (the tensors' strides are part of
    the call signature the memo belongs to)."""
    geo = _memo_get(memo, name)
    if geo is not None:
        return Prepared(geo, list(tensors), None)
    prep = prepare(shape, tensors, axes, groups)
    if prep.inverse_perm is None:
        _memo_put(memo, name, prep.geometry)
    return prep


def _needs_int64(geo: Geometry) -> bool:
    """Whether element offsets need 64 bits (a seam the tests force on small shapes)."""
    return geo.needs_int64


class LaunchKey:
    """A launch key (see ``launch.launch``) whose hash is computed once: a layer's plan keeps it,
    so a repeated call hashes nothing (geometry and tile plans hash many fields)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: tuple) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (type(other) is LaunchKey and self.value == other.value)

    def __repr__(self) -> str:
        return f"LaunchKey{self.value!r}"


class _Static:
    """The part of one kernel launch that a call signature fixes: the integer arguments (sizes,
    chunking, strides), the constexprs, the launch key (hashed once) and the warps."""

    __slots__ = ("ints", "constexprs", "key", "num_warps")

    def __init__(self, ints: tuple, constexprs: dict, key, num_warps: int) -> None:
        self.ints, self.constexprs, self.num_warps = ints, constexprs, num_warps
        self.key = LaunchKey(key)

    def launch(self, kernel, grid: tuple, per_call: tuple) -> None:
        """kernel[grid](*per_call, *ints, **constexprs): every kernel takes the arguments that
        change from call to call (tensors, the count n) first and the integers its call signature
        fixes (sizes, strides) last."""
        launch(kernel, grid, (*per_call, *self.ints), self.constexprs, num_warps=self.num_warps,
               key=self.key)


# Each kernel's per-call arguments, in its order, written once: bn_forward and bn_backward and
# the planned calls (PlannedForward, PlannedBackward, InferencePlan) launch through these, by
# keyword. ``state``: the 12 tensors of _state_args; ``saved``: the 7 of _Saved.args().

def _run_stats(st: _Static, grid, *, x, part_sum, part_m2, pivot, counter, offset, rstd,
               state, hyper, cut) -> None:
    st.launch(bn_stats_kernel, grid, (x, part_sum, part_m2, pivot, counter, offset, rstd, *state,
                                      hyper, cut))


def _run_apply(st: _Static, grid, *, x, y, residual, centre, offset, rstd, weight, bias,
               pre_scale, pre_shift, running_mean, running_var, hyper) -> None:
    st.launch(bn_apply_kernel, grid, (x, y, residual, centre, offset, rstd, weight, bias, pre_scale,
                                      pre_shift, running_mean, running_var, hyper))


def _run_fused_forward(st: _Static, grid, *, x, y, residual, offset, rstd, state, hyper,
                       counter, cut) -> None:
    st.launch(bn_fused_forward_kernel, grid, (x, y, residual, offset, rstd, *state, hyper, counter,
                                              cut))


def _run_grad_reduce(st: _Static, grid, *, x, dy, y, saved, parts, counter, coef_b, coef_c,
                     dweight, dbias, n, cut) -> None:
    st.launch(bn_backward_reduce_kernel, grid, (x, dy, y, *saved, parts, counter, coef_b,
                                                coef_c, dweight, dbias, n, cut))


def _run_grad_apply(st: _Static, grid, *, x, dy, y, dx, dresidual, saved, coef_b,
                    coef_c, cut) -> None:
    st.launch(bn_backward_apply_kernel, grid, (x, dy, y, dx, dresidual, *saved, coef_b,
                                               coef_c, cut))


def _run_fused_backward(st: _Static, grid, *, x, dy, y, dx, dresidual, saved, dweight,
                        dbias) -> None:
    st.launch(bn_fused_backward_kernel, grid, (x, dy, y, dx, dresidual, *saved, dweight,
                                               dbias))


def call_memo(root: dict) -> dict:
    """The memo a layer keeps for one call signature (``root``, a dict), under the tuning policy
    and tune cache in force (they decide tiles and orientation, see tuning.plan_epoch)."""
    epoch = tuning.plan_epoch()
    memo = root.get(epoch)
    if memo is None:
        if len(root) > 8:
            root.clear()
        memo = root[epoch] = {}
    return memo


def _memo_get(memo: Optional[dict], name: str):
    """``memo[name]`` or None. ``memo``: a layer's plan (modules.py), one dict per call signature
    (shapes, strides, dtypes, flags, device): what depends only on those is computed by its first
    call and kept there."""
    return None if memo is None else memo.get(name)


def _memo_put(memo: Optional[dict], name: str, value):
    if memo is not None:
        memo[name] = value
    return value


@dataclass
class ForwardResult:
    """y and what backward needs, 8 bytes per statistic channel in fp32 (kernels/forward.py):
    the mean = centre + offset, kept as two numbers of which one is stored, and rstd; with a
    fused ReLU and no residual 8 more, the ReLU's cuts (saves_cut)."""

    y: torch.Tensor
    centre: Optional[torch.Tensor]  # [S] where it is not x's pivot (training, see load_pivot):
    #                                 the running mean (inference), the batch mean (sync BN)
    offset: Optional[torch.Tensor]  # [S] batch mean - pivot (training without sync), else None: 0
    rstd: Optional[torch.Tensor]  # [S] (None: keep_stats=False, nothing kept)
    pre_scale: Optional[torch.Tensor]  # [K] pre-gamma affine (renorm r * adjustment), or None
    pre_shift: Optional[torch.Tensor]
    cut: Optional[torch.Tensor] = None  # [2S] the fused ReLU's cuts (saves_cut), or None


def saves_cut(training: bool, sync: bool, relu: bool, has_residual: bool) -> bool:
    """Whether a forward keeps each channel's ReLU cut ([2S] fp32: the signs, then the thresholds,
    kernels/common.relu_cut), so that the backward's split kernels test the mask with one
    compare instead of recomputing the pre-activation: a training forward (not synchronized)
    with a fused ReLU and no residual (with one, the mask is read from y)."""
    return training and not sync and relu and not has_residual


def saves_centre(training: bool, sync: bool) -> bool:
    """Whether a forward stores its centres (else x's pivots) instead of the mean's offsets."""
    return not training or sync


def saves_pre_affine(renorm: int, has_adjust: bool) -> bool:
    """Whether a training forward keeps the pre-gamma affine (pre_scale, pre_shift) for backward."""
    return renorm != RENORM_NONE or has_adjust


_HYPER_CACHE: dict = {}


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def hyper_tensor(device: torch.device, dtype: torch.dtype, eps: float, momentum: float = 0.0,
                 renorm_momentum: float = 0.0, rmin: Optional[float] = None,
                 rmax: Optional[float] = None, dmax: Optional[float] = None) -> torch.Tensor:
    """The kernels' float hyper-parameters (``HYPER_FIELDS``) as a tensor in the statistics dtype
    ``dtype``, so float64 gets them exactly (a Python float kernel argument is passed as fp32).
    Absent clipping bounds are infinite. One tensor per distinct set of values and device, made once
    and reused (no host-to-device copy per call; it stays valid across CUDA-graph replays)."""
    values = (float(eps), float(momentum), float(renorm_momentum),
              -math.inf if rmin is None else float(rmin), math.inf if rmax is None else float(rmax),
              math.inf if dmax is None else float(dmax))
    key = (device, dtype, values)
    t = _HYPER_CACHE.get(key)
    if t is None:
        t = torch.empty(len(HYPER_FIELDS), device=device, dtype=dtype)
        for i, v in enumerate(values):
            t[i].fill_(v)  # device-side fills: allowed even while a CUDA graph is being captured
        if not _capturing(device):  # memory made during a capture belongs to that graph's pool
            if len(_HYPER_CACHE) > 1024:
                _HYPER_CACHE.clear()
            _HYPER_CACHE[key] = t
    return t


@dataclass
class _Call:
    """What the forward and backward steps of one call share: the prepared activation-like
    tensors, whether a residual takes part (backward: whether the forward's output is read for
    the ReLU mask, which it is exactly when the forward added a residual), and whether offsets
    need 64 bits."""

    prep: Prepared
    has_residual: bool
    int64: bool

    @property
    def geo(self) -> Geometry:
        return self.prep.geometry


@dataclass
class _Forward(_Call):
    """One forward call's prepared tensors, plans and outputs (shared by the steps below)."""

    x: torch.Tensor
    y: Optional[torch.Tensor]
    centre: Optional[torch.Tensor]  # see ForwardResult; statistics only: the [S] merged means
    offset: Optional[torch.Tensor]
    rstd: Optional[torch.Tensor]
    cut: Optional[torch.Tensor] = None  # see ForwardResult

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.x.dtype)

    def views(self):
        t, st = self.prep.tensors, self.geo.strides
        z, st_z = (t[2], st[2]) if self.has_residual else (None, st[0])
        return t[0], t[1], z, st[0], st[1], st_z

    def result(self, pre_scale=None, pre_shift=None) -> ForwardResult:
        return ForwardResult(_restore(self.prep.tensors[1], self.y, self.prep), self.centre,
                             self.offset, self.rstd, pre_scale, pre_shift, self.cut)


def _start_forward(x: torch.Tensor, residual: Optional[torch.Tensor], axes, groups: int,
                   training: bool, output: bool = True, keep_stats: bool = True,
                   sync: bool = False, memo: Optional[dict] = None,
                   relu: bool = False) -> _Forward:
    """Prepares a forward and allocates the statistics it keeps (ForwardResult: two [S] vectors,
    the centres or the offsets, and rstd; the ReLU's cuts, saves_cut). ``output=False``
    (statistics only) allocates no y, and ``centre`` is then the [S] merged means.
    ``keep_stats=False`` (inference with nothing to differentiate) allocates no statistics.
    ``memo``: see ``call_memo``."""
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=torch.preserve_format) if output else None
    active = [x] + ([y] if output else []) + ([residual] if residual is not None else [])
    prep = _prepare_memo(memo, "forward_geometry", x.shape, active, axes, groups if training else 1)
    S = prep.geometry.S
    centre = offset = rstd = None
    if keep_stats:
        stat = torch.empty(S, device=x.device, dtype=acc)
        if not output or saves_centre(training, sync):
            centre = stat
        else:
            offset = stat
        if output:
            rstd = torch.empty(S, device=x.device, dtype=acc)
    cut = None
    if keep_stats and output and saves_cut(training, sync, relu, residual is not None):
        cut = torch.empty(2 * S, device=x.device, dtype=acc)
    return _Forward(prep, residual is not None, _needs_int64(prep.geometry), x, y, centre, offset,
                    rstd, cut)


def _dtypes(tensors) -> tuple:
    """Part of a launch key (see launch.launch): each optional tensor's dtype, or None."""
    return tuple([None if t is None else t.dtype for t in tensors])


def _launch_apply(fw: _Forward, relu: bool, weight=None, bias=None, pre_scale=None, pre_shift=None,
                  running_mean=None, running_var=None, eps: float = 0.0,
                  plan: Optional[tuning.TilePlan] = None, memo: Optional[dict] = None) -> None:
    """y from the statistics in ``fw`` and the parameters; with ``running_mean`` (inference)
    the kernel computes the statistics from the running ones first (and keeps them in ``fw``).
    ``plan``: the statistics pass's (the kernel walks the same partition backwards, so its first
    reads hit L2), else the apply plan."""
    geo = fw.geo
    xs, ys, zs, st_x, st_y, st_z = fw.views()
    plan = plan or tuning.plan_tiles(geo, "apply", fw.x.device, fw.x.dtype)
    from_running = running_mean is not None
    hyper = hyper_tensor(fw.x.device, fw.acc, eps) if from_running else None
    st = _memo_get(memo, "apply")
    if st is None:
        tensors = (xs, ys, zs, fw.centre, fw.offset, fw.rstd, weight, bias, pre_scale, pre_shift,
                   running_mean, running_var)
        st = _memo_put(memo, "apply", _Static(
            (plan.sizes(geo), st_x, st_y, st_z), dict(
                HAS_GROUPS=geo.G > 1, CHANNELS_FAST=geo.channels_fast, INT64=fw.int64, RELU=relu,
                BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B),
            (geo, plan, fw.int64, relu, hyper is None, _dtypes(tensors)), plan.num_warps))
    _run_apply(st, plan.grid, x=xs, y=ys, residual=zs, centre=fw.centre, offset=fw.offset,
               rstd=fw.rstd, weight=weight, bias=bias, pre_scale=pre_scale, pre_shift=pre_shift,
               running_mean=running_mean, running_var=running_var, hyper=hyper)


def _launch_stats(fw: _Forward, plan: tuning.TilePlan, state=None, memo: Optional[dict] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial (sum of x - pivot, M2) per part and statistic channel, and each channel's pivot.
    With ``state`` (``_state_args``) the kernel's last program per channel tile also finalizes:
    fw's offsets and rstd and the running statistics are written (and no pivot: None)."""
    geo = fw.geo
    xs, st_x = fw.prep.tensors[0], geo.strides[0]
    if state is None:
        part_sum = torch.empty((plan.n_parts, geo.S), device=fw.x.device, dtype=fw.acc)
        part_m2 = torch.empty_like(part_sum)
        pivot = torch.empty(geo.S, device=fw.x.device, dtype=fw.acc)
        counter = offset = rstd = hyper = cut = None
        tensors = (None,) * 12
        flags = dict(RENORM=RENORM_NONE, UPDATE_RUNNING=False, UNBIASED=False, CUMULATIVE=False,
                     COUNT_BATCH=False)
    else:
        tensors, hyper, flags, _, _ = state
        # the parts live only until the kernel's last programs have merged them
        part_sum, part_m2 = scratch(memo, "stats_parts", fw.x.device, fw.acc,
                                    ((parts_rows(geo, plan, "forward"), geo.S),) * 2)
        pivot = None  # the finalize reads the pivots from x
        counter = arrival_counters(fw.x.device, finalize_counters(geo, plan, "forward"))
        offset, rstd, cut = fw.offset, fw.rstd, fw.cut
    st = _memo_get(memo, "stats")
    if st is None:
        st = _memo_put(memo, "stats", _Static(
            (plan.sizes(geo), st_x), dict(
                HAS_GROUPS=geo.G > 1, CHANNELS_FAST=geo.channels_fast, INT64=fw.int64, **flags,
                BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B,
                **finalize_blocks(geo, plan, "forward", finalize=state is not None)),
            (geo, plan, fw.int64, tuple(flags.values()), xs.dtype, pivot is None,
             _dtypes((counter, offset, rstd, *tensors, hyper, cut))), plan.num_warps))
    _run_stats(st, plan.grid, x=xs, part_sum=part_sum, part_m2=part_m2, pivot=pivot,
               counter=counter, offset=offset, rstd=rstd, state=tensors, hyper=hyper, cut=cut)
    return part_sum, part_m2, pivot


_COUNTERS: dict = {}
_SCRATCH: dict = {}
_SCRATCH_ALIGN = 64  # elements: each scratch view starts 256-byte (fp32) aligned


def _stream_key(device: torch.device) -> tuple:
    return (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)


def scratch(memo: Optional[dict], name: str, device: torch.device, dtype: torch.dtype,
            shapes: tuple) -> tuple:
    """Uninitialized tensors of ``shapes`` that one call's kernels write and read before the call
    returns (a split reduction's parts, the dx coefficients), carved from one buffer per device,
    stream, dtype and host thread. Kernels of one stream run one after another, so every layer can
    use the same buffer: it is as large as the largest call's need, not a sum over layers. A layer's
    ``memo`` keeps its views (no allocation per call). While a CUDA graph is being captured the
    tensors are the graph's own (not shared)."""
    if _capturing(device):
        return tuple(torch.empty(sh, device=device, dtype=dtype) for sh in shapes)
    # and one per thread: two host threads could interleave one call's launches with another's
    key = (*_stream_key(device), dtype, threading.get_ident())
    buf = _SCRATCH.get(key)
    cached = _memo_get(memo, name)
    if cached is not None and cached[0] is buf:
        return cached[1]
    sizes = [-(-math.prod(sh) // _SCRATCH_ALIGN) * _SCRATCH_ALIGN for sh in shapes]
    if buf is None or buf.numel() < sum(sizes):
        if len(_SCRATCH) > 64:  # threads come and go: drop the buffers (the memos' views stay valid)
            _SCRATCH.clear()
        buf = _SCRATCH[key] = torch.empty(sum(sizes), device=device, dtype=dtype)
    views, start = [], 0
    for sh, n in zip(shapes, sizes):
        views.append(buf[start:start + math.prod(sh)].view(sh))
        start += n
    _memo_put(memo, name, (buf, tuple(views)))
    return tuple(views)


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros for ``last_to_arrive`` (kernels/common.py): at least ``n`` of them, one set
    per device and stream (kernels of one stream run one after another, and each leaves its
    counters at zero). Made once and reused: no fill per call. Not kept while a CUDA graph is
    being captured (that memory belongs to the graph; its replay zeroes it first)."""
    key = _stream_key(device)
    t = _COUNTERS.get(key)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
        if not _capturing(device):
            _COUNTERS[key] = t
    return t


def _state_args(fw: _Forward, weight, bias, running_mean, running_var, num_batches_tracked,
                renorm_mean, renorm_stddev, moving_stddev, adj_scale, adj_bias, *, eps, momentum,
                cumulative, unbiased, update_running, renorm, renorm_momentum, rmin, rmax, dmax,
                count_batch, memo: Optional[dict] = None):
    """(tensor args, hyper-parameter tensor, constexpr flags, pre_scale, pre_shift) shared by the
    finalize and the single-pass kernels."""
    K = fw.geo.K
    save_pre_affine = saves_pre_affine(renorm, adj_scale is not None)
    pre_scale = torch.empty(K, device=fw.x.device, dtype=fw.acc) if save_pre_affine else None
    pre_shift = torch.empty_like(pre_scale) if save_pre_affine else None
    tensors = (weight, bias, adj_scale, adj_bias, pre_scale, pre_shift, running_mean, running_var,
               num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev)
    cached = _memo_get(memo, "state")
    if cached is None:
        cached = (hyper_tensor(fw.x.device, fw.acc, eps, momentum, renorm_momentum, rmin, rmax,
                               dmax),
                  dict(RENORM=renorm, UPDATE_RUNNING=update_running and running_mean is not None,
                       UNBIASED=unbiased, CUMULATIVE=cumulative,
                       COUNT_BATCH=count_batch and num_batches_tracked is not None))
        if not _capturing(fw.x.device):  # a tensor made during a capture is the graph's
            _memo_put(memo, "state", cached)
    hyper, flags = cached
    return tensors, hyper, flags, pre_scale, pre_shift


def _launch_sync_finalize(fw: _Forward, part_mean, part_m2, part_count, state) -> None:
    """The batch statistics from every process's (mean, M2, count): one part per process."""
    tensors, hyper, flags, _, _ = state
    flags = dict(flags)
    if flags.pop("COUNT_BATCH"):  # counted before the finalize reads the count
        tensors[8].add_(1)  # num_batches_tracked
    geo = fw.geo
    layout = (part_mean.shape[0], 1, 0, 0, 0, 0)  # n_parts, n_b_parts, A, a_chunk, B_count, b_chunk
    launch(bn_finalize_kernel, (tuning.cdiv(geo.K, _FINALIZE_BLOCK),), (
        part_mean, part_m2, part_count, fw.centre, fw.rstd, *tensors, geo.K, geo.G, *layout,
        hyper),
        dict(**flags, BLOCK_C=_FINALIZE_BLOCK, BLOCK_P=finalize_parts(layout[0])))


def bn_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor] = None,
    renorm_mean: Optional[torch.Tensor] = None,
    renorm_stddev: Optional[torch.Tensor] = None,
    moving_stddev: Optional[torch.Tensor] = None,
    adj_scale: Optional[torch.Tensor] = None,
    adj_bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    *,
    axes: tuple[int, ...] = (1,),
    groups: int = 1,
    training: bool = True,
    eps: float = 1e-5,
    momentum: float = 0.1,
    cumulative: bool = False,
    unbiased: bool = True,
    update_running: bool = True,
    renorm: int = RENORM_NONE,
    renorm_momentum: float = 0.01,
    rmin: Optional[float] = None,
    rmax: Optional[float] = None,
    dmax: Optional[float] = None,
    relu: bool = False,
    global_moments: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    count_batch: bool = False,
    keep_stats: bool = True,
    memo: Optional[dict] = None,
) -> ForwardResult:
    """Runs the forward kernels. Inputs are assumed validated (``functional.check_inputs``).

    momentum / renorm_momentum: weight of the new batch value in the moving averages (PyTorch's
    momentum, or 1 - Keras's). cumulative: momentum = 1 / num_batches_tracked, read on the device.
    count_batch (training): num_batches_tracked += 1 on the device, by the kernels themselves (the
    count the cumulative momentum reads includes this batch), as torch's modules count batches.
    keep_stats=False (inference only): the result has y only (nothing to differentiate).
    Parameter-like tensors are [K] (K = product of the channel dims) and contiguous.
    global_moments: (mean [P, S], M2 [P, S], count [P]) of every process (sync BN); the batch
    statistics are then their merge instead of this input's.
    memo: a layer's plan for this call signature (``call_memo``), or None.
    """
    fw = _start_forward(x, residual, axes, groups, training, keep_stats=keep_stats or training,
                        sync=global_moments is not None, memo=memo, relu=relu)
    if not training:
        _launch_apply(fw, relu, weight, bias, running_mean=running_mean, running_var=running_var,
                      eps=eps)
        return fw.result()
    state = _state_args(fw, weight, bias, running_mean, running_var, num_batches_tracked,
                        renorm_mean, renorm_stddev, moving_stddev, adj_scale, adj_bias, eps=eps,
                        momentum=momentum, cumulative=cumulative, unbiased=unbiased,
                        update_running=update_running, renorm=renorm,
                        renorm_momentum=renorm_momentum, rmin=rmin, rmax=rmax, dmax=dmax,
                        count_batch=count_batch, memo=memo)
    tensors, hyper, flags, pre_scale, pre_shift = state
    geo = fw.geo
    if global_moments is not None:
        _launch_sync_finalize(fw, *global_moments, state)
        if x.numel():
            _launch_apply(fw, relu, weight, bias, pre_scale, pre_shift)
        return fw.result(pre_scale, pre_shift)
    plan = _memo_get(memo, "forward_plan") or _memo_put(
        memo, "forward_plan", tuning.plan_tiles(geo, "forward", x.device, x.dtype))
    # opt-in persistent single pass (TRITON_BN_PERSISTENT=1; persistent.py): False -> split path
    if not plan.fused and persistent.forward(fw, state, relu):
        return fw.result(pre_scale, pre_shift)
    if plan.fused:
        xs, ys, zs, st_x, st_y, st_z = fw.views()
        st = _memo_get(memo, "fused_forward")
        if st is None:
            st = _memo_put(memo, "fused_forward", _Static(
                (geo.R1, geo.K, plan.A, plan.B, st_x, st_y, st_z),
                dict(CHANNELS_FAST=geo.channels_fast, INT64=fw.int64, RELU=relu, **flags,
                     BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B),
                (geo, plan, fw.int64, relu, tuple(flags.values()),
                 _dtypes((xs, ys, zs, *tensors, fw.cut))), plan.num_warps))
        _run_fused_forward(st, plan.grid, x=xs, y=ys, residual=zs, offset=fw.offset, rstd=fw.rstd,
                           state=tensors, hyper=hyper,
                           counter=arrival_counters(x.device, 1) if flags["COUNT_BATCH"] else None,
                           cut=fw.cut)
    else:
        _launch_stats(fw, plan, state, memo)  # its last programs finalize
        _launch_apply(fw, relu, weight, bias, pre_scale, pre_shift, plan=plan, memo=memo)
    if memo is not None and x.numel() and fw.prep.inverse_perm is None \
            and tensors[2] is None and tensors[3] is None and tensors[9] is None \
            and tensors[10] is None and tensors[11] is None:  # no adjustment, no Keras renorm state
        memo["planned_forward"] = PlannedForward(fw, plan, hyper, flags, pre_scale is not None, memo)
    return fw.result(pre_scale, pre_shift)


class InferencePlan:
    """One eval-mode call signature planned once: y = act((x - running_mean) * rsqrt(running_var +
    eps) * weight + bias [+ residual]) in one launch, nothing kept for backward. Built from a call
    that the slow path has validated; ``run`` then only allocates y and launches (the layers use
    it when nothing needs a gradient, see modules.py)."""

    __slots__ = ("grid", "hyper", "static")

    def __init__(self, x, residual, running_mean, eps: float, relu: bool) -> None:
        y = torch.empty_like(x, memory_format=torch.preserve_format)
        active = [x, y] + ([residual] if residual is not None else [])
        geo = plan_geometry(x.shape, [t.stride() for t in active], (1,), 1)
        if geo is not None:
            geo = tuning.orient(geo, x.device)
        if geo is None or x.numel() == 0:
            raise ValueError("a layout that needs a copy, or an empty input: not planned")
        plan = tuning.plan_tiles(geo, "apply", x.device, x.dtype)
        self.grid = plan.grid
        self.hyper = hyper_tensor(x.device, acc_dtype(x.dtype), eps)
        st = geo.strides
        # the key: this plan itself (its layer's call signature fixes every other argument)
        self.static = _Static(
            (plan.sizes(geo), st[0], st[1], st[2] if residual is not None else st[0]),
            dict(HAS_GROUPS=False, CHANNELS_FAST=geo.channels_fast, INT64=_needs_int64(geo),
                 RELU=relu, BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B), self, plan.num_warps)

    def run(self, x, residual, weight, bias, running_mean, running_var) -> torch.Tensor:
        y = torch.empty_like(x, memory_format=torch.preserve_format)
        _run_apply(self.static, self.grid, x=x, y=y, residual=residual, centre=None, offset=None,
                   rstd=None, weight=weight, bias=bias, pre_scale=None, pre_shift=None,
                   running_mean=running_mean, running_var=running_var, hyper=self.hyper)
        return y


def local_moments(x: torch.Tensor, axes: tuple[int, ...], groups: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This process's (mean [S], M2 [S], count) per statistic channel, for sync BN to exchange.
    An empty input gives zeros and count 0."""
    fw = _start_forward(x, None, axes, groups, True, output=False)
    geo = fw.geo
    if x.numel() == 0:
        zeros = torch.zeros(geo.S, device=x.device, dtype=fw.acc)
        return zeros, zeros.clone(), 0
    plan = tuning.plan_tiles(geo, "forward", x.device, x.dtype, allow_fused=False)
    part_sum, part_m2, pivot = _launch_stats(fw, plan)
    m2 = torch.empty_like(fw.centre)
    launch(bn_merge_kernel, (tuning.cdiv(geo.S, _FINALIZE_BLOCK),), (
        part_sum, part_m2, pivot, fw.centre, m2, geo.S, plan.n_parts, plan.n_b_parts, plan.A,
        plan.a_chunk, plan.b_extent, plan.b_chunk),
        dict(BLOCK_C=_FINALIZE_BLOCK, BLOCK_P=finalize_parts(plan.n_parts)))
    return fw.centre, m2, geo.R


def _restore(computed: torch.Tensor, allocated: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """The output in the caller's layout: the allocated tensor, or the permuted copy put back."""
    if prep.inverse_perm is None:
        return allocated
    return allocated.copy_(computed.permute(prep.inverse_perm))


@dataclass
class _Backward(_Call):
    dx: Optional[torch.Tensor]
    dres: Optional[torch.Tensor]
    write_dres: bool

    def views(self):
        """(x, dy, y, dx, dz) tensors and their strides, in the kernels' view (y: the forward's
        output, for the ReLU mask after a residual)."""
        t, st = self.prep.tensors, self.geo.strides
        idx = [0, 1, 2 if self.has_residual else 0, -2, -1]
        tensors = [t[i] for i in idx]
        if not self.has_residual:
            tensors[2] = None
        if self.dx is None:
            tensors[3] = None
        if not self.write_dres:
            tensors[4] = None
        return tensors, [st[i] for i in idx]


def _start_backward(dy, x, y, axes, groups, training, relu, need_dx, need_dresidual,
                    memo: Optional[dict] = None) -> _Backward:
    dx = torch.empty_like(x, memory_format=torch.preserve_format) if need_dx else None
    dres = None
    if need_dresidual:
        # (no residual: the mask alone, functional._relu_mask)
        dres = torch.empty_like(y if y is not None else dy,
                                memory_format=torch.preserve_format) if relu else dy
    write_dres = need_dresidual and relu
    active = [x, dy] + ([y] if y is not None else [])
    active += [dx if dx is not None else x] + [dres if write_dres else x]
    prep = _prepare_memo(memo, "backward_geometry", x.shape, active, axes,
                         groups if training else 1)
    return _Backward(prep, y is not None, _needs_int64(prep.geometry), dx, dres, write_dres)


@dataclass
class _Saved:
    """What the forward left for backward (``ForwardResult``) and the parameters, in the order the
    backward kernels take them: Centre (None: x's pivots), Offset (None: 0), Rstd, Weight, Bias
    (the ReLU mask only, else None), PreScale, PreShift (training only)."""

    centre: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    rstd: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    pre_scale: Optional[torch.Tensor]
    pre_shift: Optional[torch.Tensor]

    def args(self) -> tuple:
        return (self.centre, self.offset, self.rstd, self.weight, self.bias, self.pre_scale,
                self.pre_shift)


def used_cut(geo: Geometry, relu: bool, has_residual: bool, sync: bool,
             cut: Optional[torch.Tensor]) -> bool:
    """Whether the backward's split kernels take the ReLU mask from the forward's cuts
    (ForwardResult.cut): kept, a ReLU recomputed from x (no residual), not synchronized, channels
    fast (the whole tiles that compare with them)."""
    return (cut is not None and cut.numel() > 0 and relu and not has_residual and not sync
            and geo.channels_fast)


def _grad_scratch_shapes(geo: Geometry, plan) -> tuple:
    """The reduction's parts, CoefB and CoefC."""
    return (grad_parts_shape(parts_rows(geo, plan, "backward"), geo.S),) + ((geo.S,),) * 2


def _launch_grad_reduce(bw: _Backward, plan, saved: _Saved, relu, finalize=None,
                        memo: Optional[dict] = None, cut: Optional[torch.Tensor] = None):
    """Partial sums of g, g * (x - m) and x - m (m: the saved mean) per part and statistic
    channel, [3, n_parts, S]. With ``finalize`` = (dweight, dbias, training) the kernel's last
    programs also write the dx coefficients and the parameter gradients: returns (coef_b,
    coef_c) then. ``cut``: the forward's ReLU cuts (used_cut), or None."""
    geo = bw.geo
    (xs, dys, ys, _, _), (st_x, st_dy, st_y, _, _) = bw.views()
    training = True
    if finalize is None:
        parts = torch.empty(grad_parts_shape(plan.n_parts, geo.S), device=xs.device,
                            dtype=saved.rstd.dtype)
        counter = coefs = dweight = dbias = n = None
    else:
        dweight, dbias, training = finalize
        # parts and the dx coefficients live until the dx kernel of this call has read them
        parts, *coefs = scratch(memo, "grad_parts", xs.device, saved.rstd.dtype,
                                _grad_scratch_shapes(geo, plan))
        counter, n = arrival_counters(xs.device, finalize_counters(geo, plan, "backward")), geo.R
    coef_b, coef_c = coefs or (None, None)
    st = _memo_get(memo, "grad_reduce")
    if st is None:
        st = _memo_put(memo, "grad_reduce", _Static(
            (plan.sizes(geo), st_x, st_dy, st_y), dict(
                HAS_GROUPS=geo.G > 1, CHANNELS_FAST=geo.channels_fast, INT64=bw.int64, RELU=relu,
                TRAINING=training, BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B,
                **finalize_blocks(geo, plan, "backward", finalize=finalize is not None)),
            (geo, plan, bw.int64, relu, training,
             _dtypes((xs, dys, ys, *saved.args(), counter, coef_b, coef_c, dweight, dbias, cut))),
            plan.num_warps))
    _run_grad_reduce(st, plan.grid, x=xs, dy=dys, y=ys, saved=saved.args(), parts=parts,
                     counter=counter, coef_b=coef_b, coef_c=coef_c, dweight=dweight, dbias=dbias,
                     n=n, cut=cut)
    return coefs if finalize is not None else parts


def _launch_grad_finalize(bw: _Backward, parts, saved: _Saved, dweight, dbias, training,
                          count: Optional[torch.Tensor]):
    """parts: [2 or 3, n_parts, S] (the third row read only with a saved offset)."""
    geo = bw.geo
    coef_b = torch.empty_like(saved.rstd)
    coef_c = torch.empty_like(saved.rstd)
    launch(bn_backward_finalize_kernel, (tuning.cdiv(geo.K, _FINALIZE_BLOCK),), (
        parts, saved.offset, saved.rstd, saved.weight, saved.pre_scale, saved.pre_shift,
        coef_b, coef_c, dweight, dbias, count, geo.K, geo.G, parts.shape[1], geo.R),
        dict(TRAINING=training, BLOCK_C=_FINALIZE_BLOCK, BLOCK_P=finalize_parts(parts.shape[1])))
    return coef_b, coef_c


def _launch_grad_apply(bw: _Backward, saved: _Saved, coef_b, coef_c, training, relu,
                       plan: Optional[tuning.TilePlan] = None, memo: Optional[dict] = None,
                       cut: Optional[torch.Tensor] = None):
    """dx (and the residual's gradient); ``plan``: the reduction pass's, walked backwards (its
    last reads are still in L2), else the apply plan; ``cut``: the forward's ReLU cuts, or None."""
    geo = bw.geo
    (xs, dys, ys, dxs, dzs), (st_x, st_dy, st_y, st_dx, st_dz) = bw.views()
    ap = plan or tuning.plan_tiles(geo, "apply", xs.device, xs.dtype)
    st = _memo_get(memo, "grad_apply")
    if st is None:
        st = _memo_put(memo, "grad_apply", _Static(
            (ap.sizes(geo), st_x, st_dy, st_y, st_dx, st_dz), dict(
                HAS_GROUPS=geo.G > 1, CHANNELS_FAST=geo.channels_fast, INT64=bw.int64, RELU=relu,
                TRAINING=training, BLOCK_A=ap.BLOCK_A, BLOCK_B=ap.BLOCK_B),
            (geo, ap, bw.int64, relu, training,
             _dtypes((xs, dys, ys, dxs, dzs, *saved.args(), cut))),
            ap.num_warps))
    _run_grad_apply(st, ap.grid, x=xs, dy=dys, y=ys, dx=dxs, dresidual=dzs,
                    saved=saved.args(), coef_b=coef_b, coef_c=coef_c, cut=cut)


def bn_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    centre: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    rstd: torch.Tensor,
    pre_scale: Optional[torch.Tensor],
    pre_shift: Optional[torch.Tensor],
    cut: Optional[torch.Tensor] = None,
    *,
    axes: tuple[int, ...] = (1,),
    groups: int = 1,
    training: bool = True,
    relu: bool = False,
    need_dx: bool = True,
    need_dweight: bool = True,
    need_dbias: bool = True,
    need_dresidual: bool = False,
    all_reduce=None,
    global_count: Optional[torch.Tensor] = None,
    memo: Optional[dict] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """Gradients (dx, dweight, dbias, dresidual) from the forward's ``ForwardResult`` (centre,
    offset, rstd, pre_scale, pre_shift, cut) and its parameters (contiguous [K]); ``bias`` is read only with
    ``relu`` (the recomputed mask) and may be None otherwise. ``y``: the forward's output where
    it added a residual before the ReLU (the mask, not y <= 0, is read from it), else None.

    Sync BN: ``all_reduce(t)`` sums a [2, S] tensor (sum dy, sum dy*(x - centre)) over processes in
    place and ``global_count`` [1] is the element count per channel over all processes; dweight
    and dbias stay local (as torch.nn.SyncBatchNorm's), dx uses the global sums.
    Only ``need_dresidual`` (with ``relu``): the ReLU gate alone, dresidual = dy but where y <= 0 (read
    from ``y``, else recomputed; one pass, no reduction; functional._ReluGateFunction).
    memo: the layer's plan of the forward (``call_memo``), or None; the backward keeps its own
    under dy's layout and the gradients asked for.
    """
    if memo is not None:
        memo = backward_memo(memo, dy, relu, y is not None, need_dx, need_dweight,
                             need_dbias, need_dresidual)
    bw = _start_backward(dy, x, y, axes, groups, training, relu, need_dx, need_dresidual,
                         memo)
    geo = bw.geo
    acc = rstd.dtype
    dweight = torch.empty(geo.K, device=x.device, dtype=acc) if need_dweight else None
    dbias = torch.empty(geo.K, device=x.device, dtype=acc) if need_dbias else None
    if not training:  # the pre-gamma affine (renorm, adjustment) exists in training only
        pre_scale = pre_shift = None
    saved = _Saved(centre, offset, rstd, weight, bias if relu else None, pre_scale, pre_shift)
    sync = all_reduce is not None
    plan = _memo_get(memo, "backward_plan") or _memo_put(memo, "backward_plan", tuning.plan_tiles(
        geo, "backward", x.device, x.dtype, allow_fused=not sync))
    if plan.fused and x.numel():
        (xs, dys, ys, dxs, dzs), strides = bw.views()
        head = (xs, dys, ys, dxs, dzs, *saved.args(), dweight, dbias)
        st = _memo_get(memo, "fused_backward")
        if st is None:
            st = _memo_put(memo, "fused_backward", _Static(
                (geo.R1, geo.K, plan.A, plan.B, geo.R, *strides),
                dict(CHANNELS_FAST=geo.channels_fast, INT64=bw.int64, RELU=relu, TRAINING=training,
                     BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B),
                (geo, plan, bw.int64, relu, training, _dtypes(head)), plan.num_warps))
        _run_fused_backward(st, plan.grid, x=xs, dy=dys, y=ys, dx=dxs, dresidual=dzs,
                            saved=saved.args(), dweight=dweight, dbias=dbias)
    elif not (need_dx or need_dweight or need_dbias):  # the ReLU gate alone (functional's
        if bw.write_dres and x.numel():             # _ReluGateFunction): no reduction
            _launch_grad_apply(bw, saved, saved.rstd, saved.rstd, training, relu)  # coefs unused
    elif not sync and persistent.backward(bw, saved, dweight, dbias, training, relu):
        pass  # opt-in persistent single pass (TRITON_BN_PERSISTENT=1; persistent.py) ran
    else:
        cut = cut if used_cut(geo, relu, y is not None, sync, cut) else None
        if x.numel() and not sync:  # the reduction's last programs finalize
            coef_b, coef_c = _launch_grad_reduce(bw, plan, saved, relu, (dweight, dbias, training),
                                                 memo, cut)
        elif x.numel():
            parts = _launch_grad_reduce(bw, plan, saved, relu)
        else:
            parts = torch.zeros((3, 1, geo.S), device=x.device, dtype=acc)
        if sync:
            # local parameter gradients first, then the dx coefficients from the global sums
            # (about the saved global mean, taken as exact: no third row, no offset)
            _launch_grad_finalize(bw, parts, saved, dweight, dbias, training, None)
            sums = parts[:2].sum(1, keepdim=True)
            all_reduce(sums)
            coef_b, coef_c = _launch_grad_finalize(bw, sums, saved, None, None, training,
                                                   global_count)
        elif not x.numel():
            coef_b, coef_c = _launch_grad_finalize(bw, parts, saved, dweight, dbias, training,
                                                   None)
        if (need_dx or bw.write_dres) and x.numel():
            _launch_grad_apply(bw, saved, coef_b, coef_c, training, relu, plan, memo, cut)
        if memo is not None and x.numel() and not sync and bw.prep.inverse_perm is None:
            memo["planned_backward"] = PlannedBackward(bw, plan, training, relu, need_dweight,
                                                       need_dbias, memo)
    dx = _restore(bw.prep.tensors[-2], bw.dx, bw.prep) if bw.dx is not None else None
    dres = bw.dres
    if bw.write_dres:
        dres = _restore(bw.prep.tensors[-1], bw.dres, bw.prep)
    return dx, dweight, dbias, dres


def backward_memo(memo: dict, dy: torch.Tensor, relu: bool, has_residual: bool, *needs: bool
                  ) -> dict:
    """The part of a layer's memo for backward calls with dy's layout, the ReLU and residual (the
    forward's output read for the mask) as this node sees them (a gated node,
    functional._ReluGateFunction, sees neither) and these gradients."""
    key = (dy.stride(), dy.dtype, relu, has_residual, *needs)
    sub = memo.get(key)
    if sub is None:
        sub = memo[key] = {}
    return sub


class PlannedForward:
    """A training forward (split path or single pass) planned by an earlier call of its layer
    and call signature through ``bn_forward`` (it is kept in that layer's memo): ``run`` only
    allocates what the call returns and launches the kernels bn_forward launched, through the same
    ``_run_*`` functions with the same memoized ``_Static`` parts (tests/probes/direct_launch.py
    compares the two argument lists launch for launch). No adjustment, no Keras renorm state, no
    copied layout, not synchronized: those calls keep taking bn_forward."""

    __slots__ = ("S", "K", "acc", "pre_affine", "grid", "memo", "launches", "hyper", "parts",
                 "counters", "cut")

    def __init__(self, fw: _Forward, plan: tuning.TilePlan, hyper, flags: dict, pre_affine: bool,
                 memo: dict) -> None:
        geo = fw.geo
        self.S, self.K, self.acc, self.pre_affine = geo.S, geo.K, fw.acc, pre_affine
        self.grid, self.memo, self.hyper = plan.grid, memo, hyper
        self.cut = fw.cut is not None
        if plan.fused:
            self.launches = (memo["fused_forward"],)
            self.counters = 1 if flags["COUNT_BATCH"] else 0
        else:
            self.launches = (memo["stats"], memo["apply"])
            self.parts = ((parts_rows(geo, plan, "forward"), geo.S),) * 2
            self.counters = finalize_counters(geo, plan, "forward")

    def run(self, x, weight, bias, residual, running_mean, running_var, num_batches_tracked):
        """(y, centre, offset, rstd, pre_scale, pre_shift, cut), as ``bn_forward``'s
        ForwardResult."""
        device, acc, S = x.device, self.acc, self.S
        y = torch.empty_like(x, memory_format=torch.preserve_format)
        offset = torch.empty(S, device=device, dtype=acc)
        rstd = torch.empty(S, device=device, dtype=acc)
        cut = torch.empty(2 * S, device=device, dtype=acc) if self.cut else None
        pre_scale = pre_shift = None
        if self.pre_affine:
            pre_scale = torch.empty(self.K, device=device, dtype=acc)
            pre_shift = torch.empty(self.K, device=device, dtype=acc)
        state = (weight, bias, None, None, pre_scale, pre_shift, running_mean, running_var,
                 num_batches_tracked, None, None, None)
        if len(self.launches) == 1:
            counter = arrival_counters(device, 1) if self.counters else None
            _run_fused_forward(self.launches[0], self.grid, x=x, y=y, residual=residual,
                               offset=offset, rstd=rstd, state=state, hyper=self.hyper,
                               counter=counter, cut=cut)
        else:
            stats, apply = self.launches
            part_sum, part_m2 = scratch(self.memo, "stats_parts", device, acc, self.parts)
            _run_stats(stats, self.grid, x=x, part_sum=part_sum, part_m2=part_m2, pivot=None,
                       counter=arrival_counters(device, self.counters), offset=offset, rstd=rstd,
                       state=state, hyper=self.hyper, cut=cut)
            _run_apply(apply, self.grid, x=x, y=y, residual=residual, centre=None, offset=offset,
                       rstd=rstd, weight=weight, bias=bias, pre_scale=pre_scale,
                       pre_shift=pre_shift, running_mean=None, running_var=None, hyper=None)
        return y, None, offset, rstd, pre_scale, pre_shift, cut


class PlannedBackward:
    """The backward of a ``PlannedForward`` for one dy layout and set of gradients, planned by an
    earlier call through ``bn_backward`` (kept in the layer's memo, ``backward_memo``): ``run``
    allocates the gradients and launches what bn_backward launched, with the same arguments."""

    __slots__ = ("K", "grid", "memo", "launches", "need_dweight", "need_dbias", "training",
                 "scratch_shapes", "counters", "R", "geo")

    def __init__(self, bw: _Backward, plan: tuning.TilePlan, training: bool, relu: bool,
                 need_dweight: bool, need_dbias: bool, memo: dict) -> None:
        geo = bw.geo
        self.K, self.grid, self.memo, self.training, self.R = geo.K, plan.grid, memo, training, geo.R
        self.geo = geo
        self.need_dweight, self.need_dbias = need_dweight, need_dbias
        if plan.fused:
            self.launches = (memo["fused_backward"],)
        else:
            self.launches = (memo["grad_reduce"], memo.get("grad_apply"))
            self.scratch_shapes = _grad_scratch_shapes(geo, plan)
            self.counters = finalize_counters(geo, plan, "backward")

    def run(self, dy, x, weight, bias, y, centre, offset, rstd, pre_scale, pre_shift, cut,
            need_dx: bool, need_dresidual: bool, relu: bool):
        """(dx, dweight, dbias, dresidual), as ``bn_backward``."""
        device, acc = x.device, rstd.dtype
        dx = torch.empty_like(x, memory_format=torch.preserve_format) if need_dx else None
        dres = None
        if need_dresidual:
            dres = torch.empty_like(y, memory_format=torch.preserve_format) if relu else dy
        dres_out = dres if need_dresidual and relu else None
        dweight = torch.empty(self.K, device=device, dtype=acc) if self.need_dweight else None
        dbias = torch.empty(self.K, device=device, dtype=acc) if self.need_dbias else None
        if not self.training:  # the pre-gamma affine (renorm, adjustment) exists in training only
            pre_scale = pre_shift = None
        saved = (centre, offset, rstd, weight, bias if relu else None, pre_scale, pre_shift)
        if len(self.launches) == 1:
            _run_fused_backward(self.launches[0], self.grid, x=x, dy=dy, y=y, dx=dx,
                                dresidual=dres_out, saved=saved, dweight=dweight, dbias=dbias)
        else:
            reduce, apply = self.launches
            parts, coef_b, coef_c = scratch(self.memo, "grad_parts", device, acc,
                                            self.scratch_shapes)
            cut = cut if used_cut(self.geo, relu, y is not None, False, cut) else None
            _run_grad_reduce(reduce, self.grid, x=x, dy=dy, y=y, saved=saved,
                             parts=parts, counter=arrival_counters(device, self.counters),
                             coef_b=coef_b, coef_c=coef_c, dweight=dweight, dbias=dbias, n=self.R,
                             cut=cut)
            if apply is not None:
                _run_grad_apply(apply, self.grid, x=x, dy=dy, y=y, dx=dx,
                                dresidual=dres_out, saved=saved, coef_b=coef_b, coef_c=coef_c,
                                cut=cut)
        return dx, dweight, dbias, dres
