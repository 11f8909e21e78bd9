"""The autograd wiring and the functional API.

``normalize`` is the one entry every layer uses (Keras layer, PyTorch modules, sync BN): it checks
the arguments (before anything changes), then runs ``BatchNormFunction``, a torch.autograd.Function
over the kernels. ``batch_norm`` is ``torch.nn.functional.batch_norm``'s contract plus ``axis``.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import (
    custom_ops,  # noqa: F401  (registers the triton_bn:: operators for torch.compile)
    ops,
)
from .layout import normalize_axes
from .ops import RENORM_KERAS, RENORM_NONE, RENORM_TORCH

__all__ = ["batch_norm", "normalize", "RunningStats", "Renorm", "BatchNormFunction", "NormConfig"]


@dataclass
class RunningStats:
    """Moving statistics to update in place during training (and to use in inference).

    convention "torch": new = (1 - momentum) * old + momentum * batch; momentum=None is the
    cumulative average 1/num_batches_tracked (read on the device, so ``num_batches_tracked`` must be
    incremented before the call, as torch's modules do). convention "keras":
    new = old * momentum + batch * (1 - momentum).
    unbiased: the variance fed to ``var`` is n/(n-1) times the batch (biased) variance.
    moving_stddev: Keras renorm's extra state (then ``var`` := relu(moving_stddev**2 - eps)).
    """

    mean: torch.Tensor
    var: torch.Tensor
    momentum: Optional[float] = 0.1
    convention: str = "torch"
    unbiased: bool = True
    num_batches_tracked: Optional[torch.Tensor] = None
    moving_stddev: Optional[torch.Tensor] = None


@dataclass
class Renorm:
    """Batch renormalization (Ioffe 2017). style "keras": r and d against ``mean``/``stddev``
    (tf_keras's renorm_mean / renorm_stddev, updated with ``momentum`` in Keras's convention);
    style "torch": against the running statistics. Clipping bounds may be None (no clipping)."""

    style: str = "keras"
    rmin: Optional[float] = None
    rmax: Optional[float] = None
    dmax: Optional[float] = None
    momentum: float = 0.99
    mean: Optional[torch.Tensor] = None
    stddev: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class NormConfig:
    """The plain-number arguments of one call (hashable; saved on the autograd context)."""

    axes: tuple
    groups: int
    training: bool
    eps: float
    momentum: float
    cumulative: bool
    unbiased: bool
    update_running: bool
    renorm: int
    renorm_momentum: float
    rmin: Optional[float]
    rmax: Optional[float]
    dmax: Optional[float]
    relu: bool


class BatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x) [+ residual]); gradients for x, weight, bias and residual.

    Eager mode calls the launch helpers in ``ops`` directly; while torch.compile traces (or for
    tensor subclasses such as FakeTensor) it calls the ``triton_bn::`` custom operators instead,
    so the graph has no breaks. ``sync`` (see ``distributed.ProcessGroupSync``: ``exchange(x, axes,
    groups)`` gives every process's (mean [P, S], M2 [P, S], count [P]) and ``all_reduce(t)`` sums
    in place) makes the batch statistics those of all processes; dweight/dbias stay local.
    """

    # carries a sync hook from ``distributed.sync_normalize`` through ``normalize`` to here
    sync_hook: ContextVar = ContextVar("triton_bn_sync_hook", default=None)

    @staticmethod
    def run(x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
            num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg: NormConfig):
        """``apply`` with the active sync hook (if any; training only, never while compiling)."""
        sync = None
        if cfg.training and not torch.compiler.is_compiling():
            sync = BatchNormFunction.sync_hook.get()
        return BatchNormFunction.apply(x, weight, bias, residual, adj_scale, adj_bias,
                                       running_mean, running_var, num_batches_tracked,
                                       renorm_mean, renorm_stddev, moving_stddev, cfg, sync)

    @staticmethod
    def _traced(x: torch.Tensor) -> bool:
        return torch.compiler.is_compiling() or type(x) is not torch.Tensor

    @staticmethod
    def forward(ctx, x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
                num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg: NormConfig,
                sync=None):
        ctx.cfg, ctx.sync = cfg, sync
        ctx.param_dtypes = (weight.dtype if weight is not None else None,
                            bias.dtype if bias is not None else None)
        if x.numel() == 0 and sync is None:
            ctx.empty = True
            ctx.save_for_backward(weight, bias)
            return torch.empty_like(x)
        ctx.empty = False
        state = (running_mean, running_var, num_batches_tracked, renorm_mean, renorm_stddev,
                 moving_stddev)
        kw = {"groups": cfg.groups, "training": cfg.training, "eps": cfg.eps,
              "momentum": cfg.momentum, "cumulative": cfg.cumulative, "unbiased": cfg.unbiased,
              "update_running": cfg.update_running, "renorm": cfg.renorm,
              "renorm_momentum": cfg.renorm_momentum, "rmin": cfg.rmin, "rmax": cfg.rmax,
              "dmax": cfg.dmax, "relu": cfg.relu}
        if BatchNormFunction._traced(x):
            y, mean, rstd, scale, shift, gscale, gshift = torch.ops.triton_bn.bn_forward(
                x, weight, bias, residual, adj_scale, adj_bias, *state, axes=list(cfg.axes), **kw)
            has_g = cfg.training and ops.saves_gaffine(cfg.renorm, adj_scale is not None)
            gscale, gshift = (gscale, gshift) if has_g else (None, None)
        else:
            global_moments = None
            if sync is not None:
                global_moments = sync.exchange(x, cfg.axes, cfg.groups)
                ctx.global_count = global_moments[2].sum().reshape(1)
            r = ops.bn_forward(x, weight, bias, *state, adj_scale, adj_bias, residual,
                               axes=cfg.axes, global_moments=global_moments, **kw)
            y, mean, rstd, scale, shift, gscale, gshift = (r.y, r.mean, r.rstd, r.scale, r.shift,
                                                           r.gscale, r.gshift)
        ctx.save_for_backward(x, residual, mean, rstd, scale, shift, gscale, gshift)
        return y

    @staticmethod
    def backward(ctx, dy):
        nones = [None] * 10
        need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
        if ctx.empty:
            weight, bias = ctx.saved_tensors
            dw = torch.zeros_like(weight) if need_w else None
            db = torch.zeros_like(bias) if need_b else None
            return (torch.zeros_like(dy) if need_x else None, dw, db,
                    torch.zeros_like(dy) if need_z else None, *nones)
        x, residual, mean, rstd, scale, shift, gscale, gshift = ctx.saved_tensors
        cfg = ctx.cfg
        kw = {"groups": cfg.groups, "training": cfg.training, "relu": cfg.relu, "need_dx": need_x,
              "need_dweight": need_w, "need_dbias": need_b, "need_dresidual": need_z}
        if BatchNormFunction._traced(dy):
            grads = torch.ops.triton_bn.bn_backward(
                dy, x, residual, mean, rstd, scale, shift, gscale, gshift, axes=list(cfg.axes),
                **kw)
            dx, dw, db, dz = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
            if need_z and not cfg.relu:
                dz = dy  # d(y + z)/dz without an activation (the operator may not alias dy)
        else:
            sync = {} if ctx.sync is None else {"all_reduce": ctx.sync.all_reduce,
                                                "global_count": ctx.global_count}
            dx, dw, db, dz = ops.bn_backward(dy, x, residual, mean, rstd, scale, shift, gscale,
                                             gshift, axes=cfg.axes, **kw, **sync)
        w_dtype, b_dtype = ctx.param_dtypes
        if dw is not None:
            dw = dw.to(w_dtype)
        if db is not None:
            db = db.to(b_dtype)
        return dx, dw, db, dz, *nones


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, "
                        f"got {t.dtype}")


def _check_channel_tensor(name: str, t: Optional[torch.Tensor], x: torch.Tensor, K: int,
                          axis_desc: str) -> None:
    if t is None:
        return
    _check_floating(name, t)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}; "
                         "move them to the same device")
    if t.dim() != 1 or t.numel() != K:
        raise ValueError(f"{name} must have shape ({K},) to match the {K} channels along "
                         f"{axis_desc}, got shape {tuple(t.shape)}")


def check_inputs(x, weight, bias, residual, axes, groups, running: Optional[RunningStats],
                 renorm: Optional[Renorm], adjustment, training: bool, axis_desc: str) -> int:
    """Raises a clear TypeError/ValueError for bad arguments; returns the channel count K."""
    _check_floating("input", x)
    if x.dim() < 2:
        raise ValueError(f"input must have rank >= 2 (a batch dimension and channels), got shape "
                         f"{tuple(x.shape)}")
    K = math.prod([x.shape[a] for a in axes])
    for name, t in (("weight", weight), ("bias", bias)):
        _check_channel_tensor(name, t, x, K, axis_desc)
    if running is not None:
        _check_channel_tensor("running_mean", running.mean, x, K, axis_desc)
        _check_channel_tensor("running_var", running.var, x, K, axis_desc)
        _check_channel_tensor("moving_stddev", running.moving_stddev, x, K, axis_desc)
        if running.convention not in ("torch", "keras"):
            raise ValueError(f"convention must be 'torch' or 'keras', got {running.convention!r}")
        if running.momentum is None:
            if running.convention != "torch" or running.num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative moving average) needs the torch "
                                 "convention and a num_batches_tracked tensor")
        elif not 0.0 <= float(running.momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {running.momentum}")
    if residual is not None:
        _check_floating("residual", residual)
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(f"residual must match the input's shape {tuple(x.shape)} and device "
                             f"{x.device}, got {tuple(residual.shape)} on {residual.device}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups (the number of ghost batches) must be a positive int, got "
                         f"{groups!r}")
    if groups > 1 and training:
        if 0 in axes:
            raise ValueError("groups > 1 (ghost batches) needs the batch axis 0 not to be a "
                             f"channel axis, got {axis_desc}")
        if x.shape[0] % groups:
            raise ValueError(f"groups={groups} (ghost batches) must divide the batch size "
                             f"{x.shape[0]}")
    if renorm is not None:
        if renorm.style == "keras":
            if renorm.mean is None or renorm.stddev is None or running is None \
                    or running.moving_stddev is None:
                raise ValueError("keras-style renorm needs renorm_mean, renorm_stddev and "
                                 "moving_stddev")
            _check_channel_tensor("renorm_mean", renorm.mean, x, K, axis_desc)
            _check_channel_tensor("renorm_stddev", renorm.stddev, x, K, axis_desc)
        elif renorm.style == "torch":
            if running is None:
                raise ValueError("renorm needs running statistics (track_running_stats=True)")
        else:
            raise ValueError(f"renorm style must be 'keras' or 'torch', got {renorm.style!r}")
        if renorm.rmin is not None and renorm.rmax is not None and renorm.rmin > renorm.rmax:
            raise ValueError(f"rmin={renorm.rmin} must not exceed rmax={renorm.rmax}")
    if adjustment is not None:
        a_scale, a_bias = adjustment
        _check_channel_tensor("adjustment scale", a_scale, x, K, axis_desc)
        _check_channel_tensor("adjustment bias", a_bias, x, K, axis_desc)
    return K


def check_values_per_channel(x: torch.Tensor, axes: Sequence[int]) -> None:
    """torch's training-mode rule: batch statistics need more than one value per channel."""
    if math.prod([x.shape[d] for d in range(x.dim()) if d not in axes]) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {x.size()}")


def _contiguous_state(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is not None and not t.is_contiguous():
        raise ValueError("running statistics and other state tensors must be contiguous, they "
                         "are updated in place")
    return t


def normalize(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    axis: int | Sequence[int] = 1,
    training: bool = True,
    eps: float = 1e-5,
    running: Optional[RunningStats] = None,
    groups: int = 1,
    renorm: Optional[Renorm] = None,
    adjustment: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Batch normalization over every dimension except ``axis`` (an int or a list).

    training=True: batch statistics (per ghost batch when groups > 1, Keras's strided ghost
    batches), running statistics updated in place on the device; training=False: the running
    statistics. Parameter-like tensors are 1-D with one value per channel (channels flattened in
    axis order). ``activation`` may be None or "relu", applied after adding ``residual``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    axes = normalize_axes(axis, x.dim())
    axis_desc = f"axis={axis}"
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    check_inputs(x, weight, bias, residual, axes, groups, running, renorm, adjustment, training,
                 axis_desc)
    if not training:
        if running is None:
            raise ValueError("running_mean and running_var must be given in inference mode "
                             "(training=False)")
        groups, renorm, adjustment = 1, None, None
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")

    if running is not None:
        keras = running.convention == "keras"
        momentum = 1.0 - float(running.momentum) if keras else (
            0.0 if running.momentum is None else float(running.momentum))
        cumulative = running.momentum is None
        rm, rv = _contiguous_state(running.mean), _contiguous_state(running.var)
        nbt, mstd = running.num_batches_tracked, _contiguous_state(running.moving_stddev)
        unbiased = running.unbiased
    else:
        momentum, cumulative, rm, rv, nbt, mstd, unbiased = 0.0, False, None, None, None, None, False
    renorm_mode, renorm_momentum, rmin, rmax, dmax = RENORM_NONE, 0.0, None, None, None
    r_mean = r_std = None
    if renorm is not None:
        renorm_mode = RENORM_KERAS if renorm.style == "keras" else RENORM_TORCH
        renorm_momentum = 1.0 - float(renorm.momentum)
        rmin, rmax, dmax = renorm.rmin, renorm.rmax, renorm.dmax
        r_mean, r_std = _contiguous_state(renorm.mean), _contiguous_state(renorm.stddev)
    a_scale, a_bias = adjustment if adjustment is not None else (None, None)
    if a_scale is not None:
        a_scale, a_bias = a_scale.detach().contiguous(), a_bias.detach().contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    cfg = NormConfig(axes=axes, groups=groups, training=bool(training), eps=float(eps),
                     momentum=momentum, cumulative=cumulative, unbiased=bool(unbiased),
                     update_running=training and rm is not None, renorm=renorm_mode,
                     renorm_momentum=renorm_momentum, rmin=rmin, rmax=rmax, dmax=dmax,
                     relu=activation == "relu")
    return BatchNormFunction.run(x, weight, bias, residual, a_scale, a_bias, rm, rv, nbt,
                                   r_mean, r_std, mstd, cfg)


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int | Sequence[int] = 1,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` on the Triton kernels, plus ``axis``.

    PyTorch momentum convention and unbiased running variance; running statistics may be None
    (then training must be True) and are updated in place, on the device, without a host sync.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    axes = normalize_axes(axis, input.dim())
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if training and input.numel() > 0:
        check_values_per_channel(input, axes)
    running = None
    if running_mean is not None:
        running = RunningStats(running_mean, running_var, momentum=momentum, convention="torch",
                               unbiased=True)
    return normalize(input, weight, bias, axis=axes, training=training, eps=eps, running=running)
