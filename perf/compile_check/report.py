"""The report: the table of every specialization, the PTX memory-instruction table, the per-kernel
summary, the spilling specializations and the full compile errors."""

from __future__ import annotations

import math
import sys

from .compiler import Result


def format_memory_ops(mem: dict | None) -> str:
    if not mem:
        return "-"
    return " ".join(f"{k}x{v}" for k, v in mem.items())



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




# the targets of the ResNet-50 report (issue: GPU-side efficiency at real sizes)
INSTR_PER_ELEMENT_MAX = {"bf16": 8.0}
ELEMENT_KERNELS = ("bn_stats_kernel", "bn_backward_reduce_kernel", "bn_apply_kernel",
                   "bn_backward_apply_kernel", "bn_fused_forward_kernel", "bn_fused_backward_kernel")


def finalize_depths(plans: dict, blocks) -> list[dict]:
    """One row per r50: training scenario: the parts of its split reductions (forward statistics,
    backward sums) and the depth of their finalize, which the last program of a channel tile runs
    (kernels/forward.py merge_parts): the tile's channels in ceil(channels / BLOCK_C) blocks one
    after another, each ceil(parts / BLOCK_P) loads in sequence, so

        steps = ceil(channels / BLOCK_C) * ceil(parts / BLOCK_P) + log2(BLOCK_P),

    or with two levels (GROUP_P, kernels/common.py arrive_in_group: the last program of each group of
    GROUP_P parts merges them, the last of the groups merges their rows)

        steps = ceil(channels / BLOCK_C) * (1 + ceil(groups / BLOCK_P)) + 2 log2(BLOCK_P),

    beside the target 2 * log2(parts) + 4. (Until 2026-12-01 the report counted one block of
    channels only: 18 steps for 392 parts where the program walked 4 x 13 loads.)
    plans: label -> [(kind, Geometry, TilePlan)] (scenarios.PLANS); blocks(geo, plan): the
    launch code's {"BLOCK_C", "BLOCK_P"} of that finalize (ops.finalize_blocks)."""
    rows = []
    for label, logged in plans.items():
        if ":train" not in label:
            continue
        row = {"scenario": label}
        for kind in ("forward", "backward"):
            split = [(g, p) for k, g, p in logged if k == kind and not p.fused]
            if not split:
                row[kind] = None  # single pass: no finalize
                continue
            geo, plan = split[0]
            b = blocks(geo, plan, kind)
            n, bc, bp, group = plan.n_parts, b["BLOCK_C"], b["BLOCK_P"], b["GROUP_P"]
            channels = plan.BLOCK_B if geo.channels_fast and geo.G == 1 else 1
            tree = bp.bit_length() - 1
            if group:  # two levels: a group's parts, then the groups' rows (common.arrive_in_group)
                loads, trees = 1 + -(-(-(-n // group)) // bp), 2
            else:
                loads, trees = -(-n // bp), 1
            loads *= -(-channels // bc)
            row[kind] = {"parts": n, "channels": channels, "block_c": bc, "block_p": bp,
                         "group_p": group, "loads": loads, "steps": loads + trees * tree,
                         "target": round(2 * math.log2(max(n, 1)) + 4, 1)}
        rows.append(row)
    return rows


def print_resnet50(results: list[Result], finalize: list[dict], file=sys.stdout) -> None:
    """The ResNet-50 report: per specialization registers, spills, main-loop load width, SASS
    instructions per element and block barriers per tile; then the finalize's dependent steps."""
    rows = sorted((r for r in results if r.ok), key=lambda r: (r.arch, r.kernel, r.flags))
    if not rows:
        return
    kw = max(len(r.kernel) for r in rows)
    fw = max(len(r.flags) for r in rows)
    print("\nResNet-50 shapes (bf16 channels_last, fp32 NCHW; batch "
          "32/64/128; train = forward + backward): main loop of each kernel as launched\n"
          "(loop = the innermost SASS loop with global loads, one tile per iteration; '*' = no "
          "loop, whole kernel; instr/elem = its static instructions / elements per thread per "
          "iteration; bars = BAR.* in it; ldg = load widths in it, bytes; spill = ptxas spill "
          "stores/loads bytes):", file=file)
    head = (f"{'sm':>3} {'kernel':<{kw}} {'flags':<{fw}} {'regs':>4} {'spill':>7} {'ldg':>6} "
            f"{'instr':>6} {'el/thr':>6} {'instr/el':>8} {'bars':>4} {'uses':>4}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        ldg = ",".join(map(str, r.sass_load_bytes or [])) or "-"
        star = "" if r.sass_loop else "*"
        ipe = "-" if r.instructions_per_element is None else f"{r.instructions_per_element:.1f}{star}"
        ept = "-" if r.elements_per_thread is None else f"{r.elements_per_thread:g}"
        print(f"{r.arch:>3} {r.kernel:<{kw}} {r.flags:<{fw}} {_fmt(r.n_regs):>4} {spill:>7} "
              f"{ldg:>6} {_fmt(r.sass_instructions):>6} {ept:>6} {ipe:>8} "
              f"{_fmt(r.sass_barriers):>4} {len(r.scenarios or []):>4}", file=file)
    print("\nFinalize, run by a channel tile's last program: dependent steps = ceil(channels / "
          "BLOCK_C) * ceil(parts / BLOCK_P) loads in sequence + log2(BLOCK_P); '2x': in two "
          "levels, ceil(channels / BLOCK_C) * (1 + ceil(groups / BLOCK_P)) + 2 log2(BLOCK_P) "
          "(target <= 2 log2(parts) + 4; '-' = single pass, no finalize):", file=file)
    for row in finalize:
        cells = []
        for kind in ("forward", "backward"):
            f = row[kind]
            cells.append(f"{kind} -" if f is None else
                         f"{kind} {f['parts']:>4} parts x {f['channels']:>3} ch, "
                         f"[{f['block_p']:>3} x {f['block_c']:>3}]{' 2x' if f['group_p'] else '   '} "
                         f"{f['steps']:>3} steps "
                         f"(<= {f['target']:>4})")
        print(f"  {row['scenario']:<40} " + "   ".join(cells), file=file)
    print("\nTargets:", file=file)
    for line in resnet50_misses(results, finalize) or ["all met"]:
        print(f"  {line}", file=file)


def resnet50_misses(results: list[Result], finalize: list[dict]) -> list[str]:
    """The ResNet-50 targets missed: a spill in any kernel; more than 8 main-loop SASS instructions
    per element in a bf16 element kernel; a finalize deeper than 2 log2(parts) + 4 steps."""
    out = []
    for r in results:
        if not r.ok:
            out.append(f"{r.kernel} [{r.flags}]: does not compile")
            continue
        if r.spill_stores or r.n_spills:
            out.append(f"{r.kernel} [{r.flags}]: spills {r.spill_stores}/{r.spill_loads} B")
        limit = INSTR_PER_ELEMENT_MAX.get(r.flags.split("/")[0])
        if (limit and r.kernel in ELEMENT_KERNELS and r.instructions_per_element is not None
                and r.instructions_per_element > limit):
            out.append(f"{r.kernel} [{r.flags}]: {r.instructions_per_element:.1f} SASS instructions "
                       f"per element > {limit:g}")
    for row in finalize:
        for kind in ("forward", "backward"):
            f = row[kind]
            if f and f["steps"] > f["target"]:
                out.append(f"{row['scenario']} {kind} finalize: {f['steps']} steps > {f['target']}")
    return out
