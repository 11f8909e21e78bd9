"""Swapping torch's batch-norm layers in a model for triton_bn's."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, _TritonBatchNorm

__all__ = ["convert_model"]

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
