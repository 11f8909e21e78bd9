"""Drop-ins for torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm on the Triton kernels.

Same constructor, state_dict keys (weight, bias, running_mean, running_var, num_batches_tracked),
momentum (None: cumulative average), affine / track_running_stats semantics and input checks as
torch's modules, which they subclass (``isinstance(m, torch.nn.BatchNorm2d)`` holds), so
checkpoints load both ways. Differences: the input is fully validated before any state changes
(torch increments num_batches_tracked before rejecting e.g. one value per channel), the
cumulative momentum is read on the device (no host sync), num_batches_tracked is counted by the
kernels themselves (no extra device op per call), and two extras:

* ``renorm=True``: batch renormalization (Ioffe 2017) in training, with r and d measured against the
  running statistics, r clipped to [1/rmax, rmax] and d to [-dmax, dmax];
* ``activation="relu"``: a fused ReLU, optionally after adding ``residual``: ``m(x, residual=z)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn
from torch.autograd import forward_ad

from .distributed import sync_normalize, world_size
from .functional import (
    BatchNormFunction,
    Renorm,
    RunningStats,
    apply_checked,
    check_inputs,
    check_torch_eps,
    check_values_per_channel,
)
from .ops import InferencePlan, call_memo

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert_model"]


class _TritonBatchNorm:
    """What the modules below share (mixed in before a torch.nn batch-norm class).

    Extra keyword-only constructor arguments: ``renorm`` (batch renormalization in training,
    against the running statistics; r clipped to [1/rmax, rmax], d to [-dmax, dmax]; None bounds:
    unclipped) and ``activation`` (None or "relu", fused; ``forward`` also takes ``residual``,
    added before the activation).
    """

    renorm: bool
    rmax: float | None
    dmax: float | None
    activation: str | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, renorm: bool = False, rmax: float | None = 3.0,
                 dmax: float | None = 5.0, activation: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **_norm_kwargs(bias))
        self._init_extras(renorm, rmax, dmax, activation)

    def _init_extras(self, renorm: bool, rmax: float | None, dmax: float | None,
                     activation: str | None) -> None:
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        if renorm and not self.track_running_stats:
            raise ValueError("renorm=True needs running statistics (track_running_stats=True)")
        if rmax is not None and rmax < 1.0:
            raise ValueError(f"rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got {rmax}")
        if dmax is not None and dmax < 0.0:
            raise ValueError(f"dmax must be >= 0, got {dmax}")
        self.renorm, self.rmax, self.dmax, self.activation = bool(renorm), rmax, dmax, activation

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.renorm:
            s += f", renorm=True, rmax={self.rmax}, dmax={self.dmax}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Batch norm over dim 1 (torch semantics), then ``+ residual`` and the activation."""
        key = None if self._synchronized() else _call_key(self, input, residual)
        plan = _PLANS.get(key) if key is not None else None
        if plan is not None:  # this signature was validated and planned by an earlier call
            if self.training:
                cfg, running, count, memo = plan
                return BatchNormFunction.run(
                    input, self.weight, self.bias, residual, None, None,
                    self.running_mean if running else None, self.running_var if running else None,
                    self.num_batches_tracked if count else None, None, None, None, cfg, None,
                    call_memo(memo))
            return plan.run(input, residual, self.weight, self.bias, self.running_mean,
                            self.running_var)
        if not isinstance(input, torch.fx.Proxy):  # torch's rank check (FX traces without it)
            self._check_input_dim(input)
        planned = [] if key is not None else None
        y = module_batch_norm(
            input, residual, self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked, self.training, self.track_running_stats, self.momentum,
            self.eps, self.renorm, self.rmax, self.dmax, self.activation, self._synchronized(),
            planned)
        if key is not None:  # validated: plan the signature for the next calls
            plan = None
            if self.training and planned:
                cfg, running, count = planned[0]
                plan = (cfg, running is not None, count is not None, {})
            elif not self.training:
                try:
                    plan = InferencePlan(input, residual, self.running_mean, self.eps,
                                         self.activation == "relu")
                except ValueError:
                    pass
            if plan is not None:
                if len(_PLANS) > 1024:
                    _PLANS.clear()
                _PLANS[key] = plan
        return y

    def _synchronized(self) -> Any:
        return False

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile triton_bn.{type(self).__name__}: its kernels are "
            "Triton (Python) code, which TorchScript cannot express. Use torch.compile (it traces "
            "these layers without graph breaks), or script a model holding torch.nn batch norms.")


# call signatures already validated by the full path -> their plan: (NormConfig, whether the
# running statistics and num_batches_tracked are passed, the launch memo (ops.call_memo)) in
# training, an InferencePlan in eval
_PLANS: dict = {}


def _call_key(m, x, residual):
    """The signature of a layer call, which picks its plan; None when the call must take the full
    path: a tensor subclass (FakeTensor, a functorch wrapper), tracing, a torch.func transform or
    forward AD, eval mode without running statistics or with an autograd graph to record."""
    if type(x) is not torch.Tensor or (residual is not None and type(residual) is not torch.Tensor):
        return None
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None \
            or forward_ad._current_level >= 0:
        return None
    weight, bias, running_mean = m.weight, m.bias, m.running_mean
    if not m.training:
        if running_mean is None:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or _requires_grad(weight)
                                        or _requires_grad(bias) or _requires_grad(residual)):
            return None
    state = tuple([None if t is None else (t.dtype, t.device, t.shape, t.stride())
                   for t in (weight, bias, running_mean, m.running_var)])
    res = None if residual is None else (residual.shape, residual.stride(), residual.dtype)
    key = (type(m), x.shape, x.stride(), x.dtype, x.device, res, state, m.eps, m.activation,
           m.training)  # the class: its rank check (_check_input_dim)
    if m.training:
        key += (m.momentum, m.track_running_stats, m.num_batches_tracked is not None, m.renorm,
                m.rmax, m.dmax)
    return key


def _requires_grad(t) -> bool:
    return t is not None and t.requires_grad


@torch.fx.wrap
def module_batch_norm(input, residual, weight, bias, running_mean, running_var,
                      num_batches_tracked, training: bool, track_running_stats: bool,
                      momentum, eps, renorm: bool, rmax, dmax, activation,
                      synchronized, planned=None) -> torch.Tensor:
    """One call of a triton_bn module, from tensors and plain values only, so that ``torch.fx``
    records it as one node: torch's _BatchNorm.forward decisions and checks (torch's order and
    exception types), all made before num_batches_tracked is incremented. ``synchronized``:
    False, or a SyncBatchNorm's process group in a tuple.
    """
    # batch statistics in training, and in eval when there are no buffers (as torch)
    use_batch = training or (running_mean is None and running_var is None)
    group = None
    if synchronized and training and world_size(synchronized[0]) > 1:
        group = synchronized
    if use_batch and group is None:  # synchronized, the global count matters (as torch's)
        check_values_per_channel(input, (1,))
    check_torch_eps(eps, use_batch)
    running = None
    if running_mean is not None and (not training or track_running_stats):
        cumulative = momentum is None and num_batches_tracked is not None
        count = training and track_running_stats and num_batches_tracked is not None
        running = RunningStats(
            running_mean, running_var, convention="torch", unbiased=True,
            momentum=None if cumulative else (momentum or 0.0),
            num_batches_tracked=num_batches_tracked if cumulative or count else None,
            count_batch=count)  # the kernels add 1 to num_batches_tracked, on the device
    rn = None
    if renorm and use_batch:
        rn = Renorm(style="torch", rmin=None if rmax is None else 1.0 / rmax, rmax=rmax, dmax=dmax)
    check_inputs(input, weight, bias, residual, (1,), 1, running, rn, None, use_batch,
                 "dim 1 (num_features)", torch_dtypes=True)
    if group is not None:
        return sync_normalize(input, weight, bias, process_group=group[0], axis=1,
                              training=True, eps=eps, running=running, renorm=rn,
                              residual=residual, activation=activation)
    return apply_checked(input, weight, bias, (1,), use_batch, eps, running, 1, rn, None, residual,
                         activation == "relu", planned=planned)


def _norm_kwargs(bias: bool) -> dict:
    return {} if bias else {"bias": False}  # ``bias=`` exists in torch >= 2.6 only


class BatchNorm1d(_TritonBatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on the Triton kernels: input (N, C) or (N, C, L). Extras: renorm,
    rmax, dmax, activation (see ``_TritonBatchNorm``)."""


class BatchNorm2d(_TritonBatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on the Triton kernels: input (N, C, H, W), NCHW or channels_last
    (kept: the output has the input's memory format). Extras: renorm, rmax, dmax, activation."""


class BatchNorm3d(_TritonBatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on the Triton kernels: input (N, C, D, H, W), NCDHW or
    channels_last_3d. Extras: renorm, rmax, dmax, activation."""


class SyncBatchNorm(_TritonBatchNorm, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on the Triton kernels: in training, the batch statistics are those
    of the whole ``process_group`` (default: the world) when torch.distributed is initialized with
    more than one process; ranks may hold different batch sizes, zero included. Works with NCCL
    (GPUs) and gloo (CPUs). Parameter gradients stay local (DDP averages them), as torch's.
    Extras: renorm, rmax, dmax, activation. Under torch.compile the synchronized call is a
    graph break (it runs eagerly)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any | None = None, device=None, dtype=None, *,
                 bias: bool = True, renorm: bool = False, rmax: float | None = 3.0,
                 dmax: float | None = 5.0, activation: str | None = None) -> None:
        nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                  process_group, device, dtype, **_norm_kwargs(bias))
        self._init_extras(renorm, rmax, dmax, activation)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        super()._check_input_dim(input)
        self._check_non_zero_input_channels(input)

    def _synchronized(self):
        return (self.process_group,)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None
                               ) -> nn.Module:
        """Replaces every batch-norm layer (torch's or triton_bn's) in ``module`` with a
        triton_bn.SyncBatchNorm sharing its parameters and buffers (torch's contract)."""
        return convert_model(module, synchronized=True, process_group=process_group,
                             include_subclasses=True)


_EQUIVALENT = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
               nn.BatchNorm3d: BatchNorm3d, nn.SyncBatchNorm: SyncBatchNorm}


def convert_model(module: nn.Module, synchronized: bool = False,
                  process_group: Any | None = None, *,
                  include_subclasses: bool = False) -> nn.Module:
    """Replaces every nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm in ``module`` with the triton_bn
    equivalent (all with triton_bn.SyncBatchNorm over ``process_group`` when ``synchronized``).

    The new layers share the old ones' parameters and buffers (same tensors: device, dtype and
    optimizer state are kept) and training mode. Returns ``module`` changed in place, or the new
    layer when ``module`` itself is one. Subclasses of torch's layers are left alone (they may
    change the forward) unless ``include_subclasses``; triton_bn layers are converted only to make
    them synchronized.
    """
    out = module
    target = _target(module, synchronized, include_subclasses)
    if target is not None:
        out = _replace(module, target, process_group)
    for name, child in module.named_children():
        out.add_module(name, convert_model(child, synchronized, process_group,
                                           include_subclasses=include_subclasses))
    return out


def _target(module: nn.Module, synchronized: bool, include_subclasses: bool) -> type | None:
    if isinstance(module, _TritonBatchNorm):
        return SyncBatchNorm if synchronized and not isinstance(module, SyncBatchNorm) else None
    if include_subclasses:
        known = isinstance(module, nn.modules.batchnorm._BatchNorm)
    else:
        known = type(module) in _EQUIVALENT
    if not known:
        return None
    if synchronized:
        return SyncBatchNorm
    return next((new for old, new in _EQUIVALENT.items() if isinstance(module, old)), None)


def _replace(old: nn.Module, cls: type, process_group: Any | None) -> nn.Module:
    extras = {"renorm": getattr(old, "renorm", False), "rmax": getattr(old, "rmax", 3.0),
              "dmax": getattr(old, "dmax", 5.0), "activation": getattr(old, "activation", None)}
    args = (old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
    if cls is SyncBatchNorm:
        group = process_group if process_group is not None else getattr(old, "process_group", None)
        args += (group,)
    new = cls(*args, device="meta", **extras)  # placeholders, replaced by the old tensors below
    new.weight, new.bias = old.weight, old.bias
    new.running_mean, new.running_var = old.running_mean, old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new
