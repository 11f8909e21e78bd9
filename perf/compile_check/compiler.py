"""Phase 2: compile each recorded specialization to a cubin with the JIT's own compile path, in a
pool of worker processes, and read its resources: registers, spills and stack (ptxas -v), local
memory (cuobjdump --dump-resource-usage), shared memory (Triton's metadata) and the global loads /
stores of its PTX."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import ROOT
from .driver import jit_function, tool, unwrap
from .record import Spec

# opt-in shared memory per block (bytes): a launch needing more fails with OutOfResources
SMEM_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
              100: 232448, 120: 101376}


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
    blocks: list | None = None  # the BLOCK_* constexprs (flags shows them as BLOCK_A x BLOCK_B)
    # global memory instructions in the PTX, by form: {"ld.v4.b32": 8, "st.b32": 3, ...}
    ptx_mem: dict | None = None
    ptx_vector_fraction: float | None = None  # of the global bytes the PTX instructions move
    # the SASS (sass_main_loop): instructions, block barriers and global load widths (bytes) of
    # the main loop (the innermost loop with global loads), or of the whole kernel when it has none
    sass_loop: bool | None = None
    sass_instructions: int | None = None
    sass_barriers: int | None = None
    sass_load_bytes: list | None = None
    elements_per_thread: float | None = None  # of one loop iteration (one tile), or of the kernel
    instructions_per_element: float | None = None  # sass_instructions / elements_per_thread
    scenarios: list | None = None  # every scenario that launched it



_SPECS: list[Spec] = []
_CUOBJDUMP: str | None = None
_WITH_SASS = True  # compile_all(sass=...): disassemble for the main-loop columns


def _jit_functions() -> dict:
    """name -> JITFunction of every @triton.jit function in triton_bn.kernels (kernels and helpers)."""
    from triton.runtime.jit import JITFunction

    from triton_bn.kernels import backward, common, forward, persistent
    out = {}
    for mod in (common, forward, backward, persistent):
        for name, obj in vars(mod).items():
            obj = unwrap(obj)
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
    first = getattr(jf, "def_file_line_number", None)  # triton 3.9; 3.6: starting_line_number
    if first is None:
        first = getattr(jf, "starting_line_number", 1)
    return f"{path}:{first + node_line - 1} ({m.group(1)})"


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


def _sass(cubin: bytes) -> str:
    if not _CUOBJDUMP:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_CUOBJDUMP, "-sass", path], capture_output=True, text=True,
                              timeout=120, check=False).stdout
    finally:
        os.unlink(path)


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


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LDG_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction without its predicate) of each SASS instruction of ``cuobjdump
    -sass``, NOPs left out."""
    out = []
    for addr, text in _SASS_LINE.findall(sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", text)
        if not text.startswith("NOP"):
            out.append((int(addr, 16), text))
    return out


def sass_main_loop(sass: str) -> dict:
    """The main loop of a kernel's SASS: the first innermost loop (a backward branch whose range
    holds no other) with global loads (LDG) in the code (bn_stats_kernel's second pass, taken only
    for a pivot far from the mean, and the reductions' finalize, run by the last program of a
    channel tile, come after the main loop). Returns {"loop": True,
    "instructions", "barriers" (BAR.*), "load_bytes" (distinct LDG widths)}: static counts over
    the loop's address range, each instruction once. A kernel without a loop that loads (a single
    pass over one tile) gets the same counts over the whole kernel and "loop": False."""
    ins = sass_instructions(sass)
    edges = []
    for addr, text in ins:
        m = re.match(r"BRA(?:\.\w+)*\s+(?:\S+,\s*)?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            edges.append((int(m.group(1), 16), addr))
    inner = [(lo, hi) for lo, hi in edges
             if not any((lo, hi) != e and lo <= e[0] and e[1] <= hi for e in edges)]

    def stats(lo, hi):
        body = [t for a, t in ins if lo <= a <= hi and t != f"BRA {a:#x}"]  # not the end's self-loop
        loads = [t for t in body if t.startswith("LDG")]
        widths = sorted({next((_LDG_WIDTH[p] for p in t.split()[0].split(".") if p in _LDG_WIDTH), 4)
                         for t in loads})
        return {"instructions": len(body), "barriers": sum(t.startswith("BAR.") for t in body),
                "load_bytes": widths, "n_loads": len(loads)}

    loops = [dict(stats(lo, hi), loop=True) for lo, hi in sorted(inner)]
    loops = [st for st in loops if st["n_loads"]]
    if loops:  # the first in the code: later ones are the rare far-pivot pass and the finalize's
        return loops[0]  # merge of the parts (the last program of a tile only)
    whole = stats(0, ins[-1][0] if ins else 0)
    return dict(whole, loop=False)


_SSA = r"%[\w.#]+"
_PTR_DEF = re.compile(rf"({_SSA}) = tt\.(?:splat|addptr|broadcast|expand_dims|reshape) ({_SSA})")
_PTR_ARG = re.compile(rf"({_SSA}): !tt\.ptr")
_MEM_OP = re.compile(rf"\btt\.(store|load) ({_SSA})")
_BARRIER = re.compile(r"\b(?:gpu|ttg)\.barrier\b")


def unsynced_reloads(ttir: str) -> list[str]:
    """Global stores read back later in the same kernel with no block barrier in between, from the
    Triton IR: "Rstd: stored on line 99, loaded on line 142". Pointers are traced to the kernel
    argument they derive from (splat / addptr / broadcast chains), and the IR is read in program
    order. Without a barrier, a thread may read an element another thread of the block has not yet
    written: correct only while Triton happens to give both accesses the same thread mapping."""
    root: dict[str, str] = {}
    stored: dict[str, int] = {}
    hazards = []
    for lineno, line in enumerate(ttir.splitlines(), 1):
        for arg in _PTR_ARG.findall(line):
            root[arg] = arg[1:]
        m = _PTR_DEF.search(line)
        if m and m.group(2) in root:
            root[m.group(1)] = root[m.group(2)]
        if _BARRIER.search(line):
            stored.clear()
        m = _MEM_OP.search(line)
        if m and m.group(2) in root:
            name = root[m.group(2)]
            if m.group(1) == "store":
                stored.setdefault(name, lineno)
            elif name in stored:
                hazards.append(f"{name}: stored on line {stored[name]}, loaded on line {lineno}")
    return hazards


# kernels with a grid-wide barrier (kernels/persistent.py grid_barrier), compiled as PHASE 0
GRID_BARRIER_KERNELS = ("bn_persistent_forward_kernel", "bn_persistent_backward_kernel")


def has_grid_barrier(ptx: str) -> bool:
    """Whether the PTX arrives with a release atomic add and polls with an acquire load at GPU
    scope (what grid_barrier compiles to)."""
    return (re.search(r"atom\.global\.gpu\.release\.add", ptx) is not None
            and re.search(r"ld\.global\.gpu\.acquire", ptx) is not None)


def loaded_after_grid_barrier(ttir: str) -> set:
    """The kernel arguments loaded after the grid barrier's atomic arrival, from the Triton IR
    (pointers traced to their argument as in unsynced_reloads). A persistent kernel reads its
    activations (X, DY) before the barrier only: once."""
    root: dict[str, str] = {}
    after = False
    out = set()
    for line in ttir.splitlines():
        for arg in _PTR_ARG.findall(line):
            root[arg] = arg[1:]
        m = _PTR_DEF.search(line)
        if m and m.group(2) in root:
            root[m.group(1)] = root[m.group(2)]
        if "tt.atomic_rmw" in line:
            after = True
        m = _MEM_OP.search(line)
        if after and m and m.group(1) == "load" and m.group(2) in root:
            out.add(root[m.group(2)])
    return out


def _compile_one(i: int) -> Result:
    from triton import knobs

    spec = _SPECS[i]
    res = Result(spec.kernel, spec.flags, spec.scenario, spec.arch, ok=False,
                 tile_sweep=spec.tile_sweep, blocks=list(spec.blocks),
                 scenarios=list(spec.scenarios))
    jf = jit_function(spec.fn_key)
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
    hazards = unsynced_reloads(kernel.asm.get("ttir", ""))
    if hazards:  # a race on a GPU that the interpreter (one program at a time) cannot show
        res.ok = False
        res.error = "store then load of the same pointer without a barrier: " + "; ".join(hazards)
        res.error_full = res.error
    md = kernel.metadata
    ptx = kernel.asm.get("ptx")
    if ptx and spec.kernel in GRID_BARRIER_KERNELS and not has_grid_barrier(ptx):
        res.ok = False
        res.error = ("grid barrier missing: no release atomic add and acquire load on the counter "
                     "in the PTX")
        res.error_full = res.error
    if spec.kernel in GRID_BARRIER_KERNELS:
        reread = loaded_after_grid_barrier(kernel.asm.get("ttir", "")) & {"X", "DY"}
        if reread:
            res.ok = False
            res.error = f"read again after the grid barrier: {', '.join(sorted(reread))}"
            res.error_full = res.error
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
    sass = _sass(kernel.asm["cubin"]) if _WITH_SASS else ""
    if sass:
        loop = sass_main_loop(sass)
        res.sass_loop, res.sass_instructions = loop["loop"], loop["instructions"]
        res.sass_barriers, res.sass_load_bytes = loop["barriers"], loop["load_bytes"]
        tile = 1
        for b in spec.blocks[:2]:  # BLOCK_A x BLOCK_B (BLOCK_C / BLOCK_P: the finalize's tiles)
            tile *= b
        res.elements_per_thread = tile / (32 * res.num_warps)
        res.instructions_per_element = round(res.sass_instructions / res.elements_per_thread, 2)
    usage = _resource_usage(kernel.asm["cubin"], kernel.name)
    if res.n_regs is None:
        res.n_regs = usage.get("n_regs")
    # the CUDA driver's n_spills is the function's local memory (LOCAL_SIZE_BYTES) / 4: the
    # per-thread stack frame (where ptxas spills) plus any local arrays
    stack = usage.get("stack", res.stack)
    if stack is not None or "local" in usage:
        res.n_spills = ((stack or 0) + usage.get("local", 0)) // 4
    return res


def compile_all(specs: list[Spec], jobs: int, sass: bool = True) -> list[Result]:
    """Compiles every spec (in ``jobs`` processes) and reads its resources; ``sass``: also
    disassemble it for the main-loop columns."""
    global _SPECS, _CUOBJDUMP, _WITH_SASS
    _SPECS, _WITH_SASS = specs, sass
    _CUOBJDUMP = tool("cuobjdump")
    if jobs <= 1 or len(specs) <= 1:
        return [_compile_one(i) for i in range(len(specs))]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    # fork: the workers inherit the recorded specializations, the compile-only driver and imports
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_compile_one, range(len(specs)), chunksize=1))


