"""Launch helpers: validate, allocate, plan and launch the kernels; no autograd here.

``bn_forward`` and ``bn_backward`` take tensors (or None) and plain numbers only, so they can be
wrapped as ``torch.library`` custom operators as they are. The autograd wiring is in
``functional.py``; the layers call ``functional.normalize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import tuning
from .kernels.backward import (bn_backward_apply_kernel, bn_backward_finalize_kernel,
                               bn_backward_reduce_kernel, bn_fused_backward_kernel)
from .kernels.forward import (RENORM_KERAS, RENORM_NONE, RENORM_TORCH, bn_apply_kernel,
                              bn_finalize_kernel, bn_fused_forward_kernel, bn_stats_kernel)
from .layout import Geometry, normalize_axes, plan_geometry

__all__ = ["bn_forward", "bn_backward", "RENORM_NONE", "RENORM_KERAS", "RENORM_TORCH",
           "FLOAT_DTYPES", "ForwardResult"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1
_FINALIZE_BLOCK = 64


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
    geo = plan_geometry(shape, [t.stride() for t in tensors], axes, groups)
    if geo is not None:
        return Prepared(geo, list(tensors), None)
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
    return Prepared(geo, permuted, inverse)


def _needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    for t in tensors:
        if t is None:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
        if span > _INT32_MAX:
            return True
    return False


def _or_dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like


@dataclass
class ForwardResult:
    y: torch.Tensor
    mean: torch.Tensor  # [S] batch (training) or running (inference) mean, fp32/fp64
    rstd: torch.Tensor  # [S]
    scale: torch.Tensor  # [S] y = (x - mean) * scale + shift
    shift: torch.Tensor  # [S]
    gscale: Optional[torch.Tensor]  # [K] pre-gamma affine (renorm r * adjustment), or None
    gshift: Optional[torch.Tensor]


def _clip_values(rmin, rmax, dmax) -> tuple[float, float, float]:
    return (-math.inf if rmin is None else float(rmin), math.inf if rmax is None else float(rmax),
            math.inf if dmax is None else float(dmax))


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
) -> ForwardResult:
    """Runs the forward kernels. Inputs are assumed validated (``functional.check_inputs``).

    momentum / renorm_momentum: weight of the new batch value in the moving averages (PyTorch's
    momentum, or 1 - Keras's). cumulative: momentum = 1 / num_batches_tracked, read on the device.
    Parameter-like tensors are [K] (K = product of the channel dims) and contiguous.
    """
    dev = x.device
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    active = [x, y] + ([residual] if residual is not None else [])
    prep = prepare(x.shape, active, axes, groups if training else 1)
    geo = prep.geometry
    xs, ys = prep.tensors[0], prep.tensors[1]
    zs = prep.tensors[2] if residual is not None else xs
    st_x, st_y = geo.strides[0], geo.strides[1]
    st_z = geo.strides[2] if residual is not None else st_x
    S, K = geo.S, geo.K
    mean = torch.empty(S, device=dev, dtype=acc)
    rstd = torch.empty_like(mean)
    scale = torch.empty_like(mean)
    shift = torch.empty_like(mean)
    int64 = _needs_int64(xs, ys, zs)
    dummy = mean
    common = dict(HAS_RESIDUAL=residual is not None, RELU=relu)

    if not training:
        plan = tuning.plan_tiles(geo, "apply", dev, x.dtype)
        bn_apply_kernel[plan.grid](
            xs, ys, zs, mean, scale, shift, rstd,
            running_mean, running_var, _or_dummy(weight, dummy), _or_dummy(bias, dummy),
            geo.R1, K, S, plan.A, plan.B, plan.a_chunk, plan.b_chunk, plan.n_channel_tiles,
            plan.n_b_parts, eps, *st_x, *st_y, *st_z,
            HAS_GROUPS=False, CHANNELS_FAST=geo.channels_fast, INT64=int64,
            FROM_RUNNING=True, WRITE_COEFFS=True, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B,
            num_warps=plan.num_warps, **common)
        return ForwardResult(_restore(ys, y, prep), mean, rstd, scale, shift, None, None)

    rmin_v, rmax_v, dmax_v = _clip_values(rmin, rmax, dmax)
    has_adjust = adj_scale is not None
    save_gaffine = renorm != RENORM_NONE or has_adjust
    gscale = torch.empty(K, device=dev, dtype=acc) if save_gaffine else None
    gshift = torch.empty_like(gscale) if save_gaffine else None
    state = (
        _or_dummy(weight, dummy), _or_dummy(bias, dummy), _or_dummy(adj_scale, dummy),
        _or_dummy(adj_bias, dummy), _or_dummy(gscale, dummy), _or_dummy(gshift, dummy),
        _or_dummy(running_mean, dummy), _or_dummy(running_var, dummy),
        _or_dummy(num_batches_tracked, dummy), _or_dummy(renorm_mean, dummy),
        _or_dummy(renorm_stddev, dummy), _or_dummy(moving_stddev, dummy),
    )
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_ADJUST=has_adjust,
                 RENORM=renorm, UPDATE_RUNNING=update_running and running_mean is not None,
                 UNBIASED=unbiased, CUMULATIVE=cumulative, SAVE_GAFFINE=save_gaffine)
    scalars = (float(eps), float(momentum), float(renorm_momentum), rmin_v, rmax_v, dmax_v)

    plan = tuning.plan_tiles(geo, "forward", dev, x.dtype)
    if plan.fused:
        bn_fused_forward_kernel[plan.grid](
            xs, ys, zs, mean, rstd, scale, shift, *state,
            geo.R1, K, plan.A, plan.B, *scalars,
            st_x[0], st_x[1], st_x[3], st_y[0], st_y[1], st_y[3], st_z[0], st_z[1], st_z[3],
            CHANNELS_FAST=geo.channels_fast, INT64=int64, BLOCK_A=plan.BLOCK_A,
            BLOCK_B=plan.BLOCK_B, num_warps=plan.num_warps, **common, **flags)
    else:
        part_mean = torch.empty((plan.n_parts, S), device=dev, dtype=acc)
        part_m2 = torch.empty_like(part_mean)
        layout = (geo.R1, K, S, plan.A, plan.B, plan.a_chunk, plan.b_chunk, plan.n_channel_tiles,
                  plan.n_b_parts)
        bn_stats_kernel[plan.grid](
            xs, part_mean, part_m2, *layout, *st_x,
            HAS_GROUPS=geo.G > 1, CHANNELS_FAST=geo.channels_fast, INT64=int64,
            BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B, num_warps=plan.num_warps)
        bn_finalize_kernel[(tuning.cdiv(K, _FINALIZE_BLOCK),)](
            part_mean, part_m2, mean, rstd, scale, shift, *state,
            K, geo.G, plan.n_parts, plan.n_b_parts, plan.A, plan.a_chunk, plan.b_count,
            plan.b_chunk, *scalars, BLOCK_C=_FINALIZE_BLOCK, **flags)
        apply_plan = tuning.plan_tiles(geo, "apply", dev, x.dtype)
        bn_apply_kernel[apply_plan.grid](
            xs, ys, zs, mean, scale, shift, rstd, dummy, dummy, dummy, dummy,
            geo.R1, K, S, apply_plan.A, apply_plan.B, apply_plan.a_chunk, apply_plan.b_chunk,
            apply_plan.n_channel_tiles, apply_plan.n_b_parts, eps, *st_x, *st_y, *st_z,
            HAS_GROUPS=geo.G > 1, CHANNELS_FAST=geo.channels_fast, INT64=int64,
            FROM_RUNNING=False, WRITE_COEFFS=False, HAS_WEIGHT=False, HAS_BIAS=False,
            BLOCK_A=apply_plan.BLOCK_A, BLOCK_B=apply_plan.BLOCK_B,
            num_warps=apply_plan.num_warps, **common)
    return ForwardResult(_restore(ys, y, prep), mean, rstd, scale, shift, gscale, gshift)


def _restore(computed: torch.Tensor, allocated: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """The output in the caller's layout: the allocated tensor, or the permuted copy put back."""
    if prep.inverse_perm is None:
        return allocated
    return allocated.copy_(computed.permute(prep.inverse_perm))


def bn_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    gscale: Optional[torch.Tensor],
    gshift: Optional[torch.Tensor],
    *,
    axes: tuple[int, ...] = (1,),
    groups: int = 1,
    training: bool = True,
    relu: bool = False,
    need_dx: bool = True,
    need_dweight: bool = True,
    need_dbias: bool = True,
    need_dresidual: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """Gradients (dx, dweight, dbias, dresidual) from the saved forward coefficients."""
    dev = x.device
    acc = mean.dtype
    dx = torch.empty_like(x, memory_format=torch.preserve_format) if need_dx else None
    dres = None
    if need_dresidual:
        dres = torch.empty_like(residual, memory_format=torch.preserve_format) if relu else dy
    write_dres = need_dresidual and relu
    active = [x, dy] + ([residual] if residual is not None else [])
    active += [dx if dx is not None else x] + [dres if write_dres else x]
    prep = prepare(x.shape, active, axes, groups if training else 1)
    geo = prep.geometry
    t = prep.tensors
    xs, dys = t[0], t[1]
    zs = t[2] if residual is not None else xs
    dxs, dzs = t[-2], t[-1]
    st = geo.strides
    st_x, st_dy = st[0], st[1]
    st_z = st[2] if residual is not None else st_x
    st_dx, st_dz = st[-2], st[-1]
    S, K = geo.S, geo.K
    n = float(geo.R)
    dweight = torch.empty(K, device=dev, dtype=acc) if need_dweight else None
    dbias = torch.empty(K, device=dev, dtype=acc) if need_dbias else None
    dummy = mean
    int64 = _needs_int64(xs, dys, zs, dxs, dzs)
    has_gaffine = gscale is not None and training
    common = dict(HAS_RESIDUAL=residual is not None, RELU=relu, TRAINING=training)
    grads = dict(WRITE_DX=need_dx, WRITE_DRESIDUAL=write_dres)
    params = dict(HAS_GAFFINE=has_gaffine, WRITE_DW=need_dweight, WRITE_DB=need_dbias)

    plan = tuning.plan_tiles(geo, "backward", dev, x.dtype)
    if plan.fused:
        bn_fused_backward_kernel[plan.grid](
            xs, dys, zs, _or_dummy(dxs, dummy), _or_dummy(dzs, dummy),
            mean, rstd, scale, shift, _or_dummy(gscale, dummy), _or_dummy(gshift, dummy),
            _or_dummy(dweight, dummy), _or_dummy(dbias, dummy),
            geo.R1, K, plan.A, plan.B, n,
            *(s for stx in (st_x, st_dy, st_z, st_dx, st_dz) for s in (stx[0], stx[1], stx[3])),
            CHANNELS_FAST=geo.channels_fast, INT64=int64, BLOCK_A=plan.BLOCK_A,
            BLOCK_B=plan.BLOCK_B, num_warps=plan.num_warps, **common, **grads, **params)
    else:
        layout = (geo.R1, K, S, plan.A, plan.B, plan.a_chunk, plan.b_chunk, plan.n_channel_tiles,
                  plan.n_b_parts)
        part_dy = torch.empty((plan.n_parts, S), device=dev, dtype=acc)
        part_dyx = torch.empty_like(part_dy)
        flags = dict(HAS_GROUPS=geo.G > 1, CHANNELS_FAST=geo.channels_fast, INT64=int64,
                     HAS_RESIDUAL=residual is not None, RELU=relu)
        bn_backward_reduce_kernel[plan.grid](
            xs, dys, zs, mean, scale, shift, part_dy, part_dyx, *layout, *st_x, *st_dy, *st_z,
            BLOCK_A=plan.BLOCK_A, BLOCK_B=plan.BLOCK_B, num_warps=plan.num_warps, **flags)
        coef_b = torch.empty_like(mean)
        coef_c = torch.empty_like(mean)
        bn_backward_finalize_kernel[(tuning.cdiv(K, _FINALIZE_BLOCK),)](
            part_dy, part_dyx, rstd, scale, _or_dummy(gscale, dummy), _or_dummy(gshift, dummy),
            coef_b, coef_c, _or_dummy(dweight, dummy), _or_dummy(dbias, dummy),
            K, geo.G, plan.n_parts, n, TRAINING=training, BLOCK_C=_FINALIZE_BLOCK, **params)
        if need_dx or write_dres:
            ap = tuning.plan_tiles(geo, "apply", dev, x.dtype)
            bn_backward_apply_kernel[ap.grid](
                xs, dys, zs, _or_dummy(dxs, dummy), _or_dummy(dzs, dummy),
                mean, scale, shift, coef_b, coef_c,
                geo.R1, K, S, ap.A, ap.B, ap.a_chunk, ap.b_chunk, ap.n_channel_tiles, ap.n_b_parts,
                *st_x, *st_dy, *st_z, *st_dx, *st_dz,
                BLOCK_A=ap.BLOCK_A, BLOCK_B=ap.BLOCK_B, num_warps=ap.num_warps,
                TRAINING=training, **flags, **grads)
    if dx is not None:
        dx = _restore(dxs, dx, prep)
    if write_dres:
        dres = _restore(dzs, dres, prep)
    return dx, dweight, dbias, dres
