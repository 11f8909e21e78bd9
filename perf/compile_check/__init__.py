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
   single-pass tiles of 4096 ... 32768 elements) to show which tiles spill. The swept values are
   ``tuning.override`` knobs (planner inputs, part of the plans' memo key), so each one plans and
   compiles its own specialization (264 of them on sm_90).

``--cover`` compiles only a greedy covering subset of what was recorded: every constexpr value, pointer
dtype combination, orientation x dtype, warp count and unit tile dimension of every kernel at least once
(~75 of the ~950 specializations without the sweep, ~1 min on 2 busy cores; the full run, 1185 with the
sweep, took 11.5 min per architecture on 2 busy cores, ~22 min of compile time summed).

Prints a table (kernel x flags -> ok / error, regs, spills, shared memory, compile seconds), a per-kernel
summary, the spilling specializations and the full compile errors, and exits 1 when any specialization
fails to compile or needs more shared memory than the architecture has, or when a scenario's launch
code raises (spills are reported, not failures); exit 2 when the bundled NVIDIA toolchain cannot
run here. A kernel whose Triton IR loads, through the same kernel argument, what it stored earlier
with no block barrier in between also fails (``compiler.unsynced_reloads``: a race on a GPU that the
interpreter, one program at a time, cannot show). Flags in the table: pointer dtypes
(x / statistics), BLOCK_A x BLOCK_B (or BLOCK_C), warps, then the constexprs that are set (CF = channels
fast, RES = residual, W / B = weight / bias, UPD = running update, UNB = unbiased, CUM = cumulative
momentum, PREAFF = renorm / adjustment affine, DX / DW / DB / DRES = gradients written, ...).
The compiled kernels go to a fresh temporary Triton cache (``--cache-dir`` to keep / reuse one).

``--ptx-stats`` adds, per specialization, the global loads and stores of its PTX by form (static
instruction counts): ``ld.v4.b32`` is a 16-byte vector access (4 fp32 or 8 bf16 elements, LDG.E.128 in
SASS), ``ld.b32`` / ``ld.b16`` a scalar one; ``vec`` is the share of the bytes those instructions move
that vector instructions move (the per-channel coefficients and statistics are scalar by nature, so
a fully vectorized element kernel shows 80-100 %, a scalar one 0 %). ``--scenario`` keeps only the
specializations that scenarios whose label contains the string launch (``vec:``: the layouts whose
vectorization matters; ``sweep:``: the tile sweep).

Modules: ``driver`` (the compile-only Triton driver and the environment), ``scenarios`` (the
launch code run over many cases, and the tile sweep), ``record`` (the specializations those
launches ask for), ``compiler`` (compile to a cubin; PTX and SASS resource statistics),
``report`` (the tables) and ``cli`` (the command line). ``python perf/compile_check.py`` and
``python -m perf.compile_check`` both run ``cli.main``.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout: import this repository's triton_bn
    sys.path.insert(0, str(ROOT))

from .cli import main  # noqa: E402

__all__ = ["ROOT", "main"]
