"""Fusing batch norm with the ReLU (and residual add) that follows it, in a real model.

``fuse(model)`` traces the model with torch.fx, finds ``BatchNorm -> ReLU`` and
``BatchNorm -> add(., shortcut) -> ReLU`` and replaces each by one triton_bn layer with
``activation="relu"`` (called as ``bn(x, residual=shortcut)`` for the second), which runs the
normalization, the add and the ReLU in one kernel. Backward recomputes the ReLU mask from x,
or after the add reads it from the output the layer keeps (zero where y <= 0, as torch's ReLU
keeps its own).

Matched: the ReLU as an ``nn.ReLU`` module (in place or not, also one module shared by several
calls), ``F.relu``, ``torch.relu``, ``torch.relu_``, ``x.relu()``, ``x.relu_()``; the add as
``+``, ``+=``, ``torch.add`` (alpha 1), ``x.add(y)``, ``x.add_(y)``; ``nn.Identity`` between them
is looked through. A batch norm is fused only when its output has no other user (nor has the
add's), it is called once, and it is torch's BatchNorm1d/2d/3d or SyncBatchNorm (exactly, as
``convert_model``) or a triton_bn layer without an activation.

Where a module cannot be traced (data-dependent Python control flow, ...), its children are
traced one by one, and the module is traced again with the untraceable ones as opaque leaves;
a module is replaced by its traced GraphModule only where that fused something. Every batch norm
left unfused is converted as ``convert_model`` does. Parameters and buffers stay the same tensors
and state_dict keys stay the same; training/eval mode is kept.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .convert import convert_model
from .modules import _TritonBatchNorm

__all__ = ["FuseReport", "FusedSite", "fuse"]

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_INPLACE_ADDS = {operator.iadd, "add_"}
_RESIDUAL_MODES = ("saved", "all", "none")
# layers that keep their input for backward (a batch norm in training does too)
_SAVES_INPUT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class FusedSite:
    """One fused batch norm: its qualified name in the returned model and what it absorbed
    ("relu" or "add+relu")."""

    name: str
    pattern: str


@dataclass
class FuseReport:
    """What ``fuse`` did: the fused sites, the batch norms left unfused (name, reason; they are
    converted to triton_bn layers without an activation where convert_model would) and the
    modules torch.fx could not trace (name, error), whose insides were fused piecewise."""

    fused: list[FusedSite] = field(default_factory=list)
    unfused: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def count(self, pattern: str) -> int:
        return sum(1 for s in self.fused if s.pattern == pattern)

    def __str__(self) -> str:
        total = len(self.fused) + len(self.unfused)
        lines = [(f"triton_bn.fuse: fused {len(self.fused)} of {total} batch norms "
                 f"({self.count('add+relu')} BN+add+ReLU, {self.count('relu')} BN+ReLU)")]
        lines += [f"  unfused {name}: {why}" for name, why in self.unfused]
        lines += [f"  not traceable {name or '(model)'}: {why}" for name, why in self.untraced]
        return "\n".join(lines)


def fuse(model: nn.Module, *, residual: str = "all", return_report: bool = False):
    """Replaces ``BatchNorm -> ReLU`` and ``BatchNorm -> add(., shortcut) -> ReLU`` in ``model`` by
    fused triton_bn layers and converts the other batch norms as ``convert_model`` does.

    The fused layers share the old ones' parameters and buffers (same tensors) and training mode.
    Like convert_model it works in place where it cannot trace (submodules are swapped in their
    parents); where it traces, the traced module is replaced by a torch.fx GraphModule with the
    same submodule names (so the same state_dict keys); use the returned model. Tracing follows
    Python control flow with the default arguments of ``forward``. Returns the model, or
    ``(model, FuseReport)`` when ``return_report``.

    ``residual`` says which adds to fuse: "all" (default); "saved", only those whose shortcut
    is also the input of a convolution, linear or batch-norm layer (the default until fused
    layers kept their output y for the ReLU mask, as torch's ReLU does, instead of the shortcut,
    which cost one more activation than torch where nothing else kept it: a downsampling
    shortcut); or "none" (BN -> ReLU only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if residual not in _RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {', '.join(map(repr, _RESIDUAL_MODES))}, "
                         f"got {residual!r}")
    report = FuseReport()
    out, _ = _fuse_module(model, "", report, residual)
    fused = {s.name for s in report.fused}
    reasons = {name: why for name, why in report.unfused}  # the last (outermost) reason wins
    report.unfused = []
    for name, m in out.named_modules():
        if _is_bn(m) and name not in fused:
            report.unfused.append((name, reasons.get(name, "not reached by a traced graph")))
    out = convert_model(out)
    return (out, report) if return_report else out


def _is_bn(m: nn.Module) -> bool:
    return type(m) in _TORCH_BN or isinstance(m, _TritonBatchNorm)


def _fusable_bn(m: nn.Module) -> bool:
    return type(m) in _TORCH_BN or (isinstance(m, _TritonBatchNorm) and m.activation is None)


def _has_bn(m: nn.Module) -> bool:
    return any(_fusable_bn(x) for x in m.modules())


class _Tracer(fx.Tracer):
    """torch.fx's tracer with batch norms (torch's and triton_bn's) and given modules as leaves."""

    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.opaque or isinstance(m, (nn.modules.batchnorm._BatchNorm, _TritonBatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fuse_module(module: nn.Module, path: str, report: FuseReport, residual: str
                 ) -> tuple[nn.Module, bool]:
    """Returns (module or its fused replacement, whether it traced as a whole)."""
    if not _has_bn(module) or _is_bn(module):
        return module, True
    try:
        gm = _trace(module, set())
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: go one level down
        first_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    else:
        return _rewrite(gm, module, path, report, residual), True
    report.untraced.append((path, first_error))
    opaque: set[int] = set()
    for name, child in list(module.named_children()):
        new, traced = _fuse_module(child, _join(path, name), report, residual)
        if new is not child:
            setattr(module, name, new)
        if not traced:
            opaque.add(id(new))
    if opaque:
        try:
            gm = _trace(module, opaque)
        except Exception:  # noqa: BLE001
            return module, False
        return _rewrite(gm, module, path, report, residual), False
    return module, False


def _trace(module: nn.Module, opaque: set[int]) -> fx.GraphModule:
    graph = _Tracer(opaque).trace(module)
    return fx.GraphModule(module, graph, module.__class__.__name__)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module], src: fx.Node) -> bool:
    if not node.args or node.args[0] is not src or len(node.args) > (2 if node.op == "call_function"
                                                                     else 1):
        return False
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in _RELU_METHODS and not node.kwargs


def _add_operand(node: fx.Node, src: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` adds ``src`` to a tensor node, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        if node.kwargs and (set(node.kwargs) != {"alpha"} or node.kwargs["alpha"] != 1):
            return None
    elif not (node.op == "call_method" and node.target in _ADD_METHODS and not node.kwargs):
        return None
    if len(node.args) != 2 or src not in node.args or node.args[0] is node.args[1]:
        return None
    other = node.args[1] if node.args[0] is src else node.args[0]
    return other if isinstance(other, fx.Node) else None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _drop_identities(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity \
                and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _rewrite(gm: fx.GraphModule, original: nn.Module, path: str, report: FuseReport,
             residual: str) -> nn.Module:
    """Fuses the matches in ``gm``; returns ``gm`` if it fused any, else ``original``."""
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    sites: list[FusedSite] = []
    skipped: list[tuple[str, str]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _fusable_bn(modules.get(node.target, nn.Module())):
            continue
        name = _join(path, node.target)
        if calls[node.target] > 1:
            skipped.append((name, f"called {calls[node.target]} times"))
            continue
        if len(node.args) != 1 or node.kwargs:
            skipped.append((name, "called with extra arguments"))
            continue
        user = _only_user(node)
        if user is None:
            why = "its output is used by several operations" if node.users else "output unused"
            skipped.append((name, why))
            continue
        if _is_relu(user, modules, node):
            relu, add, shortcut = user, None, None
        else:
            shortcut = _add_operand(user, node)
            relu = _only_user(user) if shortcut is not None else None
            if shortcut is not None and relu is None:
                skipped.append((name, "the result of its add is used by several operations"))
                continue
            if relu is None or not _is_relu(relu, modules, user):
                what = _describe(user) if shortcut is None else f"an add and {_describe(relu)}"
                skipped.append((name, f"followed by {what}, not a ReLU or add+ReLU"))
                continue
            add = user
            if residual == "none":
                skipped.append((name, "followed by an add (residual='none')"))
                continue
            if residual == "saved" and not any(
                    u is not add and u.op == "call_module" and isinstance(modules.get(u.target),
                                                                          _SAVES_INPUT)
                    for u in shortcut.users):
                skipped.append((name, ("the add's other operand is not saved for backward "
                                      "otherwise (residual='saved')")))
                continue
            mutated = add.args[0] if (add.target in _INPLACE_ADDS) else None
            if mutated is shortcut and any(order[u] > order[add] for u in shortcut.users
                                           if u is not add):
                # ``shortcut += bn(x)`` and the shortcut is read later: it must keep the sum
                skipped.append((name, "the add writes into a shortcut that is read again"))
                continue
        _set_submodule(gm, node.target, _with_relu(modules[node.target]))
        if add is not None:
            add.prepend(node)  # the shortcut may be computed after the batch norm
            node.kwargs = {"residual": shortcut}
        relu.replace_all_uses_with(node)
        gm.graph.erase_node(relu)
        if add is not None:
            gm.graph.erase_node(add)
        sites.append(FusedSite(name, "relu" if add is None else "add+relu"))
    report.unfused.extend(skipped)
    if not sites:
        return original
    gm.graph.lint()
    gm.recompile()
    _same_order(gm, original)
    report.fused.extend(sites)
    return gm


def _same_order(new: nn.Module, old: nn.Module) -> None:
    """Orders ``new``'s submodules, parameters and buffers as ``old``'s (a GraphModule registers
    them in call order), so that state_dict keys come in the original order."""
    for attr in ("_parameters", "_buffers", "_modules"):
        d_new, d_old = getattr(new, attr), getattr(old, attr)
        if d_new is d_old:
            continue
        items = [(k, d_new[k]) for k in d_old if k in d_new] + [
            (k, v) for k, v in d_new.items() if k not in d_old]
        d_new.clear()
        d_new.update(items)
    for name, child in new._modules.items():
        old_child = old._modules.get(name)
        if old_child is not None and child is not old_child:
            _same_order(child, old_child)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target}"


def _with_relu(bn: nn.Module) -> nn.Module:
    """A triton_bn layer with activation="relu" sharing ``bn``'s parameters, buffers and mode."""
    if type(bn) in _TORCH_BN:
        new = convert_model(bn)  # a new module holding the same tensors
    else:
        new = type(bn).__new__(type(bn))
        new.__dict__.update(bn.__dict__)
        for attr in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
            if attr in bn.__dict__:
                setattr(new, attr, type(bn.__dict__[attr])(bn.__dict__[attr]))
    new.activation = "relu"
    return new


def _set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    *prefix, last = target.split(".")
    parent = root
    for item in prefix:
        parent = getattr(parent, item)
    setattr(parent, last, new)
