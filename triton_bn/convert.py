"""Swapping torch's batch-norm layers in a model for triton_bn's (``convert_model``, which lives
with the layers in ``modules``), and the fusers that let ``torch.ao.quantization.fuse_modules``
fold triton_bn layers into a preceding conv or linear layer."""

from __future__ import annotations

from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_model

__all__ = ["convert_model", "fuser_method_mapping"]

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
