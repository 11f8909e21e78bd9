"""Strided views of an activation as the kernels see it.

Every kernel addresses an element by a *reduction index* ``(r0, r1)`` and a *statistic channel*
``s = g * K + k``: ``g`` is the ghost-batch group (``G == 1`` without ghost batches) and ``k`` the
flattened position along the channel axes. Each tensor taking part (x, y, dy, dx, a residual) has its
own four strides ``(r0, r1, g, k)``, so NCHW, channels_last (NHWC, NDHWC), the Keras ``axis=-1``
layout and most strided views are addressed in place, without copying the activation.

Dimensions are merged where every tensor allows it; reduction dimensions may be reordered (a
reduction does not care about order, so they are sorted by the activation's strides). Only when a
shape needs more than two reduction groups or more than one channel group is the activation copied
(``needs_copy``); the caller then permutes it to ``[reduction..., channels...]`` and says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Geometry", "plan_geometry", "normalize_axes"]


@dataclass(frozen=True)
class Geometry:
    """Sizes shared by every tensor of one batch-norm call, plus each tensor's strides.

    R0, R1: reduction extents (R1 is the inner one, often H*W); K: channels per group;
    G: ghost-batch groups; strides[i] = (r0, r1, g, k) element strides of tensor i.
    channels_fast: True when channels are closer in memory than reduction elements (NHWC, (N, C)).
    """

    R0: int
    R1: int
    G: int
    K: int
    strides: tuple[tuple[int, int, int, int], ...]
    channels_fast: bool

    @property
    def R(self) -> int:
        return self.R0 * self.R1

    @property
    def S(self) -> int:
        return self.G * self.K

    @functools.cached_property
    def needs_int64(self) -> bool:
        """Whether some tensor spans more than 2**31 - 1 elements from its first one, so that
        element offsets need 64 bits (computed once per geometry, which is cached)."""
        extents = (self.R0, self.R1, self.G, self.K)
        return any(sum((e - 1) * abs(st) for e, st in zip(extents, strides)) + 1 > 2**31 - 1
                   for strides in self.strides)


def normalize_axes(axis: int | Sequence[int], ndim: int, *, arg: str = "axis") -> tuple[int, ...]:
    """Turns ``axis`` (an int or a list, negatives allowed) into sorted, unique, positive axes."""
    if isinstance(axis, bool):
        raise TypeError(f"{arg} must be an int or a list of ints, got {axis!r}")
    axes = [axis] if isinstance(axis, int) else list(axis)
    if not axes or not all([isinstance(a, int) and not isinstance(a, bool) for a in axes]):
        raise TypeError(f"{arg} must be an int or a non-empty list of ints, got {axis!r}")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{arg}={axis!r} is out of range for an input of rank {ndim} "
                             f"(expected values in [{-ndim}, {ndim - 1}])")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{arg}={axis!r} contains the same dimension twice")
    return tuple(sorted(out))


def _merge(dims: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
    """Merges neighbouring (size, strides-per-tensor) dims that are contiguous with each other in
    every tensor; the first dim of the list is the outer one."""
    merged: list[tuple[int, list[int]]] = []
    for size, strides in dims:
        if size == 1:
            continue
        if merged:
            psize, pstrides = merged[-1]
            if all(ps == s * size for ps, s in zip(pstrides, strides)):
                merged[-1] = (psize * size, list(strides))
                continue
        merged.append((size, list(strides)))
    return merged


def plan_geometry(shape: Sequence[int], tensors_strides: Sequence[Sequence[int]],
                  channel_axes: Sequence[int], groups: int = 1) -> Geometry | None:
    """Describes tensors of ``shape`` (with the given strides) as the kernels' strided view.

    ``groups`` > 1 splits the batch (dim 0) Keras-style: sample n belongs to ghost batch n % groups.
    Returns None when the layout needs more than two reduction groups or one channel group.
    Memoized: it runs on every call, and host time matters next to microsecond kernels.
    """
    return _plan_geometry(tuple(shape), tuple(tuple(st) for st in tensors_strides),
                          tuple(channel_axes), groups)


@functools.lru_cache(maxsize=4096)
def _plan_geometry(shape: tuple, tensors_strides: tuple, channel_axes: tuple,
                   groups: int) -> Geometry | None:
    n_t = len(tensors_strides)
    dims = [(int(size), [int(st[d]) for st in tensors_strides]) for d, size in enumerate(shape)]
    group_strides = [0] * n_t
    if groups > 1:
        # [N, ...] -> [V, G, ...]: ghost batch g holds samples g, g + G, g + 2G, ...
        n_size, n_strides = dims[0]
        dims = [(n_size // groups, [s * groups for s in n_strides]), (groups, n_strides)] + dims[1:]
        group_strides = list(n_strides)
        channel_axes = [a + 1 for a in channel_axes]
        red_dims = [d for i, d in enumerate(dims) if i not in channel_axes and i != 1]
    else:
        red_dims = [d for i, d in enumerate(dims) if i not in channel_axes]
    chan_dims = _merge([dims[a] for a in channel_axes])
    # reduction order is free: outer (largest stride of the first tensor) first, then merge
    red_dims = _merge(sorted(red_dims, key=lambda d: -d[1][0]))
    if len(red_dims) > 2 or len(chan_dims) > 1:
        return None
    K = chan_dims[0][0] if chan_dims else 1
    k_strides = chan_dims[0][1] if chan_dims else [0] * n_t
    while len(red_dims) < 2:
        red_dims.insert(0, (1, [0] * n_t))
    (R0, r0_strides), (R1, r1_strides) = red_dims
    strides = tuple((r0_strides[i], r1_strides[i], group_strides[i], k_strides[i]) for i in range(n_t))
    inner = r1_strides[0] if R1 > 1 else r0_strides[0]
    channels_fast = K > 1 and (R0 * R1 == 1 or abs(k_strides[0]) < abs(inner))
    return Geometry(R0=R0, R1=R1, G=groups, K=K, strides=strides, channels_fast=channels_fast)

