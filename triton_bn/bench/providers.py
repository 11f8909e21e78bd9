"""The implementations a sweep compares, all as ``nn.Module`` s over the same initial state.

* ``triton_bn``: the drop-in modules ``triton_bn.BatchNorm1d/2d/3d``; for the Keras-only features
  ``KerasBatchNorm(impl="triton")`` (``triton_bn.normalize`` with renorm / ghost batches / adjustment).
* ``torch_eager``: ``nn.BatchNorm1d/2d`` (cuDNN or PyTorch's native kernels); for the Keras-only
  features, the same semantics written as plain PyTorch ops (``keras_batch_norm_torch``).
* ``torch_compile``: ``torch.compile`` of the torch_eager module.

``reference`` gives the float64 oracle (``triton_bn.reference``) of a case, which every provider's
output is checked against before it is timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import triton_bn
from triton_bn.functional import Renorm, RunningStats
from triton_bn.reference import reference_batch_norm

from .shapes import Case

__all__ = ["PROVIDERS", "BASELINE", "KerasBatchNorm", "keras_batch_norm_torch",
           "InitState", "make_init", "make_module", "reference", "KERAS_CONFIG"]

PROVIDERS = ("triton_bn", "torch_eager", "torch_compile")
BASELINE = "torch_eager"

# Keras-style settings of the Keras-only features: momentum (Keras convention), renorm clipping
# tight enough that r and d are clipped on the benchmark's random data.
KERAS_CONFIG = dict(momentum=0.99, renorm_momentum=0.99, rmin=0.8, rmax=1.25, dmax=0.5, eps=1e-3)
TORCH_EPS, TORCH_MOMENTUM = 1e-5, 0.1


@dataclass
class InitState:
    """fp32 per-channel tensors every provider's module starts from (clones of these)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    renorm_mean: torch.Tensor
    renorm_stddev: torch.Tensor
    moving_stddev: torch.Tensor
    adj_scale: torch.Tensor
    adj_bias: torch.Tensor


def make_init(case: Case, device: torch.device, generator: torch.Generator | None = None
              ) -> InitState:
    """Random, non-trivial parameters and state (never ones/zeros: they hide indexing mistakes)."""
    C = case.channels

    def r(lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(C, device=device, dtype=torch.float32, generator=generator)
        return lo + (hi - lo) * u

    var = r(0.5, 2.5)
    return InitState(weight=r(0.5, 1.5), bias=r(-0.5, 0.5), running_mean=r(-0.3, 0.3),
                     running_var=var, renorm_mean=r(-0.2, 1.0), renorm_stddev=r(0.8, 2.8),
                     moving_stddev=var.sqrt(), adj_scale=r(0.7, 1.3), adj_bias=r(-0.2, 0.2))


def keras_batch_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, *, eps: float, momentum: float, groups: int = 1,
    renorm: bool = False, renorm_mean: Optional[torch.Tensor] = None,
    renorm_stddev: Optional[torch.Tensor] = None, moving_stddev: Optional[torch.Tensor] = None,
    renorm_momentum: float = 0.99, rmin: Optional[float] = None, rmax: Optional[float] = None,
    dmax: Optional[float] = None, adj_scale: Optional[torch.Tensor] = None,
    adj_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """tf.keras BatchNormalization's training step in plain PyTorch ops (channels on dim 1).

    Statistics and math in fp32, output in x's dtype; moving statistics updated in place with
    Keras's momentum convention and the biased variance; renorm with clipping (r, d constant for
    autograd), ghost batches (sample n in ghost batch n % groups) and adjustment.
    """
    C = x.shape[1]
    xf = x.float()
    if groups > 1:
        xf = xf.reshape((x.shape[0] // groups, groups) + tuple(x.shape[1:]))
        red = [0] + list(range(3, xf.dim()))
        view = (1, 1, C) + (1,) * (xf.dim() - 3)
    else:
        red = [0] + list(range(2, xf.dim()))
        view = (1, C) + (1,) * (xf.dim() - 2)
    var, mean = torch.var_mean(xf, dim=red, correction=0, keepdim=True)
    x_hat = (xf - mean) * torch.rsqrt(var + eps)
    batch_mean = mean.detach().reshape(-1, C).mean(0)
    batch_var = var.detach().reshape(-1, C).mean(0)
    if renorm:
        batch_std = torch.sqrt(batch_var + eps)
        ref_std = renorm_stddev.clamp(min=math.sqrt(eps))
        r = batch_std / ref_std
        d = (batch_mean - renorm_mean) / ref_std
        if rmin is not None or rmax is not None:
            r = r.clamp(min=rmin, max=rmax)
        if dmax is not None:
            d = d.clamp(-dmax, dmax)
        x_hat = x_hat * r.reshape(view) + d.reshape(view)
    if adj_scale is not None:
        x_hat = x_hat * adj_scale.reshape(view) + adj_bias.reshape(view)
    y = x_hat * weight.reshape(view) + bias.reshape(view)
    with torch.no_grad():
        f = 1.0 - momentum
        running_mean.lerp_(batch_mean, f)
        if renorm:
            rf = 1.0 - renorm_momentum
            renorm_mean.lerp_(batch_mean, rf)
            renorm_stddev.lerp_(batch_std, rf)
            moving_stddev.lerp_(batch_std, f)
            running_var.copy_(torch.relu(moving_stddev * moving_stddev - eps))
        else:
            running_var.lerp_(batch_var, f)
    return y.reshape(x.shape).to(x.dtype)


class KerasBatchNorm(nn.Module):
    """One Keras-only feature ("renorm", "ghost" or "adjust") on either implementation.

    impl "triton": ``triton_bn.normalize``; impl "torch": ``keras_batch_norm_torch``. Inference
    (eval mode) is plain batch norm with the moving statistics on both.
    """

    def __init__(self, num_features: int, feature: str, impl: str, groups: int = 1,
                 device=None) -> None:
        super().__init__()
        if feature not in ("renorm", "ghost", "adjust") or impl not in ("triton", "torch"):
            raise ValueError(f"unknown feature/impl {feature!r}/{impl!r}")
        self.feature, self.impl, self.groups = feature, impl, groups
        cfg = KERAS_CONFIG
        self.eps, self.momentum = cfg["eps"], cfg["momentum"]
        self.renorm_momentum = cfg["renorm_momentum"]
        self.rmin, self.rmax, self.dmax = cfg["rmin"], cfg["rmax"], cfg["dmax"]
        kw = dict(device=device, dtype=torch.float32)
        self.weight = nn.Parameter(torch.ones(num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        for name in ("running_mean", "renorm_mean", "adj_bias"):
            self.register_buffer(name, torch.zeros(num_features, **kw))
        for name in ("running_var", "renorm_stddev", "moving_stddev", "adj_scale"):
            self.register_buffer(name, torch.ones(num_features, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if self.impl == "triton":
                return triton_bn.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                            self.bias, False, 0.0, self.eps)
            return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var,
                                                  self.weight, self.bias, False, 0.0, self.eps)
        renorm = self.feature == "renorm"
        groups = self.groups if self.feature == "ghost" else 1
        adjust = self.feature == "adjust"
        if self.impl == "torch":
            return keras_batch_norm_torch(
                x, self.weight, self.bias, self.running_mean, self.running_var, eps=self.eps,
                momentum=self.momentum, groups=groups, renorm=renorm,
                renorm_mean=self.renorm_mean, renorm_stddev=self.renorm_stddev,
                moving_stddev=self.moving_stddev, renorm_momentum=self.renorm_momentum,
                rmin=self.rmin, rmax=self.rmax, dmax=self.dmax,
                adj_scale=self.adj_scale if adjust else None,
                adj_bias=self.adj_bias if adjust else None)
        running = RunningStats(self.running_mean, self.running_var, momentum=self.momentum,
                               convention="keras", unbiased=False,
                               moving_stddev=self.moving_stddev if renorm else None)
        rn = Renorm(style="keras", rmin=self.rmin, rmax=self.rmax, dmax=self.dmax,
                    momentum=self.renorm_momentum, mean=self.renorm_mean,
                    stddev=self.renorm_stddev) if renorm else None
        return triton_bn.normalize(x, self.weight, self.bias, axis=1, training=True, eps=self.eps,
                                   running=running, groups=groups, renorm=rn,
                                   adjustment=(self.adj_scale, self.adj_bias) if adjust else None)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, feature={self.feature}, impl={self.impl}, groups={self.groups}"


def _load(module: nn.Module, init: InitState) -> nn.Module:
    with torch.no_grad():
        for name, value in vars(init).items():
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_(value)
    return module


def make_module(provider: str, case: Case, init: InitState, device: torch.device,
                compile_mode: Optional[str] = None) -> nn.Module:
    """A fresh module of ``provider`` for ``case``, loaded with ``init``."""
    C = case.channels
    if case.feature == "bn":
        # the drop-in modules users run: triton_bn.BatchNorm*d against torch.nn.BatchNorm*d
        lib = triton_bn if provider == "triton_bn" else nn
        cls = {2: lib.BatchNorm1d, 3: lib.BatchNorm1d, 4: lib.BatchNorm2d, 5: lib.BatchNorm3d}[
            len(case.shape)]
        if provider == "triton_bn":
            return _load(cls(C, eps=TORCH_EPS, momentum=TORCH_MOMENTUM, device=device), init)
        module = _load(cls(C, eps=TORCH_EPS, momentum=TORCH_MOMENTUM, device=device), init)
    else:
        if provider == "triton_bn":
            return _load(KerasBatchNorm(C, case.feature, "triton", case.groups, device), init)
        module = _load(KerasBatchNorm(C, case.feature, "torch", case.groups, device), init)
    if provider == "torch_eager":
        return module
    if provider == "torch_compile":
        # Timing the backward alone replays it (retain_graph=True), which AOTAutograd's donated
        # buffers forbid; turning them off only stops the backward reusing saved tensors' memory.
        fconfig = getattr(torch._functorch, "config", None)
        if fconfig is not None and hasattr(fconfig, "donated_buffer"):
            fconfig.donated_buffer = False
        return torch.compile(module, dynamic=False, mode=compile_mode)
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def parameters_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    inner = getattr(module, "_orig_mod", module)
    return inner.weight, inner.bias


def reference(case: Case, init: InitState, x: torch.Tensor, dy: Optional[torch.Tensor],
              training: bool) -> dict:
    """Float64 oracle: {"y": ..., and with dy: "dx", "dweight", "dbias"} (on x's device)."""
    x64 = x.detach().to(torch.float64).requires_grad_(dy is not None)
    w64 = init.weight.to(torch.float64).requires_grad_(dy is not None)
    b64 = init.bias.to(torch.float64).requires_grad_(dy is not None)
    kw: dict = dict(axis=1, training=training, running_mean=init.running_mean,
                    running_var=init.running_var)
    if case.feature == "bn":
        kw.update(eps=TORCH_EPS, momentum=TORCH_MOMENTUM, convention="torch", unbiased=True)
    else:
        cfg = KERAS_CONFIG
        kw.update(eps=cfg["eps"], momentum=cfg["momentum"], convention="keras", unbiased=False)
        if training:
            if case.feature == "ghost":
                kw["groups"] = case.groups
            elif case.feature == "renorm":
                kw["renorm"] = dict(style="keras", rmin=cfg["rmin"], rmax=cfg["rmax"],
                                    dmax=cfg["dmax"], momentum=cfg["renorm_momentum"],
                                    mean=init.renorm_mean, stddev=init.renorm_stddev,
                                    moving_stddev=init.moving_stddev)
            elif case.feature == "adjust":
                kw["adjustment"] = (init.adj_scale, init.adj_bias)
    # the reference makes some tensors with factory functions and no device: default them to x's
    with torch.device(x.device):
        y, _ = reference_batch_norm(x64, w64, b64, **kw)
    out = {"y": y.detach()}
    if dy is not None:
        y.backward(dy.to(torch.float64))
        out.update(dx=x64.grad, dweight=w64.grad, dbias=b64.grad)
    return out
