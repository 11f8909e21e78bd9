#!/usr/bin/env python
"""Compiles every Triton kernel specialization that triton_bn launches for an NVIDIA GPU, without one.

    python perf/compile_check.py                  # sm_90 (Hopper): every specialization + tile sweep
    python perf/compile_check.py --arch 90,80     # Hopper and Ampere
    python perf/compile_check.py --cover --no-sweep   # a covering subset (tests/test_gpu_compile.py)
    python perf/compile_check.py --list           # the specializations and where they come from
    python perf/compile_check.py --json out.json  # also write the rows as JSON
    python perf/compile_check.py --scenario vec: --no-sweep --ptx-stats
                                                  # vectorized (16-byte) loads / stores per kernel

Triton's CPU interpreter (what the test-suite runs without a GPU) is lenient: code it runs may not
compile for a GPU. This script compiles the kernels the way a GPU run would, down to a cubin with the
ptxas bundled with Triton, but on a machine without a GPU or a CUDA driver:

1. TRITON_INTERPRET=0 and a stand-in Triton driver that reports a CUDA target (sm_XX) and launches
   nothing. With it the REAL launch code in ``triton_bn/ops.py`` (bn_forward, bn_backward,
   local_moments) runs on CPU tensors over many scenarios: training / inference, single pass / split
   (``tuning.override(force_fused=...)``), channels fast (NHWC, (N, C)) / reduction fast (NCHW),
   ghost groups, renorm (Keras and torch), adjustment, residual + ReLU, no affine, cumulative momentum,
   int64 indexing, sync BN (local_moments + global moments + all_reduce), fp32 / fp16 / bf16 / fp64,
   under both the GPU knobs (the tile sizes a GPU run plans) and the interpreter's knobs. A
   ``jit_cache_hook`` records the specialization of every launch (signature, divisibility attributes,
   constexprs, num_warps) and skips it; nothing is executed, so tensor contents do not matter.
2. Every distinct specialization is then compiled (``JITFunction.preload``, i.e. the JIT's own
   compile path: ttir -> ttgir -> llir -> ptx -> cubin) in a pool of worker processes. A failure is
   recorded with its message. For each cubin: registers per thread, spill stores/loads and the stack
   frame (ptxas -v), n_spills as the driver would report it (local memory bytes / 4, from
   cuobjdump --dump-resource-usage) and the static shared memory (Triton's metadata).
3. A tile sweep compiles the element kernels at the tiles / warps a tuned GPU run may pick (the
   ``triton-bn tune`` candidates: split tile 2048 / 4096 / 8192 x 4 / 8 warps, plus 1024 and 16384;
   single-pass tiles of 4096 ... 32768 elements) to show which tiles spill.

``--cover`` compiles only a greedy covering subset of what was recorded: every constexpr value, pointer
dtype combination, orientation x dtype, warp count and unit tile dimension of every kernel at least once
(~75 of ~950 specializations, ~15 s on 2 cores; the full run takes ~2.5 min per architecture).

Prints a table (kernel x flags -> ok / error, regs, spills, shared memory, compile seconds), a per-kernel
summary, the spilling specializations and the full compile errors, and exits 1 when any specialization
fails to compile or needs more shared memory than the architecture has, or when a scenario's launch
code raises (spills are reported, not failures); exit 2 when the bundled NVIDIA toolchain cannot
run here. Flags in the table: pointer dtypes
(x / statistics), BLOCK_A x BLOCK_B (or BLOCK_C), warps, then the constexprs that are set (CF = channels
fast, RES = residual, W / B = weight / bias, UPD = running update, UNB = unbiased, CUM = cumulative
momentum, GAFF = renorm / adjustment affine, DX / DW / DB / DRES = gradients written, ...).
The compiled kernels go to a fresh temporary Triton cache (``--cache-dir`` to keep / reuse one).

``--ptx-stats`` adds, per specialization, the global loads and stores of its PTX by form (static
instruction counts): ``ld.v4.b32`` is a 16-byte vector access (4 fp32 or 8 bf16 elements, LDG.E.128 in
SASS), ``ld.b32`` / ``ld.b16`` a scalar one; ``vec`` is the share of the bytes those instructions move
that vector instructions move (the per-channel coefficients and statistics are scalar by nature, so
a fully vectorized element kernel shows 80-100 %, a scalar one 0 %). ``--scenario`` keeps only the
specializations that scenarios whose label contains the string launch (``vec:``: the layouts whose
vectorization matters; ``sweep:``: the tile sweep).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: import this repository's triton_bn
    sys.path.insert(0, str(ROOT))

# The GPU knobs of tuning.knobs() for a CUDA device (target_programs: 4 x the 132 SMs of an H100).
GPU_KNOBS = {"tile": 4096, "fused_forward_max": 16384, "fused_backward_max": 8192,
             "max_block_channels": 128, "max_block_inner": 1024, "target_programs": 4 * 132}
CPU_KNOBS: dict = {}  # the interpreter's defaults (tuning.knobs on a CPU device)

SHORT = {"CHANNELS_FAST": "CF", "HAS_GROUPS": "GROUPS", "HAS_RESIDUAL": "RES", "HAS_WEIGHT": "W",
         "HAS_BIAS": "B", "HAS_ADJUST": "ADJ", "UPDATE_RUNNING": "UPD", "UNBIASED": "UNB",
         "CUMULATIVE": "CUM", "SAVE_GAFFINE": "GAFF", "FROM_RUNNING": "RUNNING",
         "WRITE_COEFFS": "COEFFS", "HAS_COUNTS": "COUNTS", "HAS_PIVOT": "PIVOT",
         "TRAINING": "TRAIN", "HAS_GAFFINE": "GAFF", "WRITE_DW": "DW", "WRITE_DB": "DB",
         "WRITE_DX": "DX", "WRITE_DRESIDUAL": "DRES", "N_FROM_PTR": "NPTR"}
# opt-in shared memory per block (bytes): a launch needing more fails with OutOfResources
SMEM_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
              100: 232448, 120: 101376}
DT = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "fp64": "f64", "i64": "i64", "i32": "i32"}


# ----------------------------------------------------------------------------------------------
# environment: no interpreter, a driver that compiles for a CUDA target and launches nothing
# ----------------------------------------------------------------------------------------------

def _setup_environment(cache_dir: str) -> None:
    if "triton" in sys.modules:
        import triton.knobs as _knobs
        if _knobs.runtime.interpret:
            raise RuntimeError("triton was imported with TRITON_INTERPRET=1 in this process; run "
                               "compile_check in a fresh process")
    os.environ["TRITON_INTERPRET"] = "0"  # before triton_bn / triton are imported (see __init__)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


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


def _kernels():
    from triton.runtime.jit import JITFunction

    from triton_bn.kernels import backward, forward
    out = {}
    for mod in (forward, backward):
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == mod.__name__:
                out[name] = obj
    return out


def _activate(arch: int) -> None:
    from triton.runtime import driver
    driver.set_active(_make_driver(arch))
    for jf in _kernels().values():  # binders cache the target: rebuild them for this arch
        jf.device_caches.clear()


# ----------------------------------------------------------------------------------------------
# phase 1: run the launch code, record every specialization
# ----------------------------------------------------------------------------------------------

@dataclass
class Spec:
    kernel: str
    fn_key: str  # "module:qualname" in triton's JIT registry
    data: str  # JITFunction specialization data (JSON), for JITFunction.preload
    flags: str
    scenario: str
    arch: int
    tile_sweep: bool = False
    features: frozenset = frozenset()
    scenarios: list = field(default_factory=list)  # every scenario that launched it, in order


@dataclass
class Result:
    kernel: str
    flags: str
    scenario: str
    arch: int
    ok: bool
    error: str = ""
    error_full: str = ""
    n_regs: int | None = None
    n_spills: int | None = None  # local memory bytes / 4, as the CUDA driver reports it
    spill_stores: int | None = None  # bytes, ptxas -v
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    num_warps: int | None = None
    seconds: float = 0.0
    tile_sweep: bool = False
    # global memory instructions in the PTX, by form: {"ld.v4.b32": 8, "st.b32": 3, ...}
    ptx_mem: dict | None = None
    ptx_vector_fraction: float | None = None  # of the global bytes the PTX instructions move


class Recorder:
    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.specs: dict[tuple, Spec] = {}
        self.scenario = ""
        self.tile_sweep = False
        self.scenario_errors: list[tuple[str, str]] = []

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        data = compile["specialization_data"]
        ident = (fn.name, str(key))
        if ident in self.specs:
            self.specs[ident].scenarios.append(self.scenario)
        else:
            jf = fn.jit_function
            parsed = json.loads(data)
            self.specs[ident] = Spec(fn.name, f"{jf.fn.__module__}:{jf.fn.__qualname__}", data,
                                     describe(jf, parsed), self.scenario, self.arch,
                                     self.tile_sweep, features(fn.name, jf, parsed),
                                     [self.scenario])
        return True  # do not compile or launch now

    def run(self, label: str, fn: Callable[[], object], tile_sweep: bool = False) -> None:
        self.scenario, self.tile_sweep = label, tile_sweep
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a scenario that the launch code itself rejects
            self.scenario_errors.append((label, f"{type(e).__name__}: {e}"))


def describe(jf, data: dict) -> str:
    """Compact flags of one specialization: constexprs, pointer dtypes, num_warps."""
    names = jf.arg_names
    consts = {}
    for k, v in zip(data["constant_keys"], data["constant_vals"]):
        if jf.params[k[0]].is_constexpr:  # not the ints specialized as == 1 (strides etc.)
            consts[names[k[0]]] = v
    parts = []
    blocks = [f"{consts.pop(n)}" for n in ("BLOCK_A", "BLOCK_B", "BLOCK_C") if n in consts]
    for n, v in consts.items():
        if n == "RENORM":
            if v:
                parts.append({1: "RENORM=keras", 2: "RENORM=torch"}.get(v, f"RENORM={v}"))
        elif isinstance(v, bool) or v in (0, 1):
            if v:
                parts.append(SHORT.get(n, n))
        else:
            parts.append(f"{SHORT.get(n, n)}={v}")
    sig = data["signature"]
    first_ptr = next((sig[n] for n in names if str(sig.get(n, "")).startswith("*")), "?")
    acc_ptr = next((sig[n] for n in ("Mean", "PartMean", "Scale", "PartSumDy") if n in sig
                    and str(sig[n]).startswith("*")), "?")
    dt = f"{DT.get(first_ptr[1:], first_ptr[1:])}/{DT.get(acc_ptr[1:], acc_ptr[1:])}"
    head = f"{dt} {'x'.join(blocks)} w{data['options'].get('num_warps', '?')}"
    return head + (" " + " ".join(parts) if parts else "")


def features(kernel: str, jf, data: dict) -> frozenset:
    """What a specialization exercises, for --cover: each constexpr value (per kernel), the pointer
    dtypes, the orientation x dtype, the warps, and whether a tile dimension is 1."""
    names = jf.arg_names
    out = {(kernel,)}
    consts = {names[k[0]]: v for k, v in zip(data["constant_keys"], data["constant_vals"])
              if jf.params[k[0]].is_constexpr}
    blocks = [v for n, v in consts.items() if n.startswith("BLOCK_")]
    for n, v in consts.items():
        if not n.startswith("BLOCK_"):
            out.add((kernel, n, v))
    dts = tuple(sorted({v for v in data["signature"].values() if str(v).startswith("*")}))
    out.add((kernel, "dtypes", dts))
    out.add((kernel, "orientation", consts.get("CHANNELS_FAST"), dts))
    out.add((kernel, "warps", data["options"].get("num_warps")))
    out.add((kernel, "unit tile dim", 1 in blocks))
    return frozenset(out)


def cover(specs: list[Spec]) -> list[Spec]:
    """A small subset of specs with every feature of the whole set (greedy set cover)."""
    todo = set().union(*(s.features for s in specs)) if specs else set()
    chosen = []
    while todo:
        best = max(specs, key=lambda s: len(s.features & todo))
        chosen.append(best)
        todo -= best.features
    return chosen


def scenarios(quick: bool):
    """(label, knobs, callable) triples; each callable runs launch code of triton_bn.ops."""
    import torch

    from triton_bn import ops

    def state(K, pdt, *, weight=True, bias=True, running=True, cumulative=False, renorm=0,
              adjust=False):
        def t():
            return torch.empty(K, dtype=pdt)
        d = {"weight": t() if weight else None, "bias": t() if bias else None,
             "running_mean": t() if running else None, "running_var": t() if running else None}
        if cumulative:
            d["num_batches_tracked"] = torch.ones((), dtype=torch.int64)
        if renorm == ops.RENORM_KERAS:
            d.update(renorm_mean=t(), renorm_stddev=t(), moving_stddev=t())
        if adjust:
            d.update(adj_scale=t(), adj_bias=t())
        return d

    def make_x(shape, dtype, layout):
        if layout == "nhwc":
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            return torch.empty(shape, dtype=dtype, memory_format=fmt)
        return torch.empty(shape, dtype=dtype)

    def step(shape, dtype, layout, *, pdt=None, training=True, backward=True, groups=1,
             residual=False, relu=False, need_dres=False, need_dx=True, need_dw=True,
             need_db=True, sync=False, renorm=0, adjust=False, weight=True, bias=True,
             running=True, cumulative=False, unbiased=True, axes=(1,)):
        """One forward (and backward) through ops, as functional.BatchNormFunction does it."""
        pdt = pdt or dtype
        x = make_x(shape, dtype, layout)
        K = 1
        for a in axes:
            K *= shape[a]
        st = state(K, pdt, weight=weight, bias=bias, running=running, cumulative=cumulative,
                   renorm=renorm, adjust=adjust)
        z = torch.empty_like(x) if residual else None
        kw = {"axes": axes, "groups": groups, "training": training, "relu": relu, "renorm": renorm,
              "cumulative": cumulative, "unbiased": unbiased, "rmin": 0.8 if renorm else None,
              "rmax": 1.25 if renorm else None, "dmax": 0.5 if renorm else None}
        gm = None
        global_count = None
        if sync and training:
            mean, m2, count = ops.local_moments(x, axes, groups)
            gm = (torch.stack([mean, mean]), torch.stack([m2, m2]),
                  torch.full((2,), float(count), dtype=mean.dtype))
            global_count = gm[2].sum().reshape(1)
        r = ops.bn_forward(x, residual=z, global_moments=gm, **st, **kw)
        if not backward:
            return
        dy = torch.empty_like(x)
        ops.bn_backward(dy, x, z, r.mean, r.rstd, r.scale, r.shift, r.gscale, r.gshift, axes=axes,
                        groups=groups, training=training, relu=relu, need_dx=need_dx,
                        need_dweight=need_dw and weight, need_dbias=need_db and bias,
                        need_dresidual=need_dres,
                        all_reduce=(lambda t: None) if sync and training else None,
                        global_count=global_count)

    @contextlib.contextmanager
    def force_int64():
        old = ops._needs_int64
        ops._needs_int64 = lambda *t: True
        try:
            yield
        finally:
            ops._needs_int64 = old

    # shapes: the (fused, split) plans they get under the GPU knobs are noted
    NCHW_SMALL = (4, 8, 7, 7)        # fused fwd 4x64, fused bwd
    NCHW_MID = (16, 8, 32, 32)       # fused fwd 16x1024 (8 warps); split bwd 4x1024
    NCHW_BIG = (64, 4, 56, 56)       # split 4x1024
    NHWC_SMALL = (8, 16, 4, 4)       # fused 128x16
    NHWC_MID = (16, 64, 8, 8)        # fused fwd 1024x16; split bwd 64x64
    NHWC_WIDE = (32, 256, 8, 8)      # split 32x128
    NC = (256, 64)                   # fused fwd 256x64 / bwd 128x64 (GPU knobs)
    NC_SMALLC = (100000, 3)          # split 1024x4

    out = []
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    dname = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float64: "fp64"}

    def add(label, knobs, fn, ctx=None):
        out.append((label, knobs, fn, ctx))

    def lay(layout):
        return "nchw" if layout == "nc" else layout

    # 1. the plain training / inference step: every dtype x layout x (single pass, split)
    kn_sets = [("gpu", GPU_KNOBS)] if quick else [("gpu", GPU_KNOBS), ("cpu", CPU_KNOBS)]
    if quick:
        core = [(dt, sh) for dt in (torch.float32, torch.bfloat16, torch.float64)
                for sh in (("nchw", NCHW_MID), ("nhwc", NHWC_MID))] + [(torch.float16, ("nc", NC))]
    else:
        core = [(dt, sh) for dt in dtypes
                for sh in (("nchw", NCHW_SMALL), ("nchw", NCHW_MID), ("nchw", NCHW_BIG),
                           ("nhwc", NHWC_SMALL), ("nhwc", NHWC_MID), ("nhwc", NHWC_WIDE), ("nc", NC),
                           ("nc", NC_SMALLC))]
    for kname, kn in kn_sets:
        for dt, (layout, shape) in core:
            tag = f"{kname}:{dname[dt]}:{layout}{'x'.join(map(str, shape))}"
            mem = lay(layout)
            for fused in (True, False):
                add(f"{tag}:train:{'fused' if fused else 'split'}", {**kn, "force_fused": fused},
                    lambda s=shape, d=dt, m=mem: step(s, d, m))
            add(f"{tag}:eval", kn, lambda s=shape, d=dt, m=mem: step(s, d, m, training=False))

    # 2. features (GPU knobs), single pass and split
    features = {
        "keras_renorm+adjust+res+relu": {"renorm": ops.RENORM_KERAS, "adjust": True, "residual": True,
                                         "relu": True, "need_dres": True, "unbiased": False},
        "torch_renorm+cumulative": {"renorm": ops.RENORM_TORCH, "cumulative": True},
        "no_affine+no_running+relu": {"weight": False, "bias": False, "running": False, "relu": True},
        "residual_noact+dres_only": {"residual": True, "need_dres": True, "need_dx": False},
        "res+relu+dres_only": {"residual": True, "relu": True, "need_dres": True, "need_dx": False,
                               "need_dw": False},
        "weight_only+params_fp32": {"bias": False, "pdt": torch.float32},
    }
    feat_shapes = [("nchw", NCHW_MID), ("nhwc", NHWC_MID), ("nc", NC)]
    if quick:
        feat_cases = [(torch.float32, ("nchw", NCHW_MID), "keras_renorm+adjust+res+relu"),
                      (torch.bfloat16, ("nhwc", NHWC_MID), "keras_renorm+adjust+res+relu"),
                      (torch.float32, ("nhwc", NHWC_MID), "torch_renorm+cumulative"),
                      (torch.float16, ("nchw", NCHW_MID), "no_affine+no_running+relu")]
    else:
        feat_cases = [(dt, sh, f) for dt in dtypes for sh in feat_shapes for f in features]
    for dt, (layout, shape), fname in feat_cases:
        mem = lay(layout)
        for fused in (True, False):
            add(f"gpu:{dname[dt]}:{layout}:{fname}:{'fused' if fused else 'split'}",
                {**GPU_KNOBS, "force_fused": fused},
                lambda s=shape, d=dt, m=mem, f=features[fname]: step(s, d, m, **f))

    # 3. inference with residual + ReLU; ghost batches and sync BN (split path only)
    group_cases = ([(torch.float32, ("nchw", NCHW_MID)), (torch.bfloat16, ("nhwc", NHWC_MID))]
                   if quick else [(dt, sh) for dt in dtypes for sh in feat_shapes])
    for dt, (layout, shape) in group_cases:
        tag = f"gpu:{dname[dt]}:{layout}"
        mem = lay(layout)
        add(f"{tag}:eval+res+relu+nobias", GPU_KNOBS,
            lambda s=shape, d=dt, m=mem: step(s, d, m, training=False, residual=True, relu=True,
                                            bias=False, need_dres=True))
        add(f"{tag}:ghost4", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, groups=4))
        add(f"{tag}:ghost4+keras_renorm+adjust", GPU_KNOBS,
            lambda s=shape, d=dt, m=mem: step(s, d, m, groups=4, renorm=ops.RENORM_KERAS, adjust=True))
        add(f"{tag}:sync", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, sync=True))
        if not quick:
            add(f"{tag}:sync+ghost2+relu", GPU_KNOBS,
                lambda s=shape, d=dt, m=mem: step(s, d, m, sync=True, groups=2, relu=True))

    # 4. int64 indexing (forced: tensors over 2**31 elements cannot be allocated here)
    i64_cases = ([(torch.float32, ("nchw", NCHW_MID)), (torch.float32, ("nhwc", NHWC_MID))] if quick
                 else [(dt, sh) for dt in (torch.float32, torch.bfloat16, torch.float64)
                       for sh in feat_shapes])
    for dt, (layout, shape) in i64_cases:
        tag = f"gpu:{dname[dt]}:{layout}:int64"
        mem = lay(layout)
        for fused in (True, False):
            add(f"{tag}:{'fused' if fused else 'split'}", {**GPU_KNOBS, "force_fused": fused},
                lambda s=shape, d=dt, m=mem: step(s, d, m, residual=True, relu=True, need_dres=True),
                force_int64)
        add(f"{tag}:eval", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, training=False),
            force_int64)
        add(f"{tag}:ghost2", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, groups=2),
            force_int64)

    # 5. degenerate tiles (extents of 1), empty inputs, copies, 5-D, mixed parameter dtypes
    edges = [((1, 1), "nchw"), ((7, 1), "nchw"), ((1, 5), "nchw"), ((3, 5, 1, 1), "nchw"),
             ((1, 4, 3, 3), "nchw"), ((2, 3, 1, 1000), "nchw"), ((1, 3, 5, 5), "nhwc"),
             ((0, 4, 3, 3), "nchw")]
    if quick:
        edges = [((1, 1), "nchw"), ((1, 5), "nchw"), ((7, 1), "nchw")]
    for dt in ((torch.float32,) if quick else (torch.float32, torch.bfloat16)):
        for shape, layout in edges:
            tag = f"gpu:{dname[dt]}:edge{'x'.join(map(str, shape))}:{layout}"
            for fused in (True, False):
                add(f"{tag}:{'fused' if fused else 'split'}", {**GPU_KNOBS, "force_fused": fused},
                    lambda s=shape, d=dt, m=layout: step(s, d, m))
            add(f"{tag}:eval", GPU_KNOBS, lambda s=shape, d=dt, m=layout: step(s, d, m, training=False))
            if not quick and shape[0] % 2 == 0 and shape[0] > 0:
                add(f"{tag}:ghost2", GPU_KNOBS, lambda s=shape, d=dt, m=layout: step(s, d, m, groups=2))
    if not quick:
        add("gpu:fp32:ghost8_one_sample_each", GPU_KNOBS,
            lambda: step((8, 3), torch.float32, "nchw", groups=8))
        add("gpu:fp32:multi_axis(1,3)", GPU_KNOBS,
            lambda: step((4, 6, 5, 7), torch.float32, "nchw", axes=(1, 3)))
        add("gpu:bf16:ndhwc", GPU_KNOBS, lambda: step((4, 16, 4, 4, 4), torch.bfloat16, "nhwc"))
        add("gpu:fp16:x_fp16_params_fp64", GPU_KNOBS,
            lambda: step(NCHW_MID, torch.float16, "nchw", pdt=torch.float64))
        add("gpu:fp64:x_fp64_params_fp16", GPU_KNOBS,
            lambda: step(NHWC_MID, torch.float64, "nhwc", pdt=torch.float16))

        # 6. the memory-bound layouts whose vectorized (16-byte) loads / stores matter
        #    (--scenario vec: --ptx-stats): ResNet-50's first stage NCHW fp32 and channels_last bf16
        #    (split path), a late stage NCHW (single pass; 49-element rows cannot be 16-byte
        #    aligned) and the small-C rank-2 case
        vec_cases = [(torch.float32, "nchw", (32, 64, 56, 56), (False,)),
                     (torch.bfloat16, "nhwc", (32, 64, 56, 56), (False,)),
                     (torch.float32, "nchw", (32, 2048, 7, 7), (True,)),
                     (torch.float32, "nchw", (65536, 3), (False,))]
        for dt, layout, shape, fused_modes in vec_cases:
            tag = f"vec:{dname[dt]}:{layout if len(shape) > 2 else 'nc'}{'x'.join(map(str, shape))}"
            for fused in fused_modes:
                add(f"{tag}:train:{'fused' if fused else 'split'}", {**GPU_KNOBS, "force_fused": fused},
                    lambda s=shape, d=dt, m=layout: step(s, d, m))
            add(f"{tag}:eval", GPU_KNOBS, lambda s=shape, d=dt, m=layout: step(s, d, m, training=False))
            add(f"{tag}:res+relu", GPU_KNOBS,
                lambda s=shape, d=dt, m=layout: step(s, d, m, residual=True, relu=True, need_dres=True))
    return out, step


@contextlib.contextmanager
def tuned_entry(entry: dict):
    """Makes plan_tiles honour ``entry`` for every shape, as a ``triton-bn tune`` cache would."""
    from triton_bn import tuning
    old = tuning.cached_entry
    tuning.cached_entry = lambda kind, geo, dtype: entry
    try:
        yield
    finally:
        tuning.cached_entry = old


def tile_sweep(step):
    """The main element kernels over the tile sizes and warps a tuned GPU run can pick (the tuner's
    candidates: split tile 2048 / 4096 / 8192 x 4 / 8 warps) plus 1024 and 16384, and the single-pass
    kernels up to twice the default limits. (label, knobs, callable, context) like scenarios()."""
    import torch
    out = []
    for dt, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float64, "fp64")):
        for tile, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 4), (8192, 8),
                            (16384, 4), (16384, 8)):
            for layout, shape in (("nchw", (64, 4, 56, 56)), ("nhwc", (32, 256, 8, 8))):
                entry = {"fused": False, "tile": tile, "num_warps": warps}
                out.append((f"sweep:{dn}:{layout}:split_tile{tile}_w{warps}", GPU_KNOBS,
                            lambda s=shape, d=dt, lay=layout: step(s, d, lay),
                            lambda e=entry: tuned_entry(e)))
        for fmax in (4096, 8192, 16384, 32768):
            # shapes whose single-pass tile is exactly fmax elements: [fmax/1024, 1024] (NCHW,
            # 32 x 32 images) and [fmax/64, 64] (NHWC, 64 channels, 4 x 4 images)
            for layout, shape in (("nchw", (fmax // 1024, 4, 32, 32)),
                                  ("nhwc", (fmax // 1024, 64, 4, 4))):
                out.append((f"sweep:{dn}:{layout}:fused_max{fmax}",
                            dict(GPU_KNOBS, force_fused=True, fused_forward_max=fmax,
                                 fused_backward_max=fmax),
                            lambda s=shape, d=dt, lay=layout: step(s, d, lay), None))
    return out


def collect(arch: int, quick: bool, sweep: bool) -> Recorder:
    from triton import knobs

    from triton_bn import tuning

    _activate(arch)
    rec = Recorder(arch)
    knobs.runtime.jit_cache_hook = rec.hook
    try:
        items, step = scenarios(quick)
        for label, kn, fn, ctx in items:
            with tuning.override(**kn), (ctx() if ctx else contextlib.nullcontext()):
                rec.run(label, fn)
        if sweep:
            for label, kn, fn, ctx in tile_sweep(step):
                with tuning.override(**kn), (ctx() if ctx else contextlib.nullcontext()):
                    rec.run(label, fn, tile_sweep=True)
    finally:
        knobs.runtime.jit_cache_hook = None
    return rec


# ----------------------------------------------------------------------------------------------
# phase 2: compile each specialization
# ----------------------------------------------------------------------------------------------

_SPECS: list[Spec] = []
_CUOBJDUMP: str | None = None


def _tool(name: str) -> str | None:
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else shutil.which(name)


def _jit_functions() -> dict:
    """name -> JITFunction of every @triton.jit function in triton_bn.kernels (kernels and helpers)."""
    from triton.runtime.jit import JITFunction

    from triton_bn.kernels import backward, common, forward
    out = {}
    for mod in (common, forward, backward):
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction):
                out.setdefault(name, obj)
    return out


def _where(err) -> str:
    """file:line of a CompilationError (its node's line inside the function it names)."""
    m = re.search(r"^def\s+(\w+)", err.src or "", re.MULTILINE)
    node_line = getattr(err.node, "lineno", None)
    if not m or node_line is None:
        return "?"
    jf = _jit_functions().get(m.group(1))
    if jf is None:
        return f"{m.group(1)}:{node_line}"
    path = Path(jf.fn.__code__.co_filename)
    with contextlib.suppress(ValueError):
        path = path.relative_to(ROOT)
    return f"{path}:{jf.def_file_line_number + node_line - 1} ({m.group(1)})"


def _chain(e: BaseException) -> list:
    out = []
    cur: BaseException | None = e
    while cur is not None and len(out) < 20:
        out.append(cur)
        cur = cur.__cause__ or (cur.__context__ if not cur.__suppress_context__ else None)
    return out


def _short_error(e: BaseException) -> str:
    """One line: where (the innermost jit function's file:line) and the innermost message."""
    from triton.compiler.errors import CompilationError
    chain = _chain(e)
    comp = [c for c in chain if isinstance(c, CompilationError)]
    if comp:
        inner = comp[-1]
        msg = (inner.error_message or "").strip()
        last = chain[-1]
        if not msg and last is not inner:
            msg = f"{type(last).__name__}: {str(last).strip()}"
        msg = msg.splitlines()[-1] if msg else type(inner).__name__
        return f"{_where(inner)}: {msg}"[:300]
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    interesting = [ln for ln in lines if "error" in ln.lower()]
    msg = (interesting or lines or [""])[0]
    return f"{type(e).__name__}: {msg}"[:300]


def _resource_usage(cubin: bytes, name: str) -> dict:
    out = {}
    if not _CUOBJDUMP:
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        txt = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", path], capture_output=True,
                             text=True, timeout=60, check=False).stdout
    finally:
        os.unlink(path)
    for key, field_ in (("REG", "n_regs"), ("STACK", "stack"), ("LOCAL", "local")):
        m = re.search(rf"\b{key}:(\d+)", txt)
        if m:
            out[field_] = int(m.group(1))
    return out


_PTX_MEM = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")


def ptx_memory_ops(ptx: str) -> dict:
    """Global loads / stores in PTX by form, e.g. {"ld.v4.b32": 8, "ld.b32": 1, "st.b16": 4}:
    the vector width (none = scalar) and the element type of each ld.global / st.global
    (cache modifiers dropped). Static instruction counts, not executed ones."""
    out: dict = {}
    for op, mods in _PTX_MEM.findall(ptx):
        parts = mods.strip(".").split(".")
        vec = next((m for m in parts if re.fullmatch(r"v\d+", m)), None)
        ty = next((m for m in reversed(parts) if re.fullmatch(r"[bsuf]\d+", m)), "?")
        key = f"{op}.{vec}.{ty}" if vec else f"{op}.{ty}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def vector_fraction(mem: dict) -> float | None:
    """The share of the bytes moved by the instructions of ``mem`` (ptx_memory_ops) that vector
    (v2 / v4 / v8) instructions move; None without global memory instructions."""
    total = vec = 0
    for key, n in mem.items():
        parts = key.split(".")
        width = int(parts[1][1:]) if parts[1].startswith("v") else 1
        m = re.fullmatch(r"[bsuf](\d+)", parts[-1])
        nbytes = n * width * (int(m.group(1)) // 8 if m else 4)
        total += nbytes
        vec += nbytes if width > 1 else 0
    return vec / total if total else None


def format_memory_ops(mem: dict | None) -> str:
    if not mem:
        return "-"
    return " ".join(f"{k}x{v}" for k, v in mem.items())


def _compile_one(i: int) -> Result:
    from triton import knobs
    from triton.runtime.jit import _triton_jit_function_registry

    spec = _SPECS[i]
    res = Result(spec.kernel, spec.flags, spec.scenario, spec.arch, ok=False,
                 tile_sweep=spec.tile_sweep)
    jf = _triton_jit_function_registry[spec.fn_key]
    knobs.runtime.jit_cache_hook = None
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = jf.preload(spec.data)
    except Exception as e:  # noqa: BLE001 - every compile error is a result
        res.seconds = time.perf_counter() - t0
        res.error = _short_error(e)
        res.error_full = "\n".join(
            "".join(traceback.format_exception_only(type(c), c)).strip()
            for c in _chain(e))
        return res
    res.seconds = time.perf_counter() - t0
    res.ok = True
    md = kernel.metadata
    ptx = kernel.asm.get("ptx")
    if ptx:
        res.ptx_mem = ptx_memory_ops(ptx)
        res.ptx_vector_fraction = vector_fraction(res.ptx_mem)
    res.shared = int(md.shared)
    res.num_warps = int(md.num_warps)
    limit = SMEM_LIMIT.get(spec.arch)
    if limit is not None and res.shared > limit:  # what CompiledKernel._init_handles would raise
        res.ok = False
        res.error = f"OutOfResources: shared memory {res.shared} > {limit} bytes of sm_{spec.arch}"
        res.error_full = res.error
    text = log.getvalue()
    m = re.search(r"Used (\d+) registers", text)
    if m:
        res.n_regs = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        res.stack, res.spill_stores, res.spill_loads = map(int, m.groups())
    usage = _resource_usage(kernel.asm["cubin"], kernel.name)
    if res.n_regs is None:
        res.n_regs = usage.get("n_regs")
    # the CUDA driver's n_spills is the function's local memory (LOCAL_SIZE_BYTES) / 4: the
    # per-thread stack frame (where ptxas spills) plus any local arrays
    stack = usage.get("stack", res.stack)
    if stack is not None or "local" in usage:
        res.n_spills = ((stack or 0) + usage.get("local", 0)) // 4
    return res


def compile_all(specs: list[Spec], jobs: int) -> list[Result]:
    global _SPECS, _CUOBJDUMP
    _SPECS = specs
    _CUOBJDUMP = _tool("cuobjdump")
    if jobs <= 1 or len(specs) <= 1:
        return [_compile_one(i) for i in range(len(specs))]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    # fork: the workers inherit the recorded specializations, the compile-only driver and imports
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_compile_one, range(len(specs)), chunksize=1))


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


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    return "-" if v is None else str(v)


def print_table(results: list[Result], file=sys.stdout) -> None:
    results = sorted(results, key=lambda r: (r.arch, r.tile_sweep, r.kernel, r.flags))
    kw = max([len("kernel")] + [len(r.kernel) for r in results])
    fw = max([len("flags")] + [len(r.flags) for r in results])
    head = (f"{'sm':>3} {'kernel':<{kw}} {'flags':<{fw}} {'status':<6} {'regs':>4} {'spill':>5} "
            f"{'st/ld B':>9} {'smem':>6} {'sec':>5}  error / first scenario")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in results:
        status = "ok" if r.ok else "ERROR"
        stld = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        print(f"{r.arch:>3} {r.kernel:<{kw}} {r.flags:<{fw}} {status:<6} {_fmt(r.n_regs):>4} "
              f"{_fmt(r.n_spills):>5} {stld:>9} {_fmt(r.shared):>6} {r.seconds:5.1f}  "
              f"{r.error if not r.ok else r.scenario}", file=file)


def print_ptx_stats(results: list[Result], file=sys.stdout) -> None:
    """Per specialization: registers and the global loads / stores of its PTX by vector width
    (ld.v4.b32 = one 16-byte access; ld.b32 = a scalar 4-byte one), and the share of the bytes they
    move that vector instructions move ("vec")."""
    rows = sorted((r for r in results if r.ok), key=lambda r: (r.arch, r.tile_sweep, r.kernel, r.flags))
    if not rows:
        return
    kw = max(len(r.kernel) for r in rows)
    fw = max(len(r.flags) for r in rows)
    print("\nGlobal memory instructions in the PTX (static counts; vec = share of the bytes moved "
          "by v2/v4 instructions):", file=file)
    print(f"{'sm':>3} {'kernel':<{kw}} {'flags':<{fw}} {'regs':>4} {'vec':>4}  loads / stores", file=file)
    for r in rows:
        frac = "-" if r.ptx_vector_fraction is None else f"{r.ptx_vector_fraction:4.0%}"
        print(f"{r.arch:>3} {r.kernel:<{kw}} {r.flags:<{fw}} {_fmt(r.n_regs):>4} {frac:>4}  "
              f"{format_memory_ops(r.ptx_mem)}   <- {r.scenario}", file=file)


def print_summary(results: list[Result], scenario_errors, elapsed: float, file=sys.stdout) -> None:
    print(file=file)
    for arch in sorted({r.arch for r in results}):
        rs = [r for r in results if r.arch == arch]
        bad = [r for r in rs if not r.ok]
        spill = [r for r in rs if r.ok and (r.n_spills or r.spill_stores)]
        print(f"sm_{arch}: {len(rs)} specializations, {len(rs) - len(bad)} ok, {len(bad)} failed, "
              f"{len(spill)} spill; compile time {sum(r.seconds for r in rs):.1f} s (summed)",
              file=file)
        kernels = sorted({r.kernel for r in rs})
        for k in kernels:
            kr = [r for r in rs if r.kernel == k and r.ok]
            if not kr:
                continue
            worst = max(kr, key=lambda r: (r.n_spills or 0, r.n_regs or 0))
            print(f"  {k:<28} {len(kr):3d} ok, regs {min(r.n_regs or 0 for r in kr)}-"
                  f"{max(r.n_regs or 0 for r in kr)}, max spill {worst.n_spills} "
                  f"({worst.flags}), max smem {max(r.shared or 0 for r in kr)}", file=file)
    spills = sorted((r for r in results if r.ok and r.spill_stores),
                    key=lambda r: (r.arch, r.kernel, -(r.spill_stores or 0)))
    if spills:
        print("\nSpilling specializations (ptxas spill stores/loads bytes per thread; tile = "
              "BLOCK_A x BLOCK_B):", file=file)
        for r in spills:
            print(f"  sm_{r.arch} {r.kernel:<26} {r.flags:<58} regs {_fmt(r.n_regs):>3} "
                  f"spill {r.spill_stores}/{r.spill_loads} B  <- {r.scenario}", file=file)
    errs = [r for r in results if not r.ok]
    if errs:
        print("\nCompile errors (full messages, one per distinct message):", file=file)
        seen = set()
        for r in errs:
            key = (r.kernel, r.error)
            if key in seen:
                continue
            seen.add(key)
            print(f"\n[sm_{r.arch}] {r.kernel} [{r.flags}] (scenario {r.scenario}):\n{r.error_full}",
                  file=file)
    if scenario_errors:
        print("\nScenarios whose launch code raised (not compile errors):", file=file)
        for label, msg in scenario_errors:
            print(f"  {label}: {msg}", file=file)
    print(f"\nwall time {elapsed:.1f} s", file=file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90", help="comma-separated compute capabilities (90, 80, ...)")
    p.add_argument("--quick", action="store_true", help="a representative subset (the tests')")
    p.add_argument("--no-sweep", action="store_true", help="skip the tile-size sweep")
    p.add_argument("--cover", action="store_true",
                   help="compile only a covering subset: every constexpr value, dtype, orientation, "
                        "warps of every kernel at least once (the test-suite's check)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--kernel", default="", help="only kernels whose name contains this")
    p.add_argument("--cache-dir", default=None, help="Triton cache dir (default: a fresh temp dir)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--list", action="store_true", help="list the specializations, compile nothing")
    p.add_argument("--scenario", default="",
                   help="only specializations that a scenario whose label contains this launches "
                        "(e.g. 'vec:' for the layouts whose vectorization matters)")
    p.add_argument("--ptx-stats", action="store_true",
                   help="also print each specialization's global loads / stores in the PTX by "
                        "vector width (ld.v4.b32 = 16-byte access) and registers")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    tmp = None
    cache_dir = args.cache_dir
    if cache_dir is None:
        tmp = tempfile.mkdtemp(prefix="triton_bn_compile_check_")
        cache_dir = tmp
    try:
        _setup_environment(cache_dir)
        problem = toolchain_problem()
        if problem:
            print(f"cannot compile for an NVIDIA GPU here: {problem}")
            return 2
        results: list[Result] = []
        scenario_errors = []
        for arch in [int(a) for a in args.arch.split(",") if a.strip()]:
            rec = collect(arch, args.quick, sweep=not (args.no_sweep or args.quick))
            specs = [s for s in rec.specs.values() if args.kernel in s.kernel
                     and any(args.scenario in lbl for lbl in s.scenarios)]
            for s in specs:  # name the first scenario that matched
                s.scenario = next(lbl for lbl in s.scenarios if args.scenario in lbl)
            n_all = len(specs)
            if args.cover:
                specs = cover(specs)
            scenario_errors += [(f"sm_{arch} {lbl}", m) for lbl, m in rec.scenario_errors]
            print(f"sm_{arch}: {n_all} distinct specializations from the launch code"
                  + (f", compiling a covering subset of {len(specs)}" if args.cover else "")
                  + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
            if args.list:
                for s in specs:
                    print(f"  {s.kernel:<28} {s.flags}   <- {s.scenario}")
                continue
            results += compile_all(specs, args.jobs)
        if args.list:
            return 0
        print_table(results)
        if args.ptx_stats:
            print_ptx_stats(results)
        print_summary(results, scenario_errors, time.perf_counter() - t0)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
        return 1 if any(not r.ok for r in results) or scenario_errors else 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
