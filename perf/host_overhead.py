"""Host (CPU) time per call of triton_bn's eager launch path, without a GPU, next to torch.nn.BatchNorm2d.

    python perf/host_overhead.py                      # bf16 channels_last + fp32 NCHW, split + single pass
    python perf/host_overhead.py --quick              # a fast smoke (tests/test_host_overhead.py)
    python perf/host_overhead.py --csv out.csv        # also write the rows as CSV
    python perf/host_overhead.py --package-root DIR   # measure the triton_bn of another checkout

On a GPU host an eager ``BatchNorm2d`` call costs the CPU time of the Python launch path (module checks,
autograd, planning, allocation, Triton's ``JITFunction.run``) plus a few microseconds of C launch per
kernel; for the small layers of a CNN that host time, not the GPU work, bounds the step. This measures
it on a CPU-only machine:

* Triton runs for real (TRITON_INTERPRET=0) with the stand-in driver of ``perf/compile_check/driver.py``:
  it reports a CUDA target (sm_90 by default), so the JIT binds the arguments, specializes, and looks the
  kernel up in its cache exactly as on a GPU. The first call of each specialization compiles it for
  sm_90 (ttir -> cubin with the bundled ptxas; ``--no-compile`` puts a placeholder kernel in the JIT's
  cache instead, which is faster and times the same Python path). Only the final C launch is stubbed:
  the driver's ``launcher_cls`` is a counter that does nothing, so every launch is counted.
* The tensors are CPU tensors: nothing is executed, their contents do not matter, and the whole
  module call (checks, autograd Function, ``ops``) runs end to end on the host. The tiles are planned
  with the GPU knobs of an H100/H200 (``tuning.override``; ``--path split`` forces the split path,
  ``single`` asks for the single-pass one, which the planner grants only where the tile fits: at
  2x64x32x32 bf16 channels_last it does not, and the kernels column shows the split kernels).
* The baseline is ``torch.nn.BatchNorm2d`` on a tiny CPU tensor of the same channels, dtype and layout
  (``--torch-shape``, default 2x64x2x2), where its time is dispatch-bound: its host cost per call.
  torch and triton_bn are timed alternately in the same run (same machine load), one thread.

Modes: ``forward`` (training forward, input requiring grad), ``forward_backward`` (that forward then
``torch.autograd.grad`` of (input, weight, bias): no gradient accumulation on either side) and
``inference`` (eval forward under ``no_grad``). Per case: the median over ``--repeats`` (15) of the
mean of ``--calls`` (200) back-to-back calls (garbage collector off), in microseconds per call, with
p20 / p80 of the repeats; the ratio to torch's median ("x torch") and the median of the per-repeat
ratios to the torch timing taken just before ("paired", steadier on a loaded machine); Triton
launches per call (by kernel); and, counted in a separate untimed pass under a ``TorchDispatchMode``,
the aten ops per call that would run device work on a GPU (allocations, views and metadata ops
excluded), e.g. ``add_`` for ``num_batches_tracked``.

Only public entry points of the package are used (``triton_bn.BatchNorm2d``, ``tuning.override``), so the
benchmark runs against any revision. It is a benchmark, not a test: the numbers swing with machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.util
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

MODES = ("forward", "forward_backward", "inference")
CASES = {"bf16-cl": ("bfloat16", "channels_last"), "fp32-nchw": ("float32", "nchw"),
         "fp16-cl": ("float16", "channels_last"), "bf16-nchw": ("bfloat16", "nchw"),
         "fp32-cl": ("float32", "channels_last")}
PATHS = {"split": {"force_fused": False}, "single": {"force_fused": True}, "auto": {}}
# aten ops that launch no device work: allocation and metadata
NO_DEVICE_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                  "detach", "alias", "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride",
                  "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}


def _load(name: str, path: Path):
    """A module from a file, without importing its package (``perf.compile_check``'s __init__
    would put this checkout first on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _StubLauncher:
    """Stands in for the C launcher of one compiled kernel: counts the launch, does nothing."""

    __slots__ = ("name", "calls")

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, 0

    def __call__(self, *args) -> None:
        self.calls += 1


class _StubUtils:
    """What CompiledKernel._init_handles asks of a driver's utils (a pretend sm_90 device)."""

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return object(), None, 0, 0, 1024  # module, function, n_regs, n_spills, n_max_threads

    def unload_module(self, module) -> None:
        pass


class _Placeholder:
    """A compiled kernel for ``--no-compile``: what JITFunction.run touches on a cache hit (launch code
    that asks the JIT for a kernel handle with ``warmup`` gets None here: use the default, compiling)."""

    def __init__(self, launcher: _StubLauncher) -> None:
        self.function, self.packed_metadata, self.run = None, None, launcher

    def launch_metadata(self, grid, stream, *args):
        from triton import knobs
        return None if knobs.runtime.launch_enter_hook is None else {}

    def _init_handles(self) -> None:
        pass

    def __getitem__(self, grid):  # CompiledKernel[grid](*args), for launch code that keeps handles
        return lambda *args, stream=None: self.run(*grid, stream, None, None, None, None, None, *args)


class Launches:
    """Installs the stand-in driver with counting launchers; ``total()`` / ``by_kernel()``."""

    def __init__(self, arch: int, compile_kernels: bool) -> None:
        from triton import knobs
        from triton.runtime import driver as rt_driver

        drv = _load("triton_bn_perf_driver", HERE / "compile_check" / "driver.py")._make_driver(arch)
        self.launchers: list[_StubLauncher] = []
        drv.launcher_cls = self._launcher
        drv.utils = _StubUtils()
        rt_driver.set_active(drv)
        if not compile_kernels:
            knobs.runtime.jit_cache_hook = self._placeholder_hook

    def _launcher(self, src, metadata) -> _StubLauncher:
        lch = _StubLauncher(metadata.name)
        self.launchers.append(lch)
        return lch

    def _placeholder_hook(self, *, key, fn, compile, **_):
        lch = _StubLauncher(fn.name)
        self.launchers.append(lch)
        fn.jit_function.device_caches[compile["device"]][0][key] = _Placeholder(lch)
        return True  # this first call neither compiles nor launches; later calls hit the cache

    def total(self) -> int:
        return sum(lch.calls for lch in self.launchers)

    def by_kernel(self) -> Counter:
        c: Counter = Counter()
        for lch in self.launchers:
            c[lch.name] += lch.calls
        return c


def _device_op_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class DeviceOps(TorchDispatchMode):
        """Counts the aten ops that would run device work (not allocations, views, metadata)."""

        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NO_DEVICE_WORK and not getattr(func, "is_view", False):
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    return DeviceOps()


def make_call(module, x, mode: str):
    """The zero-argument callable timed for ``mode``."""
    import torch

    if mode == "inference":
        module.eval()
        xi = x.detach()

        def call():
            with torch.no_grad():
                return module(xi)
        return call
    module.train()
    xg = x.detach().requires_grad_(True)
    if mode == "forward":
        return lambda: module(xg)
    dy = torch.empty_like(xg)
    inputs = (xg, module.weight, module.bias)

    def call():
        return torch.autograd.grad(module(xg), inputs, dy)
    return call


def time_call(fn, calls: int) -> float:
    """Mean microseconds per call over ``calls`` back-to-back calls (garbage collector off, as
    timeit does)."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e6 / calls
    finally:
        gc.enable()


def _quantile(v: list, q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2x64x32x32", help="NxCxHxW of the triton_bn input")
    p.add_argument("--torch-shape", default=None,
                   help="NxCxHxW of the torch.nn.BatchNorm2d baseline (default: 2xCx2x2, dispatch-bound)")
    p.add_argument("--cases", default=None, help=f"comma-separated, of {', '.join(CASES)} "
                   "(default bf16-cl,fp32-nchw; --quick: bf16-cl)")
    p.add_argument("--paths", default=None, help="comma-separated, of split, single, auto (the "
                   "planner's choice under the GPU knobs) (default split,single; --quick: split)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15; --quick 3)")
    p.add_argument("--calls", type=int, default=None, help="calls per repeat (default 200; --quick 20)")
    p.add_argument("--arch", type=int, default=90, help="CUDA arch the stand-in driver reports")
    p.add_argument("--no-compile", action="store_true",
                   help="do not compile: a placeholder kernel in the JIT's cache (same per-call path)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke: bf16-cl, split path, 3 x 20 calls")
    p.add_argument("--cache-dir", default=None, help="Triton cache (default: a fresh temporary one)")
    p.add_argument("--package-root", default=str(ROOT),
                   help="directory holding the triton_bn package to measure (default: this checkout)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (3 if quick else 15)
    calls = args.calls or (20 if quick else 200)
    cases = (args.cases or ("bf16-cl" if quick else "bf16-cl,fp32-nchw")).split(",")
    paths = (args.paths or ("split" if quick else "split,single")).split(",")
    modes = args.modes.split(",")
    for what, vals, known in (("--cases", cases, CASES), ("--paths", paths, PATHS),
                              ("--modes", modes, MODES)):
        bad = [v for v in vals if v not in known]
        if bad:
            p.error(f"{what}: unknown {', '.join(bad)}; expected some of {', '.join(known)}")
    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
        tshape = (tuple(int(s) for s in args.torch_shape.lower().split("x")) if args.torch_shape
                  else (2, shape[1], 2, 2))
    except ValueError:
        p.error("--shape / --torch-shape: expected NxCxHxW, e.g. 2x64x32x32")
    if len(shape) != 4 or len(tshape) != 4 or tshape[1] != shape[1]:
        p.error("--shape / --torch-shape: expected NxCxHxW with the same C")

    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory())
        return run(args, quick, repeats, calls, cases, paths, modes, shape, tshape, cache_dir)


def run(args, quick, repeats, calls, cases, paths, modes, shape, tshape, cache_dir) -> int:
    driver_mod = _load("triton_bn_perf_driver", HERE / "compile_check" / "driver.py")
    driver_mod.setup_environment(cache_dir)  # TRITON_INTERPRET=0 before triton / triton_bn load
    sys.path.insert(0, str(Path(args.package_root).resolve()))
    import torch
    import triton

    import triton_bn
    from triton_bn import tuning

    gpu_knobs = _load("triton_bn_perf_scenarios", HERE / "compile_check" / "scenarios.py").GPU_KNOBS
    torch.set_num_threads(1)
    placeholders = args.no_compile
    if not placeholders and (why := driver_mod.toolchain_problem()):
        print(f"NOTE: cannot compile here ({why}); placeholder kernels instead (--no-compile)")
        placeholders = True
    launches = Launches(args.arch, compile_kernels=not placeholders)
    rev = _git_rev(Path(triton_bn.__file__).parent)
    print(f"triton_bn {triton_bn.__file__} ({rev}); torch {torch.__version__}; triton "
          f"{triton.__version__}; sm_{args.arch} stand-in driver, launches stubbed, "
          f"{'placeholder kernels' if placeholders else 'kernels compiled'}; "
          f"{repeats} x {calls} calls per case")
    print(f"triton_bn input {'x'.join(map(str, shape))}; torch.nn.BatchNorm2d baseline on "
          f"{'x'.join(map(str, tshape))} (CPU, 1 thread); GPU knobs {gpu_knobs}")

    # one entry per timed item: (case, provider, path, mode) -> state
    items = []
    for case in cases:
        dtype = getattr(torch, CASES[case][0])
        fmt = torch.channels_last if CASES[case][1] == "channels_last" else torch.contiguous_format
        for mode in modes:
            tm = torch.nn.BatchNorm2d(shape[1])  # fp32 parameters on both sides
            tx = torch.randn(tshape).to(dtype=dtype, memory_format=fmt)
            items.append({"case": case, "provider": "torch", "path": "-", "mode": mode,
                          "fn": make_call(tm, tx, mode), "knobs": {}})
            for path in paths:
                m = triton_bn.BatchNorm2d(shape[1])  # fp32 parameters, half input (as under autocast)
                x = torch.empty(shape, dtype=dtype, memory_format=fmt)
                items.append({"case": case, "provider": "triton_bn", "path": path, "mode": mode,
                              "fn": make_call(m, x, mode), "knobs": {**gpu_knobs, **PATHS[path]}})

    t_compile = time.perf_counter()
    for it in items:  # warm-up: compiles (or caches placeholders for) every specialization
        with tuning.override(**it["knobs"]):
            for _ in range(3):
                it["fn"]()
    print(f"warm-up (compiling) took {time.perf_counter() - t_compile:.1f} s")

    for it in items:  # untimed counting pass
        with tuning.override(**it["knobs"]):
            before, n0 = launches.by_kernel(), launches.total()
            counter = _device_op_counter()
            with counter:
                for _ in range(calls):
                    it["fn"]()
            it["launches"] = (launches.total() - n0) / calls
            kern = launches.by_kernel() - before
            it["kernels"] = " ".join(f"{k.removesuffix('_kernel')}:{v / calls:g}"
                                     for k, v in sorted(kern.items()))
            it["device_ops"] = sum(counter.ops.values()) / calls
            it["ops"] = " ".join(f"{k}:{v / calls:g}" for k, v in sorted(counter.ops.items()))
            it["us"] = []

    for _ in range(repeats):  # interleaved: torch and triton_bn see the same machine load
        for it in items:
            with tuning.override(**it["knobs"]):
                it["us"].append(time_call(it["fn"], calls))

    rows = []
    torch_us = {(it["case"], it["mode"]): it["us"] for it in items if it["provider"] == "torch"}
    base = {k: statistics.median(v) for k, v in torch_us.items()}
    for it in items:
        med = statistics.median(it["us"])
        rows.append({"case": it["case"], "provider": it["provider"], "path": it["path"],
                     "mode": it["mode"], "us_median": round(med, 2),
                     "us_p20": round(_quantile(it["us"], 0.2), 2),
                     "us_p80": round(_quantile(it["us"], 0.8), 2),
                     "ratio_to_torch": round(med / base[(it["case"], it["mode"])], 2),
                     # per repeat against the torch timing right before it: robust to load drifts
                     "ratio_paired": round(statistics.median(
                         u / t for u, t in zip(it["us"], torch_us[(it["case"], it["mode"])])), 2),
                     "launches_per_call": (round(it["launches"], 3)
                                           if it["provider"] == "triton_bn" else ""),
                     "device_ops_per_call": round(it["device_ops"], 3),
                     "kernels": it["kernels"], "aten_device_ops": it["ops"],
                     "triton_bn_rev": rev, "repeats": repeats, "calls": calls})
    _print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


def _git_rev(pkg_dir: Path) -> str:
    import subprocess
    try:
        out = subprocess.run(["git", "-C", str(pkg_dir), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _print_table(rows: list[dict]) -> None:
    head = ("case", "provider", "path", "mode", "us/call", "p20-p80", "x torch", "paired",
            "launches",
            "aten dev ops", "kernels / aten device ops per call")
    table = [head]
    for r in rows:
        detail = r["kernels"] + ("  |  " if r["kernels"] and r["aten_device_ops"] else "") \
            + r["aten_device_ops"]
        table.append((r["case"], r["provider"], r["path"], r["mode"], f"{r['us_median']:.1f}",
                      f"{r['us_p20']:.1f}-{r['us_p80']:.1f}", f"{r['ratio_to_torch']:.2f}",
                      f"{r['ratio_paired']:.2f}",
                      str(r["launches_per_call"]), f"{r['device_ops_per_call']:g}", detail))
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


if __name__ == "__main__":
    sys.exit(main())
