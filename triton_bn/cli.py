"""The ``triton-bn`` command: ``bench`` (sweeps and targets), ``tune`` (autotuning into the JSON
cache the kernels load) and ``plot`` (PNGs from result CSVs). ``python -m triton_bn`` is the same.

    triton-bn bench                       # the default sweep for this machine
    triton-bn bench --shapes resnet50 --modes forward_backward --max-minutes 5
    triton-bn bench --model resnet50      # training steps: torch BN, converted, fused
    triton-bn tune --shapes resnet50 --batches 32
    triton-bn plot perf/results/*.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import triton_bn  # noqa: F401 - switches Triton to its CPU interpreter when CUDA is absent

__all__ = ["main", "build_parser"]

DEFAULT_RESULTS = Path("perf/results")
DEFAULT_PLOTS = Path("plots")
GPU_COMBOS = (("bf16", "channels_last"), ("fp32", "nchw"))
CPU_NOTICE = ("NOTE: no CUDA device. The Triton kernels run in Triton's CPU interpreter and the "
              "baselines on PyTorch's CPU kernels: a small sweep whose timings are NOT GPU "
              "figures (they only show that the pipeline works).")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _choices(name: str, allowed: Sequence[str], all_ok: bool = True):
    def parse(text: str) -> list[str]:
        vals = _csv_list(text)
        if all_ok and vals == ["all"]:
            return list(allowed)
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(
                f"{name}: unknown {', '.join(bad) or '(empty)'}; choose from "
                f"{', '.join(allowed)}" + (" or all" if all_ok else ""))
        return vals
    return parse


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _add_sweep_args(p: argparse.ArgumentParser, gpu_sets: str) -> None:
    from .bench.shapes import DTYPES, LAYOUTS, SETS

    sets = tuple(s for s in SETS if s != "quick")
    p.add_argument("--shapes", type=_choices("--shapes", sets), default=None,
                   help=f"shape sets, comma-separated: {', '.join(sets)} or all (default: "
                        f"{gpu_sets} on a GPU, tiny on CPU)")
    p.add_argument("--shape", action="append", default=[], metavar="NxCxHxW",
                   help="an extra shape (channels on dim 1), e.g. 32x64x56x56; repeatable")
    p.add_argument("--batches", type=_ints, default=[32, 256],
                   help="ResNet-50 batch sizes (default 32,256)")
    p.add_argument("--dtypes", type=_choices("--dtypes", tuple(DTYPES)), default=None,
                   help="fp32,bf16,fp16,fp64 (default on a GPU: the target pairs bf16 "
                        "channels_last and fp32 nchw; on CPU: fp32,bf16)")
    p.add_argument("--layouts", type=_choices("--layouts", LAYOUTS), default=None,
                   help="nchw,channels_last (rank-2 shapes always run once, as 'nc')")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new cases after this many minutes (default: 25 on a GPU, "
                        "1.5 on CPU)")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=float, default=50.0, help="do_bench measuring time (GPU)")
    p.add_argument("--cpu-reps", type=int, default=6,
                   help="most timed calls per measurement in the CPU interpreter")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)


def _add_model_args(b: argparse.ArgumentParser) -> None:
    from .bench.model_runner import EXEC_MODES
    from .bench.models import MODELS, VARIANTS

    g = b.add_argument_group("whole models (--model)", "training steps of real models: torch BN, "
                             "triton_bn converted and fused; eager, CUDA graphs, torch.compile")
    g.add_argument("--model", type=_choices("--model", MODELS, all_ok=False), default=None,
                   help=f"models, comma-separated: {', '.join(MODELS)} (torchvision's where it "
                        "imports, else transformers configs); switches bench to training steps")
    g.add_argument("--model-batch", type=int, default=None,
                   help="images per step (default 64 on a GPU, 2 on CPU)")
    g.add_argument("--image-size", type=int, default=None,
                   help="image height and width (default 224 on a GPU, 64 on CPU: at 32 ResNet's "
                        "last stage has 2 values per channel and its second loss is chaotic)")
    g.add_argument("--exec", type=_choices("--exec", EXEC_MODES), default=list(EXEC_MODES),
                   help="eager,cuda_graph,compile (default all; eager only on CPU)")
    g.add_argument("--variants", type=_choices("--variants", VARIANTS), default=list(VARIANTS),
                   help=f"{', '.join(VARIANTS)} (default all; the first is the baseline)")
    g.add_argument("--check-steps", type=int, default=2,
                   help="steps whose losses must match the baseline's before timing (default 2)")


def cmd_bench_models(args) -> int:
    """``bench --model``: see triton_bn/bench/model_runner.py."""
    from .bench.model_runner import ModelBenchOptions, ModelCase, describe, run_model_bench
    from .bench.results import slug
    from .bench.timing import TimerConfig

    device, cuda, info = _start("triton-bn bench --model", CPU_NOTICE)
    batch = args.model_batch or (64 if cuda else 2)
    size = args.image_size or (224 if cuda else 64)
    dtypes = args.dtypes or (["bf16"] if cuda else ["fp32"])
    layouts = args.layouts or (["channels_last"] if cuda else ["nchw"])
    cases = [ModelCase(m, batch, size, d, lay) for m in args.model for d in dtypes
             for lay in layouts]
    timer = TimerConfig(cuda=cuda, warmup_ms=max(args.warmup_ms, 100.0),
                        rep_ms=max(args.rep_ms, 500.0), cpu_max_reps=1, cpu_min_reps=1)
    csv_path = args.csv or args.out / (f"bench-models-{slug(info.gpu_name if cuda else 'cpu')}-"
                                       f"{info.run_id}.csv")
    opts = ModelBenchOptions(cases=cases, variants=args.variants, exec_modes=args.exec,
                             check_steps=max(1, args.check_steps), compile_mode=args.compile_mode,
                             seed=args.seed)
    t0 = time.perf_counter()
    status, rows = run_model_bench(opts, info, device, csv_path, timer)
    print()
    print(describe(rows))
    print(f"\nCSV -> {csv_path}")
    if not args.no_plot:
        from .bench.model_plot import plot_models

        _plot(lambda: plot_models(rows, args.plots))
    print(f"bench finished in {time.perf_counter() - t0:.1f} s")
    return status


def _plot(make) -> None:
    """Runs ``make()`` (which returns the written plot paths) and says where they went; without
    matplotlib, says so instead of failing the benchmark that produced the data."""
    try:
        paths = make()
    except ImportError as exc:
        print(f"no plots: {exc} (pip install matplotlib, or the dev extra)", file=sys.stderr)
    else:
        print(f"plots -> {', '.join(str(p) for p in paths)}")


def build_parser() -> argparse.ArgumentParser:
    from .bench.providers import PROVIDERS
    from .bench.shapes import MODES

    parser = argparse.ArgumentParser(
        prog="triton-bn",
        description="Benchmarks, autotuning and plots for triton_bn's batch-norm kernels.")
    parser.add_argument("--version", action="version", version=f"triton_bn {triton_bn.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,tune,plot}")

    b = sub.add_parser("bench", help="sweep shapes x dtypes x layouts x modes over providers",
                       description="Checks every provider against the float64 reference, then "
                                   "times it (do_bench median/p20/p80 on a GPU); writes long-format"
                                   " CSV rows, a summary with the targets, and plots.")
    _add_sweep_args(b, "resnet50,keras,smallc,manyc,bn1d")
    b.add_argument("--modes", type=_choices("--modes", MODES), default=list(MODES),
                   help="forward,backward,forward_backward (training) and inference (default all)")
    b.add_argument("--providers", type=_choices("--providers", PROVIDERS), default=None,
                   help=f"{', '.join(PROVIDERS)} (default all)")
    b.add_argument("--out", type=Path, default=DEFAULT_RESULTS,
                   help="directory of the result CSV (default perf/results)")
    b.add_argument("--csv", type=Path, default=None, help="exact CSV path (overrides --out)")
    b.add_argument("--plots", type=Path, default=DEFAULT_PLOTS,
                   help="directory of the PNGs (default plots/)")
    b.add_argument("--no-plot", action="store_true", help="write no plots")
    b.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the torch_compile provider (default: default)")
    b.add_argument("--copy-mb", type=int, default=None,
                   help="buffer of the copy-bandwidth measurement (default 1024 on a GPU, 32 on "
                        "CPU)")
    b.add_argument("--quick", action="store_true",
                   help="a smoke run: two tiny cases, fp32, triton_bn and torch_eager (tests)")
    _add_model_args(b)

    t = sub.add_parser("tune", help="autotune the kernels' launch configurations into the cache",
                       description="Times every candidate configuration of the reduction kernels"
                                   " per shape and writes the fastest (with every candidate's "
                                   "timing) to the JSON cache that the kernels load.")
    _add_sweep_args(t, "resnet50,smallc,manyc,bn1d")
    t.add_argument("--kinds", type=_choices("--kinds", ("forward", "backward")),
                   default=["forward", "backward"], help="kernels to tune (default both)")
    t.add_argument("--cache", type=Path, default=None,
                   help="JSON cache to update (default: $TRITON_BN_TUNE_CACHE or "
                        "~/.cache/triton_bn/tune.json)")

    pl = sub.add_parser("plot", help="PNGs from result CSVs (never reruns a benchmark)")
    pl.add_argument("csv", nargs="*", type=Path,
                    help="result CSVs (default: the newest CSV in perf/results)")
    pl.add_argument("--out", type=Path, default=DEFAULT_PLOTS, help="directory (default plots/)")
    pl.add_argument("--summary", action="store_true", help="also print the targets summary")
    return parser


def _device() -> tuple[torch.device, bool]:
    cuda = torch.cuda.is_available()
    if not cuda:
        # Two busy thread pools (PyTorch's and inductor's compile workers) on a few cores make
        # host timings of tiny ops swing 1000x; one thread each keeps them steady.
        torch.set_num_threads(1)
        try:
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
        except ImportError:
            pass
    return (torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
            cuda)


def _start(command: str, cpu_note: str, with_triton_bn: bool = True):
    """(device, cuda, run info) for a command, after printing its header line (and, without a
    GPU, ``cpu_note``)."""
    from .bench.results import run_info

    device, cuda = _device()
    info = run_info(cuda)
    print(f"{command}: {info.gpu_name} [{info.device}], torch {info.torch}, triton {info.triton}"
          + (f", triton_bn {info.triton_bn}" if with_triton_bn else ""))
    if not cuda:
        print(cpu_note)
    return device, cuda, info


def _sweep_cases(args, cuda: bool, default_sets: list[str], modes: Sequence[str],
                 with_keras: bool = True):
    from .bench.shapes import build_cases, custom_cases

    if args.dtypes is None and args.layouts is None:
        combos = list(GPU_COMBOS) if cuda else None
        dtypes = ["fp32", "bf16"]
        layouts = ["nchw", "channels_last"]
    else:
        combos = None
        dtypes = args.dtypes or (["bf16", "fp32"] if cuda else ["fp32", "bf16"])
        layouts = args.layouts or ["nchw", "channels_last"]
    sets = args.shapes if args.shapes is not None else (default_sets if not args.shape else [])
    if not with_keras:
        sets = [s for s in sets if s != "keras"]
    cases = build_cases(sets, dtypes, layouts, args.batches, combos, modes)
    if args.shape:
        cases += custom_cases(args.shape, dtypes, layouts, combos, modes)
    return cases


def _order_for_gpu(cases):
    """Target cases first (ResNet-50 fwd+bwd pairs, then big tensors, Keras), so a time budget
    cuts the least important ones."""
    rank = {"resnet50": 0, "smallc": 1, "keras": 2, "manyc": 3, "bn1d": 4}
    return sorted(cases, key=lambda c: (rank.get(c.family, 5), -c.shape[0] if c.family ==
                                        "resnet50" else 0))


def cmd_bench(args) -> int:
    from .bench.providers import PROVIDERS
    from .bench.results import slug
    from .bench.runner import BenchOptions, run_bench
    from .bench.summary import summarize
    from .bench.timing import TimerConfig

    if args.model:
        return cmd_bench_models(args)
    device, cuda, info = _start("triton-bn bench", CPU_NOTICE)
    providers = list(args.providers or PROVIDERS)
    if args.quick:
        from .bench.shapes import build_cases

        cases = build_cases(["quick"], ["fp32"], ["nchw"], modes=args.modes)
        if args.providers is None:
            providers = ["triton_bn", "torch_eager"]
            print("--quick: providers triton_bn and torch_eager (torch.compile left out: its "
                  "first compile takes ~20 s on CPU)")
    else:
        default_sets = (["resnet50", "keras", "smallc", "manyc", "bn1d"] if cuda else ["tiny"])
        cases = _sweep_cases(args, cuda, default_sets, args.modes)
        if cuda:
            cases = _order_for_gpu(cases)
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 2
    max_minutes = args.max_minutes if args.max_minutes is not None else (25.0 if cuda else 1.5)
    timer = TimerConfig(cuda=cuda, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                        cpu_max_reps=max(1, args.cpu_reps), cpu_min_reps=min(3, args.cpu_reps))
    csv_path = args.csv or args.out / f"bench-{slug(info.gpu_name if cuda else 'cpu-interpreter')}"\
                                      f"-{info.run_id}.csv"
    n_meas = sum(len(c.modes) for c in cases) * len(providers)
    print(f"{len(cases)} cases x {len(providers)} providers ({', '.join(providers)}): {n_meas} "
          f"measurements; budget {max_minutes:g} min; CSV -> {csv_path}")
    opts = BenchOptions(cases=cases, providers=providers, csv_path=csv_path,
                        plots_dir=None if args.no_plot else args.plots, max_minutes=max_minutes,
                        timer=timer, compile_mode=args.compile_mode,
                        progress=not args.no_progress, seed=args.seed,
                        copy_mb=args.copy_mb or (1024 if cuda else 32))
    t0 = time.perf_counter()
    status, rows = run_bench(opts, info, device)
    text = summarize(rows)
    print()
    print(text)
    summary_path = csv_path.with_name(csv_path.stem + "-summary.txt")
    summary_path.write_text(text + "\n")
    print(f"\nsummary -> {summary_path}")
    if opts.plots_dir is not None:
        from .bench.plotting import make_plots

        _plot(lambda: make_plots([csv_path], opts.plots_dir))
    print(f"bench finished in {time.perf_counter() - t0:.1f} s")
    return status


def cmd_tune(args) -> int:
    from triton_bn import tuning

    from .bench.timing import TimerConfig
    from .bench.tune import run_tune

    device, cuda, info = _start("triton-bn tune", "NOTE: no CUDA device: tuning in Triton's CPU "
                                "interpreter; the choices suit the interpreter only, not a GPU.",
                                with_triton_bn=False)
    default_sets = ["resnet50", "smallc", "manyc", "bn1d"] if cuda else ["tiny"]
    cases = [c for c in _sweep_cases(args, cuda, default_sets, ("forward",), with_keras=False)
             if c.feature == "bn"]
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 2
    cache = args.cache or tuning.cache_path()
    max_minutes = args.max_minutes if args.max_minutes is not None else (25.0 if cuda else 1.5)
    timer = TimerConfig(cuda=cuda, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                        cpu_max_reps=max(1, args.cpu_reps), cpu_min_reps=min(3, args.cpu_reps))
    print(f"{len(cases)} shapes x {len(args.kinds)} kernel kinds; cache -> {cache}")
    t0 = time.perf_counter()
    found = run_tune(cases, tuple(args.kinds), cache, device, timer, info, max_minutes,
                     progress=not args.no_progress)
    print(f"wrote {len(found)} entries to {cache} in {time.perf_counter() - t0:.1f} s")
    if args.cache is not None and str(args.cache) != str(tuning.cache_path()):
        print(f"(the kernels read {tuning.cache_path()}; set TRITON_BN_TUNE_CACHE={cache} to use "
              "this file)")
    return 0 if found else 1


def cmd_plot(args) -> int:
    from .bench.plotting import make_plots
    from .bench.results import read_rows
    from .bench.summary import summarize

    paths = list(args.csv)
    if not paths:
        found = sorted(DEFAULT_RESULTS.glob("*.csv"), key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"no CSV given and none in {DEFAULT_RESULTS}", file=sys.stderr)
            return 2
        paths = [found[-1]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"no such file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    try:
        written = make_plots(paths, args.out)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for p in written:
        print(p)
    if args.summary:
        print(summarize(read_rows(paths)))
    if not written:
        print("nothing to plot in these CSVs", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return {"bench": cmd_bench, "tune": cmd_tune, "plot": cmd_plot}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
