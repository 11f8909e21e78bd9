"""The environment of a compile check: no interpreter, a fresh Triton cache, and a stand-in Triton
driver that reports a CUDA target and launches nothing. Portable across Triton versions (checked on
the floor version of pyproject.toml and the newest)."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path


def setup_environment(cache_dir: str) -> None:
    if "triton" in sys.modules:
        import triton.knobs as _knobs
        if _knobs.runtime.interpret:
            raise RuntimeError("triton was imported with TRITON_INTERPRET=1 in this process; run "
                               "compile_check in a fresh process")
    os.environ["TRITON_INTERPRET"] = "0"  # before triton_bn / triton are imported (see __init__)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _make_driver(arch: int):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """Reports a CUDA target; the JIT compiles for it. Launching is never reached (the hook
        below stops every launch before it)."""

        @classmethod
        def is_active(cls):
            return True

        def __init__(self) -> None:
            self.target = GPUTarget("cuda", arch, 32)

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

    return CompileOnlyDriver()


def unwrap(obj):
    """The JITFunction inside ``@triton.heuristics`` / ``@triton.autotune`` wrappers (else obj)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _kernels():
    from triton.runtime.jit import JITFunction

    from triton_bn.kernels import backward, forward, persistent
    out = {}
    for mod in (forward, backward, persistent):
        for name in dir(mod):
            obj = unwrap(getattr(mod, name))
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == mod.__name__:
                out[name] = obj
    return out


def activate(arch: int) -> None:
    from triton.runtime import driver
    driver.set_active(_make_driver(arch))
    for jf in _kernels().values():  # binders cache the target: rebuild them for this arch
        jf.device_caches.clear()



def jit_function(fn_key: str):
    """The JITFunction named "module:qualname" (Triton's own registry of them is 3.9-only)."""
    module, qualname = fn_key.split(":", 1)
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return unwrap(obj)


def tool(name: str) -> str | None:
    """A binary of the NVIDIA toolchain bundled with Triton (ptxas, cuobjdump), else from PATH."""
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else shutil.which(name)


def toolchain_problem() -> str | None:
    """Why the bundled NVIDIA toolchain cannot compile here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # noqa: BLE001
        return f"triton's NVIDIA backend is not importable: {e}"
    for arch in (80, 90):
        try:
            path = get_ptxas(arch).path
            subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
        except Exception as e:  # noqa: BLE001
            return f"the bundled ptxas (sm_{arch}) cannot run: {e}"
    return None

