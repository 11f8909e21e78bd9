"""The autograd wiring and the functional API.

``normalize`` is the one entry every layer uses (Keras layer, PyTorch modules, sync BN): it checks
the arguments (before anything changes), then runs ``BatchNormFunction``, a torch.autograd.Function
over the kernels. ``batch_norm`` is ``torch.nn.functional.batch_norm``'s contract plus ``axis``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.autograd import forward_ad

from . import (
    custom_ops,  # noqa: F401  (registers the triton_bn:: operators for torch.compile)
    ops,
    persistent,
)
from .layout import normalize_axes
from .ops import RENORM_KERAS, RENORM_NONE, RENORM_TORCH

__all__ = ["ArgumentError", "ArgumentTypeError", "BatchNormFunction", "InputTypeError", "NormConfig",
           "RankError", "Renorm", "RunningStats", "batch_norm", "normalize"]


@dataclass
class RunningStats:
    """Moving statistics to update in place during training (and to use in inference).

    convention "torch": new = (1 - momentum) * old + momentum * batch; momentum=None is the
    cumulative average 1/num_batches_tracked (read on the device, so ``num_batches_tracked`` must be
    incremented before the call, as torch's modules do). convention "keras":
    new = old * momentum + batch * (1 - momentum).
    unbiased: the variance fed to ``var`` is n/(n-1) times the batch (biased) variance.
    moving_stddev: Keras renorm's extra state (then ``var`` := relu(moving_stddev**2 - eps)).
    count_batch: a training call adds 1 to ``num_batches_tracked`` itself, on the device (torch's
    modules' count); momentum=None then averages over the count including this batch.
    """

    mean: torch.Tensor
    var: torch.Tensor
    momentum: Optional[float] = 0.1
    convention: str = "torch"
    unbiased: bool = True
    num_batches_tracked: Optional[torch.Tensor] = None
    moving_stddev: Optional[torch.Tensor] = None
    count_batch: bool = False


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
    count_batch: bool = False  # the kernels add 1 to num_batches_tracked (training)


def _forward(x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
             num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg: NormConfig,
             sync, keep_stats: bool = True, memo: Optional[dict] = None):
    """(y, centre, offset, rstd, pre_scale, pre_shift, cut, global_count) from the kernels (or the
    custom operators while tracing; see ``ops.ForwardResult``: centre is None where it is x's
    pivot, offset None where it is 0); the statistics are None for an empty, unsynchronized
    input."""
    if x.numel() == 0 and sync is None:
        if cfg.count_batch and num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # no kernel runs to count the (empty) batch
        return torch.empty_like(x), None, None, None, None, None, None, None
    state = (running_mean, running_var, num_batches_tracked, renorm_mean, renorm_stddev,
             moving_stddev)
    kw = {"groups": cfg.groups, "training": cfg.training, "eps": cfg.eps,
          "momentum": cfg.momentum, "cumulative": cfg.cumulative, "unbiased": cfg.unbiased,
          "update_running": cfg.update_running, "renorm": cfg.renorm,
          "renorm_momentum": cfg.renorm_momentum, "rmin": cfg.rmin, "rmax": cfg.rmax,
          "dmax": cfg.dmax, "relu": cfg.relu, "count_batch": cfg.count_batch}
    if _traced(x):
        y, centre, offset, rstd, pre_scale, pre_shift, cut = torch.ops.triton_bn.bn_forward(
            x, weight, bias, residual, adj_scale, adj_bias, *state, axes=list(cfg.axes), **kw)
        has_pre_affine = cfg.training and ops.saves_pre_affine(cfg.renorm, adj_scale is not None)
        pre_scale, pre_shift = (pre_scale, pre_shift) if has_pre_affine else (None, None)
        centre, offset = (None, offset) if cfg.training else (centre, None)
        if not ops.saves_cut(cfg.training, False, cfg.relu, residual is not None):
            cut = None
        return y, centre, offset, rstd, pre_scale, pre_shift, cut, None
    global_moments = global_count = None
    if sync is not None:
        global_moments = sync.exchange(x, cfg.axes, cfg.groups)
        global_count = global_moments[2].sum().reshape(1)
    r = ops.bn_forward(x, weight, bias, *state, adj_scale, adj_bias, residual, axes=cfg.axes,
                       global_moments=global_moments, keep_stats=keep_stats, memo=memo, **kw)
    return r.y, r.centre, r.offset, r.rstd, r.pre_scale, r.pre_shift, r.cut, global_count


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _traced(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _wrapped(t: Optional[torch.Tensor]) -> bool:
    """A functorch wrapper (vmap's BatchedTensor, torch.func.grad's) or the legacy batched
    tensor of ``is_grads_batched``: the kernels cannot read its storage."""
    return t is not None and (torch._C._functorch.is_functorch_wrapped_tensor(t)
                              or torch._C._functorch.is_legacy_batchedtensor(t))


def _backward(ctx, dy: torch.Tensor) -> tuple:
    """(dx, dweight, dbias, dresidual). The kernels for an ordinary backward; differentiable
    torch operations when grad mode is on inside backward (``create_graph=True``: double
    backward) or when dy / x are functorch wrappers (vmap over the backward: ``jacrev``,
    ``is_grads_batched``, gradcheck's batched check)."""
    need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
    need_z = need_z and not ctx.gated  # else the gate node gives the residual's gradient
    saved = ctx.saved_tensors
    x, weight, bias, mask_from, centre, offset, rstd, pre_scale, pre_shift, _ = saved
    cfg = ctx.cfg
    if rstd is None:  # empty input: every gradient is zero
        w_like = weight if weight is not None else dy.new_empty(0)
        return (torch.zeros_like(dy) if need_x else None,
                torch.zeros_like(w_like) if need_w else None,
                dy.new_zeros(ctx.bias_shape, dtype=ctx.param_dtypes[1]) if need_b else None,
                torch.zeros_like(dy) if need_z else None)
    if _traced(dy):  # torch.compile (which has no double backward) or a tensor subclass
        grads = torch.ops.triton_bn.bn_backward(
            dy, *saved, axes=list(cfg.axes),
            groups=cfg.groups, training=cfg.training, relu=cfg.relu, need_dx=need_x,
            need_dweight=need_w, need_dbias=need_b, need_dresidual=need_z)
        dx, dw, db, dz = [g if need else None for g, need in zip(grads, (need_x, need_w, need_b, need_z))]
        if need_z and not cfg.relu:
            dz = dy  # d(y + z)/dz without an activation (the operator may not alias dy)
    elif torch.is_grad_enabled() or _wrapped(dy) or _wrapped(x):
        if ctx.sync is not None:
            raise RuntimeError(
                "triton_bn: double backward (create_graph=True) and functorch transforms of the "
                "backward are not supported through synchronized batch norm (SyncBatchNorm / "
                "sync_normalize with more than one process)")
        dx, dw, db, dz = _torch_backward(dy, saved, cfg, torch.is_grad_enabled(),
                                         (need_x, need_w, need_b, need_z))
    else:
        planned = None
        if ctx.memo is not None and ctx.sync is None and not persistent.requested():
            planned = ops.backward_memo(ctx.memo, dy, cfg.relu, mask_from is not None, need_x,
                                        need_w, need_b, need_z).get("planned_backward")
        sync = {} if ctx.sync is None else {"all_reduce": ctx.sync.all_reduce,
                                            "global_count": ctx.global_count}
        if planned is not None:  # planned by an earlier call of the layer
            dx, dw, db, dz = planned.run(dy, *saved, need_x, need_z, cfg.relu)
        else:
            dx, dw, db, dz = ops.bn_backward(
                dy, *saved, axes=cfg.axes,
                groups=cfg.groups, training=cfg.training, relu=cfg.relu, need_dx=need_x,
                need_dweight=need_w, need_dbias=need_b, need_dresidual=need_z, memo=ctx.memo,
                **sync)
    w_dtype, b_dtype = ctx.param_dtypes
    if dw is not None and dw.dtype != w_dtype:
        dw = dw.to(w_dtype)
    if db is not None and db.dtype != b_dtype:
        db = db.to(b_dtype)
    return dx, dw, db, dz


class _Views:
    """The kernels' maths in plain torch operations (differentiable, vmappable): the activation
    as [V, G, ...] when there are ghost batches, and [S] / [K] per-channel tensors as
    broadcastable views of it (statistic channel s = g * K + k, as in ``layout``)."""

    def __init__(self, x: torch.Tensor, cfg: NormConfig) -> None:
        self.shape = tuple(x.shape)
        G = cfg.groups if cfg.training else 1
        nd = x.dim() + (G > 1)
        caxes = tuple(a + 1 for a in cfg.axes) if G > 1 else cfg.axes
        self.G, self.caxes = G, caxes
        gshape = (x.shape[0] // G, G) + self.shape[1:] if G > 1 else self.shape
        self.gshape = gshape
        self.red = tuple(d for d in range(nd) if d not in caxes and not (G > 1 and d == 1))
        self.red_all = tuple(d for d in range(nd) if d not in caxes)
        self.stat_shape = [gshape[d] if d in caxes or (G > 1 and d == 1) else 1
                           for d in range(nd)]
        self.param_shape = [gshape[d] if d in caxes else 1 for d in range(nd)]

    def act(self, t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        return None if t is None else t.to(dtype).reshape(self.gshape)

    def stat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.stat_shape)

    def centre(self, x: torch.Tensor, centre: Optional[torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
        """The forward's centres as a stat view (``ops.ForwardResult``): the saved ones, or x's
        pivots (each (ghost group, channel)'s first element; a constant shift: detached)."""
        if centre is not None:
            return self.stat(centre)
        pivot = self.act(x.detach(), dtype)
        for d in self.red:
            pivot = pivot.narrow(d, 0, 1)
        return pivot

    def xhat(self, x, centre, offset, rstd, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, rstd view) from the saved statistics: ((x - centre) - offset) * rstd."""
        xc = self.act(x, dtype) - self.centre(x, centre, dtype)
        if offset is not None:
            xc = xc - self.stat(offset)
        r = self.stat(rstd)
        return xc * r, r

    def param(self, t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        return None if t is None else t.to(dtype).reshape(self.param_shape)

    def out(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.shape).to(like.dtype)


def _relu_mask(v: _Views, saved, cfg, acc):
    """Where the fused ReLU passed its input, as a [V, G, ...] view like ``v.act``: not y <= 0,
    as torch's ReLU decides (threshold_backward: a NaN y passes the gradient). After a
    residual the saved slot of the residual holds the forward's output y itself (``_save``), and
    the mask is read from it. Without one, plain tensors: the kernels' own mask (the ReLU gate of
    ``ops.bn_backward`` on a gradient of ones), the forward's bit for bit wherever it runs: on a
    GPU the kernels' pre-activation is one fused multiply-add, which torch's multiply and add
    below would not reproduce to the last bit. Otherwise (functorch wrappers, tracing) the same
    expression in torch operations (``kernels.common.channel_coefficients``, ``mean_and_error``):
    y = (x - m) * scale + shift, m = c + o rounded once and its error e = (c + o) - m (TwoSum)
    folded into the shift, exact in Triton's CPU interpreter, which does not fuse either."""
    x, weight, bias, y, centre, offset, rstd, pre_scale, pre_shift, _ = saved
    if y is not None:
        return ~(v.act(y, acc) <= 0)
    plain = (torch.Tensor, torch.nn.Parameter)  # not a FakeTensor or another subclass
    if not torch.compiler.is_compiling() and all(
            type(t) in plain and not _wrapped(t) for t in saved if t is not None):
        with torch.no_grad():
            kept = ops.bn_backward(torch.ones_like(x), *saved, axes=cfg.axes, groups=cfg.groups,
                                   training=cfg.training, relu=True, need_dx=False,
                                   need_dweight=False, need_dbias=False, need_dresidual=True)[3]
        return v.act(kept, kept.dtype) > 0
    with torch.no_grad():
        multiplier = torch.ones((), dtype=acc, device=x.device)
        shift = torch.zeros((), dtype=acc, device=x.device)
        if cfg.training and pre_scale is not None:
            multiplier, shift = v.param(pre_scale, acc), v.param(pre_shift, acc)
        if weight is not None:
            w = v.param(weight, acc)
            multiplier, shift = multiplier * w, shift * w
        if bias is not None:
            shift = shift + v.param(bias, acc)
        scale = v.stat(rstd) * multiplier
        mean = v.centre(x, centre, acc)
        if offset is not None:
            o = v.stat(offset)
            c, mean = mean, mean + o
            t = mean - c
            shift = shift - ((c - (mean - t)) + (o - t)) * scale
        return ~((v.act(x, acc) - mean) * scale + shift <= 0)


def _torch_backward(dy, saved, cfg: NormConfig, recompute: bool, needs) -> tuple:
    """The backward in torch operations. ``recompute``: the batch statistics are recomputed
    from x so that the gradients are differentiable functions of x (double backward); the
    renorm r, d and the adjustment stay constants, as in the forward."""
    need_x, need_w, need_b, need_z = needs
    x, weight, bias, _, centre, offset, rstd, pre_scale, pre_shift, _ = saved
    acc = rstd.dtype
    v = _Views(x, cfg)
    xa, g = v.act(x, acc), v.act(dy, acc)
    if cfg.relu:
        g = torch.where(_relu_mask(v, saved, cfg, acc), g, 0.0)
    dz = v.out(g, dy) if need_z else None
    if cfg.training and recompute:
        m = xa.mean(dim=v.red, keepdim=True)
        r = torch.rsqrt(((xa - m) ** 2).mean(dim=v.red, keepdim=True) + cfg.eps)
        xhat = (xa - m) * r
    else:
        xhat, r = v.xhat(x, centre, offset, rstd, acc)
    gs = v.param(pre_scale, acc) if cfg.training else None
    gh = v.param(pre_shift, acc) if cfg.training else None
    dw = db = dx = None
    if need_b:
        db = g.sum(dim=v.red_all)
    if need_w:
        u = xhat if gs is None else xhat * gs + gh
        dw = (g * u).sum(dim=v.red_all).reshape(-1)
    if need_x:
        dxhat = g if weight is None else g * v.param(weight, acc)
        if gs is not None:
            dxhat = dxhat * gs
        if cfg.training:
            dxhat = dxhat - dxhat.mean(dim=v.red, keepdim=True) \
                - xhat * (dxhat * xhat).mean(dim=v.red, keepdim=True)
        dx = v.out(dxhat * r, x)
    if db is not None:
        db = db.reshape(-1)
    return dx, dw, db, dz


def _jvp(ctx, tx, tw, tb, tz) -> torch.Tensor:
    """Forward-mode derivative of y from the input tangents (r, d and the adjustment constant)."""
    saved = ctx.saved_tensors
    x, weight, bias, _, centre, offset, rstd, pre_scale, pre_shift, _ = saved
    cfg = ctx.cfg
    if rstd is None:
        return torch.zeros_like(x)
    if ctx.sync is not None:
        raise RuntimeError("triton_bn: forward-mode AD is not supported through synchronized "
                           "batch norm (more than one process)")
    acc = rstd.dtype
    v = _Views(x, cfg)
    xhat, r = v.xhat(x, centre, offset, rstd, acc)
    gs = v.param(pre_scale, acc) if cfg.training else None
    gh = v.param(pre_shift, acc) if cfg.training else None
    t = torch.zeros_like(xhat)
    if tx is not None:
        ta = v.act(tx, acc)
        if cfg.training:
            ta = ta - ta.mean(dim=v.red, keepdim=True) \
                - xhat * (ta * xhat).mean(dim=v.red, keepdim=True)
        t = ta * r
        if gs is not None:
            t = t * gs
        if weight is not None:
            t = t * v.param(weight, acc)
    if tw is not None:
        t = t + (xhat if gs is None else xhat * gs + gh) * v.param(tw, acc)
    if tb is not None:
        t = t + v.param(tb, acc)
    if tz is not None:
        t = t + v.act(tz, acc)
    if cfg.relu:
        t = torch.where(_relu_mask(v, saved, cfg, acc), t, 0.0)
    return v.out(t, x)


def _save(ctx, inputs, outs, sync, gated: bool = False, memo: Optional[dict] = None) -> tuple:
    """Saves for backward x, the parameters (by reference; beta only for the ReLU mask), the
    output y where a residual was added before the ReLU (the mask: not y <= 0; torch's ReLU saves
    its output for the same reason; the residual itself is not needed) and the per-channel
    statistics (8 bytes per channel, as torch's batch norm, and the ReLU's cuts: see
    ``ops.ForwardResult``); returns
    the saved tuple. ``gated``: the ReLU and the residual's gradient belong to a
    _ReluGateFunction node after this one, whose backward hands this one the gated gradient:
    the batch norm's backward alone here (no ReLU, no residual)."""
    x, weight, bias, residual = inputs[:4]
    cfg = inputs[12]
    y, centre, offset, rstd, pre_scale, pre_shift, cut, global_count = outs
    if gated:
        cfg, residual = dataclasses.replace(cfg, relu=False), None
    ctx.cfg, ctx.sync, ctx.global_count, ctx.gated = cfg, sync, global_count, gated
    ctx.memo = memo  # the layer's plan (ops.call_memo), or None
    ctx.param_dtypes = (weight.dtype if weight is not None else None,
                        bias.dtype if bias is not None else None)
    ctx.bias_shape = bias.shape if bias is not None else (0,)
    mask_from = y if cfg.relu and residual is not None else None
    saved = (x, weight, bias if cfg.relu else None, mask_from, centre, offset, rstd, pre_scale,
             pre_shift, cut)
    ctx.save_for_backward(*saved)
    return saved


class BatchNormFunction(torch.autograd.Function):
    """y = act(batch_norm(x) [+ residual]); gradients for x, weight, bias and residual.

    Eager mode calls the launch helpers in ``ops`` directly; while torch.compile traces (or for
    tensor subclasses such as FakeTensor) it calls the ``triton_bn::`` custom operators instead,
    so the graph has no breaks. ``sync`` (see ``distributed.ProcessGroupSync``: ``exchange(x, axes,
    groups)`` gives every process's (mean [P, S], M2 [P, S], count [P]) and ``all_reduce(t)`` sums
    in place) makes the batch statistics those of all processes; dweight/dbias stay local.

    Backward runs the kernels, or differentiable torch operations under ``create_graph=True``
    (double backward). Under torch.func transforms and forward-mode AD ``run`` uses
    ``TransformBatchNormFunction`` (setup_context, jvp and vmap rules) instead.
    """

    @staticmethod
    def run(x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
            num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg: NormConfig,
            sync=None, memo: Optional[dict] = None):
        """``apply`` with ``sync`` (``distributed.ProcessGroupSync`` or None) in training outside
        torch.compile (a synchronized call is a graph break, see ``distributed``). ``memo``: the
        calling layer's plan for this call signature (``ops.call_memo``), or None."""
        if torch.compiler.is_compiling() or not cfg.training:
            sync = None
        if not torch.compiler.is_compiling():
            # torch.func transforms and forward-mode AD need the setup_context/jvp/vmap form
            # (which Dynamo cannot trace, so torch.compile keeps this class)
            if torch._C._functorch.peek_interpreter_stack() is not None \
                    or forward_ad._current_level >= 0:
                if sync is not None:
                    raise RuntimeError(
                        "triton_bn: torch.func transforms (vmap, grad, jvp, jacrev, ...) and "
                        "forward-mode AD are not supported through synchronized batch norm (more "
                        "than one process)")
                return TransformBatchNormFunction.apply(
                    x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
                    num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg, None)[0]
            if not (torch.is_grad_enabled() and _needs_grad(x, weight, bias, residual)):
                # nothing to differentiate (inference, no_grad): no autograd node to build
                return _forward(x, weight, bias, residual, adj_scale, adj_bias, running_mean,
                                running_var, num_batches_tracked, renorm_mean, renorm_stddev,
                                moving_stddev, cfg, sync, keep_stats=False)[0]
            if cfg.relu and residual is not None and residual.requires_grad and x.numel() \
                    and BatchNormFunction.gate_residual:
                gate: list = []
                y = BatchNormFunction.apply(x, weight, bias, residual, adj_scale, adj_bias,
                                            running_mean, running_var, num_batches_tracked,
                                            renorm_mean, renorm_stddev, moving_stddev, cfg, sync,
                                            memo, gate)
                # the mask's inputs as constants (no graph edges to x, weight, bias: their
                # gradients come from the batch norm's node alone)
                consts = [None if t is None else t.detach() for t in (x, weight, bias)]
                return _ReluGateFunction.apply(y, residual, *consts, *gate, cfg)
        else:
            memo = None
        return BatchNormFunction.apply(x, weight, bias, residual, adj_scale, adj_bias,
                                       running_mean, running_var, num_batches_tracked,
                                       renorm_mean, renorm_stddev, moving_stddev, cfg, sync, memo)

    gate_residual = True  # see run: the backward of BN + add + ReLU as two nodes

    @staticmethod
    def forward(ctx, x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
                num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg: NormConfig,
                sync=None, memo=None, gate=None):
        inputs = (x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
                  num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg)
        memo = None if _traced(x) else memo
        planned = memo.get("planned_forward") if memo is not None else None
        if planned is not None and not persistent.requested():  # planned by an earlier call
            outs = (*planned.run(x, weight, bias, residual, running_mean, running_var,
                                 num_batches_tracked), None)
        else:
            outs = _forward(*inputs, sync, memo=memo)
        _save(ctx, inputs, outs, sync, gated=gate is not None, memo=memo)
        if gate is not None:  # what _ReluGateFunction needs for the mask
            gate.extend(outs[1:6])
        return outs[0]

    @staticmethod
    def backward(ctx, dy):
        return (*_backward(ctx, dy), *([None] * 12))


class _ReluGateFunction(torch.autograd.Function):
    """The ReLU and the residual add of a fused BN + add + ReLU layer as their own autograd node:
    forward passes y through (the fused kernel computed it); backward gives the gated gradient
    g = dy except where y <= 0 (a NaN y passes it), read from the saved y as torch's ReluBackward
    reads its output, to both the batch norm's node and the residual (as torch's ReluBackward and
    AddBackward do). One node
    would hold dy, dx and the residual's gradient at once, plus dweight and dbias; here dy is
    freed before the batch norm's backward runs on g, so a step's peak holds no more than
    torch's (perf/README, fuse_memory). Activation passes: 8, as torch's (the gate reads y and
    dy and writes g; the batch norm reads x and g twice and writes dx), one launch more than the
    single node. ``BatchNormFunction.gate_residual = False`` keeps the single node."""

    @staticmethod
    def forward(ctx, y, residual, x, weight, bias, centre, offset, rstd, pre_scale, pre_shift, cfg):
        # y in the slot the batch norm's own backward reads the mask from (_save, _relu_mask);
        # no cut (the mask is read from y)
        ctx.save_for_backward(x, weight, bias, y, centre, offset, rstd, pre_scale, pre_shift,
                              None)
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x, cfg = saved[0], ctx.cfg
        if torch.is_grad_enabled() or _wrapped(dy) or _wrapped(x):  # double backward, functorch
            v, acc = _Views(x, cfg), saved[6].dtype
            g = v.out(torch.where(_relu_mask(v, saved, cfg, acc), v.act(dy, acc), 0.0), dy)
        else:
            kw = dict(axes=cfg.axes, groups=cfg.groups, training=cfg.training, relu=True,
                      need_dx=False, need_dweight=False, need_dbias=False, need_dresidual=True)
            if _traced(dy):
                g = torch.ops.triton_bn.bn_backward(dy, *saved, **{**kw, "axes": list(cfg.axes)})[3]
            else:
                g = ops.bn_backward(dy, *saved, **kw)[3]
        return g, g, *([None] * 9)


class TransformBatchNormFunction(torch.autograd.Function):
    """``BatchNormFunction`` for torch.func transforms and forward-mode AD (``setup_context``
    style, which they need; Dynamo cannot trace a custom ``jvp``, so torch.compile and the plain
    eager path use ``BatchNormFunction``): forward returns y and the saved statistics
    (non-differentiable outputs); the ``vmap`` rule runs each vmapped slice as an independent
    batch norm."""

    @staticmethod
    def forward(x, weight, bias, residual, adj_scale, adj_bias, running_mean, running_var,
                num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev, cfg, sync):
        return _forward(x, weight, bias, residual, adj_scale, adj_bias, running_mean,
                        running_var, num_batches_tracked, renorm_mean, renorm_stddev,
                        moving_stddev, cfg, sync)[:6]

    @staticmethod
    def setup_context(ctx, inputs, output):
        saved = _save(ctx, inputs, tuple(output) + (None, None), None)  # no cut, no count
        ctx.mark_non_differentiable(*[t for t in output[1:] if t is not None])
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, dy, *_):
        return (*_backward(ctx, dy), *([None] * 10))

    @staticmethod
    def jvp(ctx, tx, tw, tb, tz, *_):
        return (_jvp(ctx, tx, tw, tb, tz),) + (None,) * 5

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_rule(info, in_dims, *args)


_STATE_ARGS = range(6, 12)  # running_mean ... moving_stddev: updated in place in training


def _vmap_rule(info, in_dims, *args):
    """Each vmapped slice is an independent batch norm (torch's rule for batch_norm): slices
    of batched running statistics are updated in place; an unbatched input updates unbatched
    running statistics once; a batched input with unbatched running statistics in training is
    an error, as in torch. A batched input runs as one call (``_vmap_folded``) where it can,
    else one call per slice."""
    cfg: NormConfig = args[12]
    if cfg.update_running and in_dims[0] is not None and any(
            args[i] is not None and in_dims[i] is None for i in (6, 7, 9, 10, 11)):
        raise RuntimeError(
            "vmap: Batch norm got a batched tensor as input while the running_mean or "
            "running_var, which will be updated in place, were not batched. Batch the running "
            "statistics too, or use track_running_stats=False or eval mode (torch's rule)")
    folded = _vmap_folded(info.batch_size, in_dims, args)
    if folded is not None:
        return folded
    outs = []
    for i in range(info.batch_size):
        sliced = []
        copies = []
        for j, (a, d) in enumerate(zip(args[:12], in_dims[:12])):
            if d is not None:
                a = a.select(d, i)
                if j in _STATE_ARGS and not a.is_contiguous():
                    c = a.contiguous()
                    copies.append((a, c))
                    a = c
            sliced.append(a)
        c = cfg
        if i > 0 and cfg.update_running and in_dims[0] is None and all(
                in_dims[j] is None for j in _STATE_ARGS):
            c = dataclasses.replace(cfg, update_running=False)  # same input: update once
        outs.append(TransformBatchNormFunction.apply(*sliced, c, None))
        for a, copy in copies:
            a.copy_(copy)
    result, dims = [], []
    for k in range(len(outs[0])):
        parts = [o[k] for o in outs]
        if parts[0] is None:
            result.append(None)
            dims.append(None)
        else:
            result.append(torch.stack(parts))
            dims.append(0)
    return tuple(result), tuple(dims)


def _vmap_folded(B: int, in_dims, args):
    """A batched input as one kernel call: the vmapped dimension becomes a leading channel axis
    (statistic channel b * K + k), so the B batch norms run together. None when it does not fit
    (unbatched input, ghost batches, a batched cumulative counter): the caller loops then."""
    cfg: NormConfig = args[12]
    d = in_dims[0]
    if d is None or (cfg.training and cfg.groups > 1) or in_dims[8] is not None:
        return None
    x = args[0].movedim(d, 0)
    K = math.prod(x.shape[a + 1] for a in cfg.axes)
    flat, copies = [], []
    for j in range(1, 12):
        t, e = args[j], in_dims[j]
        if t is None or j == 8:  # absent, or the (unbatched) num_batches_tracked
            flat.append(t)
        elif j == 3:  # the residual, activation-shaped
            flat.append(t.movedim(e, 0) if e is not None else t.expand((B,) + tuple(t.shape)))
        elif e is None:  # read-only per-channel tensor shared by the slices
            flat.append(t.expand(B, K).reshape(B * K))
        else:
            tb = t.movedim(e, 0)
            if j in _STATE_ARGS and not tb.is_contiguous():  # updated through a copy
                c = tb.contiguous()
                copies.append((tb, c))
                tb = c
            flat.append(tb.reshape(B * K))
    fcfg = dataclasses.replace(cfg, axes=(0,) + tuple(a + 1 for a in cfg.axes))
    outs = TransformBatchNormFunction.apply(x, *flat, fcfg, None)
    for original, copy in copies:
        original.copy_(copy)
    # per slice: [S] tensors are [B * K] -> [B, K] (the pivots of a slice are those of its
    # channels in the folded call: the same elements of x)
    result = (outs[0],) + tuple(None if t is None else t.reshape(B, -1) for t in outs[1:])
    return result, tuple(None if t is None else 0 for t in result)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value (a size, shape or device): a ValueError, and also the RuntimeError
    torch's batch norm raises for the same input, so code written for either catches it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A parameter or statistic of the wrong dtype: a TypeError, and the RuntimeError torch
    raises ("mixed dtype", "expected scalar type")."""


class InputTypeError(TypeError, NotImplementedError):
    """An input dtype the kernels do not support (integers, complex): a TypeError, and the
    NotImplementedError torch raises ('"batch_norm" not implemented for ...')."""


class RankError(ArgumentError, IndexError):
    """An input of rank < 2 (no channel dimension): torch raises RuntimeError or IndexError."""


_HALF = (torch.float16, torch.bfloat16)


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ops.FLOAT_DTYPES:
        cls = InputTypeError if name == "input" else ArgumentTypeError
        raise cls(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got "
                  f"{t.dtype} (\"batch_norm\" not implemented for it)")


def _check_channel_tensor(name: str, t: Optional[torch.Tensor], x: torch.Tensor, K: int,
                          axis_desc: str, torch_dtypes: bool = False) -> None:
    if t is None:
        return
    _check_floating(name, t)
    if t.device != x.device:
        raise ArgumentError(f"{name} is on {t.device} but input is on {x.device}; move them to "
                            "the same device")
    if t.dim() != 1 or t.numel() != K:
        raise ArgumentError(f"{name} should contain {K} elements not {t.numel()}: it must have "
                            f"shape ({K},), one value per channel along {axis_desc}; got shape "
                            f"{tuple(t.shape)}")
    if torch_dtypes and t.dtype != x.dtype and not (x.dtype in _HALF and t.dtype == torch.float32):
        raise ArgumentTypeError(
            f"mixed dtype: {name} is {t.dtype} but the input is {x.dtype}; as torch's batch norm, "
            "parameters and running statistics must have the input's dtype, or float32 for a "
            "float16/bfloat16 input")


def check_inputs(x, weight, bias, residual, axes, groups, running: Optional[RunningStats],
                 renorm: Optional[Renorm], adjustment, training: bool, axis_desc: str,
                 torch_dtypes: bool = False) -> int:
    """Raises a clear exception for bad arguments (TypeError/ValueError, dual-typed with torch's
    RuntimeError where torch raises that); returns the channel count K. ``torch_dtypes``: torch's
    rule for mixed dtypes (the drop-ins and ``batch_norm``)."""
    _check_floating("input", x)
    if x.dim() < 2:
        raise RankError(f"input must have rank >= 2 (a batch dimension and channels), got shape "
                        f"{tuple(x.shape)}")
    K = math.prod([x.shape[a] for a in axes])
    for name, t in (("weight", weight), ("bias", bias)):
        _check_channel_tensor(name, t, x, K, axis_desc, torch_dtypes)
    if running is not None:
        _check_channel_tensor("running_mean", running.mean, x, K, axis_desc, torch_dtypes)
        _check_channel_tensor("running_var", running.var, x, K, axis_desc, torch_dtypes)
        _check_channel_tensor("moving_stddev", running.moving_stddev, x, K, axis_desc)
        if running.convention not in ("torch", "keras"):
            raise ValueError(f"convention must be 'torch' or 'keras', got {running.convention!r}")
        if running.momentum is None and (running.convention != "torch"
                                         or running.num_batches_tracked is None):
            raise ValueError("momentum=None (cumulative moving average) needs the torch "
                             "convention and a num_batches_tracked tensor")
    if residual is not None:
        _check_floating("residual", residual)
        if residual.shape != x.shape or residual.device != x.device:
            raise ArgumentError(f"residual must match the input's shape {tuple(x.shape)} and "
                                f"device {x.device}, got {tuple(residual.shape)} on "
                                f"{residual.device}")
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


def check_torch_eps(eps, training: bool) -> None:
    """torch.nn.functional.batch_norm's rule (and wording): eps > 0 when the batch statistics
    are used, eps >= 0 otherwise."""
    if not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


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
    sync=None,
) -> torch.Tensor:
    """Batch normalization over every dimension except ``axis`` (an int or a list).

    training=True: batch statistics (per ghost batch when groups > 1, Keras's strided ghost
    batches), running statistics updated in place on the device; training=False: the running
    statistics. Parameter-like tensors are 1-D with one value per channel (channels flattened in
    axis order). ``activation`` may be None or "relu", applied after adding ``residual``.
    ``sync``: the collectives of synchronized batch norm (``distributed.ProcessGroupSync``; use
    ``distributed.sync_normalize``), or None.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    axes = normalize_axes(axis, x.dim())
    axis_desc = f"axis={axis}"
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    check_inputs(x, weight, bias, residual, axes, groups, running, renorm, adjustment, training,
                 axis_desc)
    if not training and running is None:
        raise ArgumentError("running_mean and running_var must be given in inference mode "
                            "(training=False): running_mean must be defined in evaluation mode")
    if training and running is not None and running.momentum is not None \
            and not 0.0 <= float(running.momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {running.momentum}")
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return apply_checked(x, weight, bias, axes, training, eps, running, groups, renorm,
                         adjustment, residual, activation == "relu", sync)


def apply_checked(x, weight, bias, axes: tuple, training: bool, eps: float,
                  running: Optional[RunningStats], groups: int, renorm: Optional[Renorm],
                  adjustment, residual, relu: bool, sync=None, planned: Optional[list] = None
                  ) -> torch.Tensor:
    """``normalize`` after its checks (the layers check with their own API's rules, then call
    this). Non-contiguous state tensors are updated through a contiguous copy, copied back.
    ``planned`` (a list): receives (cfg, running_mean, num_batches_tracked) as passed to
    ``BatchNormFunction.run`` when nothing was copied, so a layer can repeat the call directly."""
    if not training:
        groups, renorm, adjustment = 1, None, None
    copies = []
    if running is not None:
        keras = running.convention == "keras"
        momentum = 1.0 - float(running.momentum) if keras else (
            0.0 if running.momentum is None else float(running.momentum))
        cumulative = running.momentum is None
        rm = _contiguous_state(running.mean, copies)
        rv = _contiguous_state(running.var, copies)
        mstd = _contiguous_state(running.moving_stddev, copies)
        nbt, unbiased = running.num_batches_tracked, running.unbiased
    else:
        momentum, cumulative, rm, rv, nbt, mstd, unbiased = 0.0, False, None, None, None, None, False
    renorm_mode, renorm_momentum, rmin, rmax, dmax = RENORM_NONE, 0.0, None, None, None
    r_mean = r_std = None
    if renorm is not None:
        renorm_mode = RENORM_KERAS if renorm.style == "keras" else RENORM_TORCH
        renorm_momentum = 1.0 - float(renorm.momentum)
        rmin, rmax, dmax = renorm.rmin, renorm.rmax, renorm.dmax
        r_mean = _contiguous_state(renorm.mean, copies)
        r_std = _contiguous_state(renorm.stddev, copies)
    a_scale, a_bias = adjustment if adjustment is not None else (None, None)
    if a_scale is not None:
        a_scale, a_bias = a_scale.detach().contiguous(), a_bias.detach().contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    make_config = NormConfig if torch.compiler.is_compiling() else _norm_config  # (Dynamo: no lru)
    cfg = make_config(axes=axes, groups=groups, training=bool(training), eps=float(eps),
                     momentum=momentum, cumulative=cumulative, unbiased=bool(unbiased),
                     update_running=training and rm is not None, renorm=renorm_mode,
                     renorm_momentum=renorm_momentum, rmin=rmin, rmax=rmax, dmax=dmax,
                     relu=relu, count_batch=bool(training and running is not None
                                                 and running.count_batch and nbt is not None))
    y = BatchNormFunction.run(x, weight, bias, residual, a_scale, a_bias, rm, rv, nbt, r_mean,
                              r_std, mstd, cfg, sync)
    if planned is not None and not copies:
        planned.append((cfg, rm, nbt))
    for original, copy in copies:
        original.copy_(copy)
    return y


# one NormConfig per distinct set of values, reused (building the frozen dataclass costs more than
# looking it up, on every call)
_norm_config = functools.lru_cache(maxsize=1024)(NormConfig)


def _contiguous_state(t: Optional[torch.Tensor], copies: list) -> Optional[torch.Tensor]:
    """``t``, or a contiguous copy of it (noted in ``copies`` to be copied back after the call:
    torch updates non-contiguous running statistics in place too)."""
    if t is None or t.is_contiguous():
        return t
    c = t.contiguous()
    copies.append((t, c))
    return c


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
    torch's checks, in torch's order, with torch's exception types (see ``ArgumentError``).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        _check_floating("input", input)
        raise RankError(f"input must have rank >= 2 (a batch dimension and channels), got shape "
                        f"{tuple(input.shape)}")
    axes = normalize_axes(axis, input.dim())
    if training:
        check_values_per_channel(input, axes)
    check_torch_eps(eps, training)
    if (running_mean is None) != (running_var is None):
        msg = "running_mean and running_var must either both be None or neither be None"
        if training:
            raise ValueError(msg)
        raise ArgumentError(f"{msg} (running_mean and running_var must be defined in "
                            "evaluation mode)")
    if not training and running_mean is None:
        raise ArgumentError("running_mean must be defined in evaluation mode (training=False): "
                            "pass running_mean and running_var")
    if not isinstance(momentum, numbers.Real):
        raise TypeError(f"batch_norm(): argument 'momentum' must be float, not "
                        f"{type(momentum).__name__}")
    K = math.prod([input.shape[a] for a in axes])
    # torch checks the number of elements of weight and bias, not their shape
    if weight is not None and weight.dim() != 1 and weight.numel() == K:
        weight = weight.reshape(K)
    if bias is not None and bias.dim() != 1 and bias.numel() == K:
        bias = bias.reshape(K)
    running = None
    if running_mean is not None:
        running = RunningStats(running_mean, running_var, momentum=float(momentum),
                               convention="torch", unbiased=True)
    check_inputs(input, weight, bias, None, axes, 1, running, None, None, training,
                 f"axis={axis}", torch_dtypes=True)
    return apply_checked(input, weight, bias, axes, bool(training), eps, running, 1, None, None,
                         None, False)
