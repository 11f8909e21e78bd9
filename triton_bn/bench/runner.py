"""The ``triton-bn bench`` sweep: for every case, check each provider against the float64
reference, then time every mode; rows go to a CSV as they come, a summary and plots at the end."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import persistent
from .progress import progress_bar
from .providers import BASELINE, PROVIDERS, make_init, make_module, parameters_of, reference
from .results import CsvWriter, RunInfo
from .shapes import Case
from .timing import TimerConfig, Timing, bench_fn, copy_bandwidth

__all__ = ["BenchOptions", "run_bench", "CHECK_TOL", "rel_err", "make_fn"]

# ||out - ref|| / ||ref|| against float64 that a provider must meet before it is timed: rounding of
# the output to the dtype dominates (bf16 keeps 8 bits); statistics are fp32 everywhere.
CHECK_TOL = {"fp64": 1e-9, "fp32": 1e-4, "fp16": 4e-3, "bf16": 1.6e-2}


@dataclass
class BenchOptions:
    cases: list[Case]
    providers: Sequence[str] = PROVIDERS
    csv_path: Path = Path("perf/results/bench.csv")
    plots_dir: Optional[Path] = Path("plots")
    max_minutes: float = 20.0
    timer: TimerConfig = field(default_factory=lambda: TimerConfig(cuda=False))
    compile_mode: Optional[str] = None
    progress: bool = True
    seed: int = 0
    copy_mb: int = 1024


def rel_err(out: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf for a missing output or a NaN)."""
    if out is None:
        return math.inf
    d = (out.detach().to(torch.float64) - ref).norm().item()
    r = ref.norm().item()
    e = d / r if r > 0 else d
    return e if math.isfinite(e) else math.inf


def make_fn(module: torch.nn.Module, mode: str, x: torch.Tensor, dy: torch.Tensor
            ) -> tuple[Callable[[], object], Optional[list]]:
    """(the function to time, tensors whose .grad do_bench resets) for one mode."""
    w, b = parameters_of(module)
    if mode == "forward":
        module.train()
        return (lambda: module(x)), None
    if mode == "backward":
        module.train()
        y = module(x)
        return (lambda: y.backward(dy, retain_graph=True)), [x, w, b]
    if mode == "forward_backward":
        module.train()
        return (lambda: module(x).backward(dy)), [x, w, b]
    if mode == "inference":
        module.eval()

        def infer():
            with torch.no_grad():
                return module(x)
        return infer, None
    raise ValueError(f"unknown mode {mode!r}")


def _say(bar, text: str) -> None:
    bar.write(text)


def _fmt_ms(t: Optional[Timing]) -> str:
    return "-" if t is None else f"{t.median:.4g}"


def run_bench(opts: BenchOptions, info: RunInfo, device: torch.device) -> tuple[int, list[dict]]:
    """Runs the sweep; returns (exit status, rows). Status 1 when triton_bn failed a check or
    raised; a baseline that fails or raises is recorded (and not timed) but not fatal."""
    t_start = time.perf_counter()
    deadline = t_start + opts.max_minutes * 60.0
    out = CsvWriter(opts.csv_path, info)
    timer = opts.timer
    failures: list[str] = []

    copy_bytes = opts.copy_mb * 2**20
    ct, copy_gbps = copy_bandwidth(device, timer, copy_bytes)
    out.add(metric="copy_gbps", value=copy_gbps, provider="copy", p20=2 * copy_bytes / ct.p80 / 1e6,
            p80=2 * copy_bytes / ct.p20 / 1e6,
            note=f"device-to-device copy of {opts.copy_mb} MiB; bytes read + written")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s ({opts.copy_mb} MiB buffer, read + write)")

    total = sum(len(c.modes) for c in opts.cases) * len(opts.providers)
    bar = progress_bar(total=total, enabled=opts.progress, desc="bench")
    skipped_cases: list[Case] = []
    for idx, case in enumerate(opts.cases):
        if time.perf_counter() > deadline:
            skipped_cases = opts.cases[idx:]
            break
        bar.set_description(f"{case.family} {case.shape_str} {case.dtype} {case.layout}"[:48])
        timings = _run_case(case, idx, opts, device, out, bar, copy_gbps, failures)
        _speedups(case, timings, out)
        line = [f"{case.family:8s} {case.label[:22]:22s} {case.shape_str:>18s} {case.dtype:4s} "
                f"{case.layout:13s} {case.feature:6s}"]
        mode = "forward_backward" if "forward_backward" in case.modes else case.modes[0]
        parts = []
        for p in opts.providers:
            parts.append(f"{p}={_fmt_ms(timings.get((p, mode)))}")
        line.append(f"{mode} ms: " + " ".join(parts))
        if ("triton_bn", "path") in timings:
            line.append(f"triton_bn path: {timings[('triton_bn', 'path')]}")
        _say(bar, " | ".join(line))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    if skipped_cases:
        print(f"time budget of {opts.max_minutes:g} min reached: {len(skipped_cases)} of "
              f"{len(opts.cases)} cases not run (first skipped: {skipped_cases[0].key}); raise "
              "--max-minutes or narrow the sweep", file=sys.stderr)
        out.add(metric="error", value="", note=f"time budget reached: {len(skipped_cases)} cases "
                                               "not run")
    out.close()
    elapsed = time.perf_counter() - t_start
    print(f"wrote {len(out.rows)} rows to {opts.csv_path} in {elapsed:.1f} s")
    if failures:
        print(f"{len(failures)} FAILED: " + "; ".join(failures[:10]), file=sys.stderr)
    return (1 if failures else 0), out.rows


def _run_case(case: Case, idx: int, opts: BenchOptions, device: torch.device, out: CsvWriter, bar,
              copy_gbps: float, failures: list[str]) -> dict:
    gen = torch.Generator(device=device)
    gen.manual_seed(opts.seed * 100003 + idx)
    x = case.make_input(device, gen)
    dy = case.make_input(device, gen)
    init = make_init(case, device, gen)
    tol = CHECK_TOL[case.dtype]
    refs: dict = {}
    timings: dict = {}
    train_modes = [m for m in case.modes if m != "inference"]

    def ref(kind: str) -> dict:
        if kind not in refs:
            refs[kind] = reference(case, init, x, dy if kind == "train" else None, kind == "train")
        return refs[kind]

    def record_error(provider: str, modes, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        for m in modes:
            out.add(metric="error", value="", case=case, mode=m, provider=provider, note=msg)
            bar.update(1)
        _say(bar, f"  {provider} raised on {case.key}: {msg}")
        if provider == "triton_bn":
            failures.append(f"{provider} {case.key}: {msg}")

    for provider in opts.providers:
        if provider == "torch_compile":
            torch._dynamo.reset()
        try:
            module = make_module(provider, case, init, device, opts.compile_mode)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other providers
            record_error(provider, case.modes, exc)
            continue
        xin = x.detach().clone().requires_grad_(True)
        if train_modes:
            try:
                module.train()
                before = persistent.launch_counts()
                y = module(xin)
                y.backward(dy)
                ran = [k for k, v in persistent.launch_counts().items() if v > before[k]]
                if ran and provider == "triton_bn":  # the opt-in path (TRITON_BN_PERSISTENT=1)
                    timings[(provider, "path")] = "persistent " + "+".join(ran)
                w, b = parameters_of(module)
                r = ref("train")
                err_y = rel_err(y, r["y"])
                err_g = max(rel_err(xin.grad, r["dx"]), rel_err(w.grad, r["dweight"]),
                            rel_err(b.grad, r["dbias"]))
                del y
            except Exception as exc:  # noqa: BLE001
                record_error(provider, train_modes, exc)
                train_ok = False
            else:
                train_ok = True
            for mode in train_modes if train_ok else ():
                err = {"forward": err_y, "backward": err_g}.get(mode, max(err_y, err_g))
                _measure(case, provider, mode, module, xin, dy, err, tol, opts, out, bar,
                         copy_gbps, failures, timings)
        if "inference" in case.modes:
            try:
                with torch.no_grad():  # training steps moved the running statistics: reset them
                    inner = getattr(module, "_orig_mod", module)
                    inner.running_mean.copy_(init.running_mean)
                    inner.running_var.copy_(init.running_var)
                module.eval()
                with torch.no_grad():
                    y = module(x)
                err = rel_err(y, ref("eval")["y"])
                del y
            except Exception as exc:  # noqa: BLE001
                record_error(provider, ["inference"], exc)
            else:
                _measure(case, provider, "inference", module, x, dy, err, tol, opts, out, bar,
                         copy_gbps, failures, timings)
        del module, xin
    return timings


def _measure(case: Case, provider: str, mode: str, module, x, dy, err: float, tol: float,
             opts: BenchOptions, out: CsvWriter, bar, copy_gbps: float, failures: list[str],
             timings: dict) -> None:
    ok = err <= tol
    out.add(metric="rel_err", value=err, case=case, mode=mode, provider=provider,
            note="" if ok else f"FAILED check (tolerance {tol:g}); not timed")
    if not ok:
        if provider == "triton_bn":  # a baseline's wrong result is reported, not fatal
            failures.append(f"{provider} {case.key} {mode}: rel_err {err:.3g} > {tol:g}")
        _say(bar, f"  FAILED check: {provider} {case.key} {mode}: rel_err {err:.3g} > {tol:g}"
                  " (not timed)")
        bar.update(1)
        return
    try:
        fn, g2n = make_fn(module, mode, x, dy)
        t = bench_fn(fn, opts.timer, g2n)
    except Exception as exc:  # noqa: BLE001
        msg = f"{type(exc).__name__}: {exc}"[:300]
        out.add(metric="error", value="", case=case, mode=mode, provider=provider, note=msg)
        if provider == "triton_bn":
            failures.append(f"{provider} {case.key} {mode}: {msg}")
        bar.update(1)
        return
    finally:
        if x.grad is not None:
            x.grad = None
    timings[(provider, mode)] = t
    nbytes = case.bytes_moved(mode)
    gbps = nbytes / (t.median * 1e-3) / 1e9
    out.add(metric="ms", value=t.median, p20=t.p20, p80=t.p80, case=case, mode=mode,
            provider=provider)
    out.add(metric="gbps", value=gbps, p20=nbytes / (t.p80 * 1e-3) / 1e9,
            p80=nbytes / (t.p20 * 1e-3) / 1e9, case=case, mode=mode, provider=provider)
    out.add(metric="copy_fraction", value=gbps / copy_gbps, case=case, mode=mode,
            provider=provider)
    bar.update(1)


def _speedups(case: Case, timings: dict, out: CsvWriter) -> None:
    for mode in case.modes:
        for base in (BASELINE, "torch_compile"):
            tb = timings.get((base, mode))
            if tb is None:
                continue
            for provider in ("triton_bn", "torch_compile", "torch_eager"):
                t = timings.get((provider, mode))
                if t is None or provider == base or (base == "torch_compile"
                                                     and provider != "triton_bn"):
                    continue
                out.add(metric="speedup", value=tb.median / t.median, case=case, mode=mode,
                        provider=provider, baseline=base, p20=tb.median / t.p80,
                        p80=tb.median / t.p20)
