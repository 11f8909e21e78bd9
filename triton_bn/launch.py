"""Kernel launches without Triton's per-call binder on repeated signatures.

``kernel[grid](*args, **constexprs)`` runs Triton's ``JITFunction.run`` on every call: it binds the
~20-50 arguments, computes each one's specialization (dtype, 16-byte alignment, integer
divisibility), builds a cache key and looks the compiled kernel up: about 15-25 us of Python per
launch, several times the GPU time of a small batch-norm layer. ``launch`` does that work once per
*call signature* and then hands the arguments straight to the compiled kernel's C launcher:

    signature = (grid, each argument's value if it is not a tensor, else (dtype, 16-byte aligned?),
                 the constexprs)

Everything Triton specializes on is a function of that signature: the integers themselves (so
their divisibility), each tensor's dtype and pointer alignment, which optional tensors are None,
and the constexprs; the device and the Triton knobs that change code are added to the key. A new
signature goes through ``kernel[grid]`` once (compiling if needed); the compiled kernel it returns
is kept with the constant tail of the bound argument list (constexprs in signature order, including
the ones ``@triton.heuristics`` derives), and later calls launch it as ``JITFunction.run`` would.

Fallbacks, always through the JIT: Triton's CPU interpreter (``TRITON_INTERPRET=1``), a Triton
without the launcher interface used here (checked once), or ``TRITON_BN_DIRECT_LAUNCH=0``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

try:  # Triton >= 3.4 (this interface is the same through 3.9)
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - older Triton: the JIT path only
    _knobs = _driver = None

__all__ = ["launch", "direct_launch_enabled", "set_direct_launch", "clear_cache", "FP_FUSION"]

# Every kernel compiles with fused multiply-adds, said explicitly rather than left to Triton's
# default: the pre-activation (x - m) * scale + shift is one FFMA in the forward and in the
# backward's recomputed ReLU mask alike (kernels/common.normalized; functional._relu_mask relies
# on it), and the kernels' instruction counts assume it. Triton 3.9 warns that 3.10 turns the
# default off (TRITON_DEFAULT_FP_FUSION); TRITON_FORCE_DISABLE_FP_FUSION=1 still overrides this.
FP_FUSION = {"enable_fp_fusion": True}

_Tensor = torch.Tensor
_ENTRIES: dict = {}
_MAX_ENTRIES = 4096
_DIRECT: Optional[bool] = None


def direct_launch_enabled() -> bool:
    """Whether repeated signatures bypass the JIT's binder (not in the interpreter; read from the
    environment at the first launch, or set with ``set_direct_launch``)."""
    global _DIRECT
    if _DIRECT is None:
        _DIRECT = (_knobs is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
                   and os.environ.get("TRITON_BN_DIRECT_LAUNCH", "1") != "0")
    return _DIRECT


def set_direct_launch(enabled: Optional[bool]) -> None:
    """Turns the direct path on or off (None: back to the environment's choice)."""
    global _DIRECT
    _DIRECT = enabled


def clear_cache() -> None:
    _ENTRIES.clear()
    _SITES.clear()


class _Entry:
    """A compiled kernel and the constant tail of its bound argument list."""

    __slots__ = ("run", "function", "packed_metadata", "compiled", "tail", "signature")

    def __init__(self, compiled, tail: tuple, signature: tuple) -> None:
        self.compiled = compiled
        self.signature = signature
        self.run = compiled.run
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.tail = tail


def _jit_function(kernel):
    """The JITFunction under ``@triton.heuristics`` wrappers, and the wrappers' derived values."""
    derived = []
    while not hasattr(kernel, "arg_names") or not hasattr(kernel, "params"):
        derived.append(kernel.values)
        kernel = kernel.fn
    return kernel, derived


def _bound_tail(kernel, args: tuple, constexprs: dict) -> Optional[tuple]:
    """The arguments after the positional ones, in signature order, as ``JITFunction.run`` binds
    them (given, derived by heuristics, or defaults); None when the layout is not the expected
    one (positional arguments first, then only keyword constexprs)."""
    jit, derived = _jit_function(kernel)
    names = list(jit.arg_names)
    given = dict(zip(names, args))
    given.update(constexprs)
    for values in reversed(derived):  # innermost wrapper first, as Heuristics.run nests
        for name, fn in values.items():
            given[name] = fn(given)
    tail = []
    for param in jit.params[len(args):]:
        name = param.name
        if name in given:
            tail.append(given[name])
        elif param.has_default:
            tail.append(param.default)
        else:
            return None
    return tuple(tail)


def _signature(kernel, grid, args, constexprs, options, device) -> tuple:
    """Everything Triton's JIT specializes a launch on (see the module docstring)."""
    sig = tuple([(a.dtype, not (a.data_ptr() & 15)) if isinstance(a, _Tensor) else a
                 for a in args])
    return (kernel, grid, sig, tuple(constexprs.items()), tuple(options.items()), device,
            _knobs.runtime.debug)


class _Site:
    """A launch site under a caller's key: which arguments are tensors, and the compiled
    kernel for each combination of their 16-byte alignments."""

    __slots__ = ("tensor_positions", "by_alignment")

    def __init__(self, args: tuple) -> None:
        self.tensor_positions = tuple(i for i, a in enumerate(args) if isinstance(a, _Tensor))
        self.by_alignment: dict = {}


_SITES: dict = {}
VERIFY_KEYS = os.environ.get("TRITON_BN_VERIFY_LAUNCH_KEYS", "0") == "1"


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, key=None, **options: Any) -> None:
    """``kernel[grid](*args, **constexprs, **options)`` (with ``FP_FUSION``), through the direct
    path when possible.

    ``args`` are the kernel's leading positional parameters (tensors, None, ints, floats);
    ``constexprs`` its constexpr parameters by name; ``options`` launch options (num_warps, ...).
    ``key`` (optional, hashable): the caller's promise that it determines every argument except
    the tensors' addresses -- the integers, which arguments are None, the tensors' dtypes, the
    constexprs and options -- for this kernel and grid. A repeated key then costs a dict lookup
    and one ``data_ptr`` per tensor (their alignment) instead of a look at every argument.
    (``TRITON_BN_VERIFY_LAUNCH_KEYS=1`` checks the promise on every launch: the tests set it.)
    """
    if not direct_launch_enabled():
        kernel[grid](*args, **constexprs, **options, **FP_FUSION)
        return
    device = _driver.active.get_current_device()
    entry = site = None
    if key is not None:
        site = _SITES.get((kernel, grid, key, device))
        if site is not None:
            aligned = tuple([not (args[i].data_ptr() & 15) for i in site.tensor_positions])
            entry = site.by_alignment.get(aligned)
            if VERIFY_KEYS and entry is not None:
                sig = _signature(kernel, grid, args, constexprs, options, device)
                if sig != entry.signature:
                    raise AssertionError(f"triton_bn.launch: key {key!r} of {kernel} does not "
                                         f"determine the launch: {sig} != {entry.signature}")
    if entry is None:
        sig = _signature(kernel, grid, args, constexprs, options, device)
        entry = _ENTRIES.get(sig)
        if entry is None:
            _first_launch(kernel, grid, args, constexprs, options, sig)
            return
        if key is not None:
            if site is None:
                site = _SITES[(kernel, grid, key, device)] = _Site(args)
            aligned = tuple([not (args[i].data_ptr() & 15) for i in site.tensor_positions])
            site.by_alignment[aligned] = entry
    stream = _driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    enter, leave = _active_hook(_knobs.runtime.launch_enter_hook), \
        _active_hook(_knobs.runtime.launch_exit_hook)
    meta = None if enter is None else entry.compiled.launch_metadata(grid, stream, *args, *entry.tail)
    entry.run(grid[0], g1, g2, stream, entry.function, entry.packed_metadata, meta, enter, leave,
              *args, *entry.tail)


def _first_launch(kernel, grid, args, constexprs, options, sig) -> None:
    """Through the JIT (binds, compiles if needed, launches); keeps the compiled kernel."""
    compiled = kernel[grid](*args, **constexprs, **options, **FP_FUSION)
    if hasattr(compiled, "result"):  # an async compile's future
        compiled = compiled.result()
    tail = _bound_tail(kernel, args, constexprs) if compiled is not None else None
    if tail is not None and hasattr(compiled, "packed_metadata"):
        if len(_ENTRIES) >= _MAX_ENTRIES:
            _ENTRIES.clear()
            _SITES.clear()
        _ENTRIES[sig] = _Entry(compiled, tail, sig)


def _active_hook(hook):
    """The launch hook, or None when it is an empty ``HookChain`` (Triton >= 3.5 always installs
    one; the C launcher skips a None hook, and the launch metadata is then not needed)."""
    if hook is not None and not getattr(hook, "calls", True):
        return None
    return hook
