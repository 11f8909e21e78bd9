"""The command line of the compile check (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .compiler import Result, compile_all
from .driver import setup_environment, toolchain_problem
from .record import collect, cover
from .report import finalize_depths, print_ptx_stats, print_resnet50, print_summary, print_table
from .scenarios import PLANS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=sys.modules[__package__].__doc__.split("\n\n")[0],
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
    p.add_argument("--json", default=None,
                   help="write the results (with --list: the specializations) as JSON here")
    p.add_argument("--list", action="store_true", help="list the specializations, compile nothing")
    p.add_argument("--scenario", default="",
                   help="only specializations that a scenario whose label contains this launches "
                        "(e.g. 'vec:' for the layouts whose vectorization matters)")
    p.add_argument("--resnet50", action="store_true",
                   help="the ResNet-50 report: compile the kernels as launched for every BN shape of "
                        "ResNet-50 (batch 32/64/128, bf16 channels_last and fp32 NCHW, training "
                        "and inference) and print per kernel registers, spills, load width, SASS "
                        "instructions per element and barriers of the main loop, and the "
                        "finalize's dependent steps (with --quick: batch 32, one shape)")
    p.add_argument("--no-sass", action="store_true",
                   help="skip the SASS disassembly (cuobjdump -sass, about 0.7 s a specialization, "
                        "half of the time of a covering compile): every check stays, the main-loop "
                        "columns are left empty (not with --resnet50, which reports them)")
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
        setup_environment(cache_dir)
        problem = toolchain_problem()
        if problem:
            print(f"cannot compile for an NVIDIA GPU here: {problem}")
            return 2
        results: list[Result] = []
        scenario_errors = []
        listed: list[dict] = []
        for arch in [int(a) for a in args.arch.split(",") if a.strip()]:
            rec = collect(arch, args.quick,
                          sweep=not (args.no_sweep or args.quick or args.resnet50),
                          only=args.scenario, resnet50=args.resnet50)
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
                listed += [s.summary() for s in specs]
                continue
            results += compile_all(specs, args.jobs, sass=args.resnet50 or not args.no_sass)
        if args.list:
            if args.json:
                Path(args.json).write_text(json.dumps(listed, indent=1))
            for label, msg in scenario_errors:
                print(f"scenario whose launch code raised: {label}: {msg}")
            return 1 if scenario_errors else 0
        print_table(results)
        if args.ptx_stats:
            print_ptx_stats(results)
        finalize = []
        if args.resnet50:
            from triton_bn import ops  # imported after setup_environment (no interpreter)
            finalize = finalize_depths(PLANS, ops.finalize_blocks)
            print_resnet50(results, finalize)
        print_summary(results, scenario_errors, time.perf_counter() - t0)
        if args.json:
            rows = [asdict(r) for r in results]
            out = {"kernels": rows, "finalize": finalize} if args.resnet50 else rows
            Path(args.json).write_text(json.dumps(out, indent=1))
        return 1 if any(not r.ok for r in results) or scenario_errors else 0
    finally:
        PLANS.clear()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
