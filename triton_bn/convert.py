"""Swapping torch's batch-norm layers in a model for triton_bn's."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, _TritonBatchNorm

__all__ = ["convert_model", "fuser_method_mapping"]

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


def _fuser(torch_fuser, with_relu=None):
    """torch's fuser for (conv or linear, batch norm[, relu]), keeping a triton_bn layer's fused
    activation: a BN with activation="relu" fuses like (conv, bn, relu)."""

    def fuse(is_qat: bool, *mods: nn.Module) -> nn.Module:
        bn = mods[1]
        if getattr(bn, "renorm", False) and (is_qat or bn.training):
            raise NotImplementedError(
                "fuse_modules: a triton_bn layer with renorm=True cannot be fused for training "
                "(quantization-aware training has no batch renormalization)")
        if getattr(bn, "activation", None) == "relu" and len(mods) == 2:
            if with_relu is None:
                raise NotImplementedError(
                    f"fuse_modules: no fused form for {type(mods[0]).__name__} + a batch norm with "
                    "activation='relu'")
            return with_relu(is_qat, mods[0], bn, nn.ReLU().train(bn.training))
        return torch_fuser(is_qat, *mods)

    return fuse


def fuser_method_mapping() -> dict:
    """``{(module types): fuser}`` for ``torch.ao.quantization.fuse_modules`` with triton_bn's
    layers in place of torch's (also registered in torch's default table when triton_bn is
    imported). Pass it explicitly with ``fuse_custom_config_dict={"additional_fuser_method_mapping":
    triton_bn.convert.fuser_method_mapping()}`` if that registration is unavailable."""
    from torch.ao.quantization import fuser_method_mappings as fm

    conv_bn, conv_bn_relu = fm.fuse_conv_bn, fm.fuse_conv_bn_relu
    mapping = {}
    for conv, bn in ((nn.Conv1d, BatchNorm1d), (nn.Conv2d, BatchNorm2d), (nn.Conv3d, BatchNorm3d)):
        mapping[(conv, bn)] = _fuser(conv_bn, conv_bn_relu)
        mapping[(conv, bn, nn.ReLU)] = _fuser(conv_bn_relu)
    for conv, bn in ((nn.ConvTranspose1d, BatchNorm1d), (nn.ConvTranspose2d, BatchNorm2d),
                     (nn.ConvTranspose3d, BatchNorm3d)):
        mapping[(conv, bn)] = _fuser(fm.fuse_convtranspose_bn)
    mapping[(nn.Linear, BatchNorm1d)] = _fuser(fm.fuse_linear_bn)
    return mapping


def _register_fusers() -> None:
    """Adds ``fuser_method_mapping()`` to torch's default fuser table (a private dict, so a torch
    without it is left alone; the explicit mapping still works there)."""
    try:
        from torch.ao.quantization import fuser_method_mappings as fm

        table = fm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    except (ImportError, AttributeError):  # pragma: no cover - other torch versions
        return
    for key, fuser in fuser_method_mapping().items():
        table.setdefault(key, fuser)


_register_fusers()
