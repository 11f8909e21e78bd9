"""The kernels as ``torch.library`` custom operators, so torch.compile traces them as graph nodes.

``triton_bn::bn_forward`` mutates the running-statistic buffers and ``num_batches_tracked``
(declared with ``mutates_args``, so AOTAutograd functionalizes the update) and returns the output
plus the fp32 statistics backward needs (8 bytes per channel, and 8 more of ReLU cuts with a
fused ReLU and no residual, see ``ops.ForwardResult``);
``triton_bn::bn_backward`` is functional. Both have fake (meta) implementations giving the
outputs' shapes, dtypes and strides (what MemTracker counts under FakeTensorMode). Autograd stays in
``functional.BatchNormFunction`` (mutating custom ops cannot have ``register_autograd``): its
forward/backward call these operators while compiling and the launch helpers in ``ops`` directly
in eager mode (no dispatcher overhead).

Absent optional outputs (the centre of a training forward, which is x's pivot, the offset of an
inference forward, which is 0, ``pre_scale``/``pre_shift`` without renorm or adjustment, the ReLU
cuts where ``ops.saves_cut`` says none are kept, unneeded gradients) are returned as empty
tensors, since an operator's outputs must be tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import ops

__all__ = ["bn_backward", "bn_forward"]

_MUTATED = ("running_mean", "running_var", "num_batches_tracked", "renorm_mean", "renorm_stddev",
            "moving_stddev")


def _absent(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("triton_bn::bn_forward", mutates_args=_MUTATED)
def bn_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    adj_scale: Tensor | None, adj_bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, num_batches_tracked: Tensor | None,
    renorm_mean: Tensor | None, renorm_stddev: Tensor | None,
    moving_stddev: Tensor | None, axes: list[int], groups: int, training: bool, eps: float,
    momentum: float, cumulative: bool, unbiased: bool, update_running: bool, renorm: int,
    renorm_momentum: float, rmin: float | None, rmax: float | None, dmax: float | None,
    relu: bool, count_batch: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, centre, offset, rstd, pre_scale, pre_shift, cut): ``ops.bn_forward`` as an operator."""
    r = ops.bn_forward(
        x, weight, bias, running_mean, running_var, num_batches_tracked, renorm_mean,
        renorm_stddev, moving_stddev, adj_scale, adj_bias, residual, axes=tuple(axes),
        groups=groups, training=training, eps=eps, momentum=momentum, cumulative=cumulative,
        unbiased=unbiased, update_running=update_running, renorm=renorm,
        renorm_momentum=renorm_momentum, rmin=rmin, rmax=rmax, dmax=dmax, relu=relu,
        count_batch=count_batch)
    centre, offset, pre_scale, pre_shift, cut = (
        t if t is not None else _absent(r.rstd)
        for t in (r.centre, r.offset, r.pre_scale, r.pre_shift, r.cut))
    return r.y, centre, offset, r.rstd, pre_scale, pre_shift, cut


@bn_forward.register_fake
def _(x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
      num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, axes, groups, training, eps,
      momentum, cumulative, unbiased, update_running, renorm, renorm_momentum, rmin, rmax, dmax,
      relu, count_batch=False):
    K = math.prod(x.shape[a] for a in axes)
    S = K * (groups if training else 1)
    stat = x.new_empty(S, dtype=ops.acc_dtype(x.dtype))
    has_pre_affine = training and ops.saves_pre_affine(renorm, adj_scale is not None)
    g = x.new_empty(K if has_pre_affine else 0, dtype=stat.dtype)
    centre = x.new_empty(S if ops.saves_centre(training, False) else 0, dtype=stat.dtype)
    offset = x.new_empty(0 if ops.saves_centre(training, False) else S, dtype=stat.dtype)
    cut = x.new_empty((2 * S,) if ops.saves_cut(training, False, relu, residual is not None)
                      else (0,), dtype=stat.dtype)
    return (torch.empty_like(x, memory_format=torch.preserve_format), centre, offset, stat, g,
            g.clone(), cut)


@torch.library.custom_op("triton_bn::bn_backward", mutates_args=())
def bn_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, y: Tensor | None,
    centre: Tensor | None, offset: Tensor | None, rstd: Tensor, pre_scale: Tensor | None,
    pre_shift: Tensor | None, cut: Tensor | None, axes: list[int],
    groups: int, training: bool, relu: bool, need_dx: bool, need_dweight: bool, need_dbias: bool,
    need_dresidual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual): ``ops.bn_backward`` as an operator; dresidual only with
    relu (without it, dresidual is dy itself and the caller uses dy, as outputs may not alias);
    y: the forward's output where it added a residual (the ReLU mask: not y <= 0), else None."""
    dx, dw, db, dz = ops.bn_backward(
        dy, x, weight, bias, y, centre, offset, rstd, pre_scale, pre_shift, cut, axes=tuple(axes),
        groups=groups, training=training, relu=relu, need_dx=need_dx, need_dweight=need_dweight,
        need_dbias=need_dbias, need_dresidual=need_dresidual and relu)
    return tuple(t if t is not None else _absent(rstd) for t in (dx, dw, db, dz))


@bn_backward.register_fake
def _(dy, x, weight, bias, y, centre, offset, rstd, pre_scale, pre_shift, cut, axes, groups,
      training, relu, need_dx, need_dweight, need_dbias, need_dresidual):
    K = math.prod(x.shape[a] for a in axes)
    dx = torch.empty_like(x, memory_format=torch.preserve_format) if need_dx else _absent(rstd)
    dw = rstd.new_empty(K) if need_dweight else _absent(rstd)
    db = rstd.new_empty(K) if need_dbias else _absent(rstd)
    dz = torch.empty_like(y if y is not None else dy, memory_format=torch.preserve_format) \
        if need_dresidual and relu else _absent(rstd)
    return dx, dw, db, dz
