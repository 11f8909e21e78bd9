"""Plain PyTorch float64 maths of every semantic triton_bn implements: the tests' oracle.

Written for clarity, not speed: no Triton, no tricks. ``reference_batch_norm`` returns the output
(differentiable by autograd in float64, so gradients of the reference are the gradient oracle) and
the new values of every piece of state; it never modifies its arguments.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["reference_batch_norm"]


def _axes(axis: int | Sequence[int], ndim: int) -> list[int]:
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % ndim for a in axes)


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64) if not t.requires_grad \
        else t.to(torch.float64)


def reference_batch_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    axis: int | Sequence[int] = 1,
    training: bool = True,
    eps: float = 1e-5,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    momentum: Optional[float] = 0.1,
    convention: str = "torch",
    unbiased: bool = True,
    num_batches_tracked: Optional[int] = None,
    groups: int = 1,
    renorm: Optional[dict] = None,
    adjustment: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> tuple[torch.Tensor, dict]:
    """Float64 batch norm. Parameters/state are 1-D over the flattened channel axes.

    convention "torch": new = old + (batch - old) * momentum (momentum None: 1/num_batches_tracked,
    the count after this batch); "keras": new = old * momentum + batch * (1 - momentum).
    renorm: dict(style="keras"|"torch", rmin, rmax, dmax, momentum (Keras renorm_momentum),
    mean, stddev (Keras renorm_mean/renorm_stddev), moving_stddev (Keras)).
    Returns (y, state) with state holding the updated running_mean, running_var and, for Keras
    renorm, moving_stddev, renorm_mean, renorm_stddev (as float64).
    """
    x64 = x.to(torch.float64)
    nd = x.dim()
    axes = _axes(axis, nd)
    K = math.prod(x.shape[a] for a in axes)
    state: dict = {}
    rm, rv = _f64(running_mean), _f64(running_var)
    if rm is not None:
        state["running_mean"], state["running_var"] = rm.clone(), rv.clone()

    if not training or x.numel() == 0:
        if x.numel() == 0:
            return x64 * 1.0, state
        view = [x.shape[d] if d in axes else 1 for d in range(nd)]
        mean, var = rm.reshape(view), rv.reshape(view)
        y = (x64 - mean) / torch.sqrt(var + eps)
        if weight is not None:
            y = y * _f64(weight).reshape(view)
        if bias is not None:
            y = y + _f64(bias).reshape(view)
        return _activate(y, residual, activation), state

    # Keras ghost batches: [N, ...] -> [V, G, ...]; group g holds samples g, g+G, ...
    if groups > 1:
        xg = x64.reshape((x.shape[0] // groups, groups) + tuple(x.shape[1:]))
        caxes = [a + 1 for a in axes]
        red = [d for d in range(nd + 1) if d not in caxes and d != 1]
    else:
        xg, caxes = x64, axes
        red = [d for d in range(nd) if d not in caxes]
    view = [xg.shape[d] if d in caxes else 1 for d in range(xg.dim())]
    n = math.prod(xg.shape[d] for d in red)
    mean = xg.mean(dim=red, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=red, keepdim=True)
    x_hat = (xg - mean) / torch.sqrt(var + eps)
    # batch statistics per channel (mean over ghost groups of the means and biased variances)
    batch_mean = (mean.mean(dim=1) if groups > 1 else mean).reshape(K)
    batch_var = (var.mean(dim=1) if groups > 1 else var).reshape(K)
    batch_std = torch.sqrt(batch_var + eps)

    pre_scale = torch.ones(K, dtype=torch.float64, device=x.device)
    pre_shift = torch.zeros(K, dtype=torch.float64, device=x.device)
    if renorm is not None:
        if renorm.get("style", "keras") == "keras":
            ref_mean = _f64(renorm["mean"])
            ref_std = torch.clamp(_f64(renorm["stddev"]), min=math.sqrt(eps))
        else:
            ref_mean, ref_std = rm, torch.sqrt(rv + eps)
        r = (batch_std / ref_std).detach()
        d = ((batch_mean - ref_mean) / ref_std).detach()
        if renorm.get("rmin") is not None:
            r = torch.clamp(r, min=renorm["rmin"])
        if renorm.get("rmax") is not None:
            r = torch.clamp(r, max=renorm["rmax"])
        if renorm.get("dmax") is not None:
            d = torch.clamp(d, -renorm["dmax"], renorm["dmax"])
        pre_scale, pre_shift = r, d
    if adjustment is not None:
        a_scale, a_bias = (_f64(a).detach().reshape(K) for a in adjustment)
        pre_shift = pre_shift * a_scale + a_bias
        pre_scale = pre_scale * a_scale
    y = x_hat * pre_scale.reshape(view) + pre_shift.reshape(view)
    if weight is not None:
        y = y * _f64(weight).reshape(view)
    if bias is not None:
        y = y + _f64(bias).reshape(view)
    y = y.reshape(x.shape)

    if rm is not None:
        bm, bv = batch_mean.detach(), batch_var.detach()
        if convention == "keras":
            f = 1.0 - momentum
        else:
            f = 1.0 / num_batches_tracked if momentum is None else momentum
        state["running_mean"] = rm + (bm - rm) * f
        if renorm is not None and renorm.get("style", "keras") == "keras":
            rf = 1.0 - renorm["momentum"]
            bs = batch_std.detach()
            r_mean, r_std = _f64(renorm["mean"]), _f64(renorm["stddev"])
            mstd = _f64(renorm["moving_stddev"])
            state["renorm_mean"] = r_mean + (bm - r_mean) * rf
            state["renorm_stddev"] = r_std + (bs - r_std) * rf
            state["moving_stddev"] = mstd + (bs - mstd) * f
            state["running_var"] = torch.relu(state["moving_stddev"] ** 2 - eps)
        else:
            value = bv * (n / max(n - 1, 1)) if unbiased else bv
            state["running_var"] = rv + (value - rv) * f
    return _activate(y, residual, activation), state


def _activate(y: torch.Tensor, residual: Optional[torch.Tensor],
              activation: Optional[str]) -> torch.Tensor:
    if residual is not None:
        y = y + residual.to(torch.float64)
    if activation == "relu":
        y = torch.relu(y)
    return y
