"""``triton-bn bench --model NAME``: whole-model training steps (forward, cross-entropy, backward,
SGD with momentum) on random data, for torch's batch norm, triton_bn converted and triton_bn
fused, each in eager mode, replayed as one CUDA graph and under torch.compile (GPU; eager only on
CPU). Every variant starts from the same weights and batch; the losses of the first steps must
match torch's eager ones before anything is timed. Rows go to the long-format CSV (see
results.py): metrics ms (per step), images_per_s, speedup (images/s over torch_bn eager's),
peak_mb and loss.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import tuning
from .models import VARIANTS, build_model, make_variant, model_source, peak_bytes, train_step
from .results import CsvWriter, RunInfo
from .timing import TimerConfig, Timing, bench_fn

__all__ = ["EXEC_MODES", "ModelBenchOptions", "ModelCase", "run_model_bench"]

EXEC_MODES = ("eager", "cuda_graph", "compile")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_TOL = {"fp32": 2e-3, "bf16": 5e-2, "fp16": 2e-2}  # relative, on the first steps' losses
# The CPU smoke's plans: the interpreter runs programs one after another at a fixed cost each, so
# every layout is planned channels fast (NCHW too: a program per tile of channels, not one per
# channel) with tiles up to 64K elements. ResNet-18 at 2x3x64x64: a fused training step's kernels
# take 1.2 s instead of 250 s. A GPU keeps its plans.
CPU_SMOKE_KNOBS = {"channels_fast": True, "max_block_channels": 512, "fused_forward_max": 65536,
                   "fused_backward_max": 65536, "tile": 16384}


@dataclass(frozen=True)
class ModelCase:
    """One model at one batch size, image size, autocast dtype and memory format."""

    model: str
    batch: int
    size: int
    dtype: str  # "fp32" (no autocast) or the autocast dtype
    layout: str  # "nchw" or "channels_last"
    family: str = "model"
    feature: str = "train_step"
    count: int = 1

    @property
    def label(self) -> str:
        return self.model

    @property
    def shape_str(self) -> str:
        return f"{self.batch}x3x{self.size}x{self.size}"

    @property
    def numel(self) -> int:
        return self.batch * 3 * self.size * self.size

    @property
    def nbytes(self) -> str:
        return ""

    def bytes_moved(self, mode: str) -> str:
        return ""


@dataclass
class ModelBenchOptions:
    cases: list[ModelCase]
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    exec_modes: list[str] = field(default_factory=lambda: list(EXEC_MODES))
    check_steps: int = 2  # steps whose losses are compared before timing
    lr: float = 0.01
    compile_mode: str | None = None
    seed: int = 0


def _fmt_loss(losses: list[float]) -> str:
    return ", ".join(f"{v:.5f}" for v in losses)


def run_model_bench(opts: ModelBenchOptions, info: RunInfo, device: torch.device, csv_path: Path,
                    timer: TimerConfig, log: Callable[[str], None] = print) -> tuple[int, list[dict]]:
    """Runs every case x variant x execution mode; returns (exit status, CSV rows)."""
    writer = CsvWriter(csv_path, info)
    status = 0
    modes = [m for m in opts.exec_modes if device.type == "cuda" or m == "eager"]
    if len(modes) < len(opts.exec_modes):
        log("no GPU: eager mode only (CUDA graphs need a GPU; torch.compile of the interpreter's "
            "kernels would only time the interpreter)")
    plans = tuning.override(**CPU_SMOKE_KNOBS) if device.type == "cpu" else contextlib.nullcontext()
    try:
        with plans:
            for case in opts.cases:
                status |= _run_case(case, opts, modes, device, writer, timer, log)
    finally:
        writer.close()
    return status, writer.rows


def _run_case(case: ModelCase, opts: ModelBenchOptions, modes: list[str], device: torch.device,
              writer: CsvWriter, timer: TimerConfig, log: Callable[[str], None]) -> int:
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    base = build_model(case.model, num_classes=10, seed=opts.seed).to(device, memory_format=fmt)
    base.train()
    gen = torch.Generator().manual_seed(opts.seed + 1)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=gen).to(device, memory_format=fmt)
    y = torch.randint(0, 10, (case.batch,), generator=gen).to(device)
    amp = _DTYPES[case.dtype] if case.dtype != "fp32" else None
    log(f"{case.model} ({model_source(case.model)}), batch {case.shape_str}, {case.dtype}, "
        f"{case.layout}")
    reference: list[float] | None = None
    base_ips: float | None = None
    status = 0
    for variant in opts.variants:
        for mode in modes:
            tag = f"{variant}/{mode}"
            try:
                model, note = make_variant(base, variant)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                step, losses, cpu_peak = _prepare(model, mode, x, y, amp, opts)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the run
                log(f"  {tag}: FAILED to run: {type(exc).__name__}: {exc}")
                writer.add(metric="error", value=f"{type(exc).__name__}: {exc}"[:300], case=case,
                           mode=mode, provider=variant)
                status = 1
                continue
            writer.add(metric="loss", value=losses[0], case=case, mode=mode, provider=variant,
                       note=f"first {len(losses)} losses: {_fmt_loss(losses)}")
            if reference is None:
                reference = losses
            bad = [i for i, (a, b) in enumerate(zip(losses, reference, strict=False))
                   if not math.isclose(a, b, rel_tol=LOSS_TOL[case.dtype], abs_tol=1e-6)]
            if bad or not all(math.isfinite(v) for v in losses):
                msg = (f"losses {_fmt_loss(losses)} differ from torch_bn eager's "
                       f"{_fmt_loss(reference)} (rel. tol {LOSS_TOL[case.dtype]})")
                log(f"  {tag}: FAILED check: {msg}")
                writer.add(metric="error", value=msg, case=case, mode=mode, provider=variant)
                status = 1
                continue
            t = Timing(step.ms, step.ms, step.ms, 1) if isinstance(step, _Measured) \
                else bench_fn(step, timer)
            ips = case.batch / (t.median * 1e-3)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = cpu_peak
            base_ips = ips if base_ips is None else base_ips
            writer.add(metric="ms", value=t.median, p20=t.p20, p80=t.p80, case=case, mode=mode,
                       provider=variant, note=note)
            writer.add(metric="images_per_s", value=ips, case=case, mode=mode, provider=variant,
                       p20=case.batch / (t.p80 * 1e-3), p80=case.batch / (t.p20 * 1e-3))
            writer.add(metric="speedup", value=ips / base_ips, case=case, mode=mode,
                       provider=variant, baseline=f"{opts.variants[0]}/{modes[0]}")
            writer.add(metric="peak_mb", value=peak / 2**20, case=case, mode=mode,
                       provider=variant,
                       note="whole run (weights, grads, optimizer, graph pool)" if device.type
                       == "cuda" else "allocated during one step (profiler)")
            log(f"  {tag:34s} {t.median:9.2f} ms/step {ips:9.1f} img/s  x{ips / base_ips:.2f}  "
                f"peak {peak / 2**20:8.1f} MB  losses {_fmt_loss(losses)}  {note}")
            del model, step
    return status


def _prepare(model, mode: str, x, y, amp, opts: ModelBenchOptions):
    """(step function, losses of the first steps, CPU peak bytes of one step or 0)."""
    opt = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=0.9)
    if mode == "eager":
        if x.device.type == "cpu":
            return _cpu_steps(model, opt, x, y, amp, opts.check_steps)
        losses = [train_step(model, opt, x, y, amp) for _ in range(opts.check_steps)]
        return (lambda: train_step(model, opt, x, y, amp)), [float(v) for v in losses], 0
    if mode == "compile":
        compiled = torch.compile(model, mode=opts.compile_mode)
        losses = [train_step(compiled, opt, x, y, amp) for _ in range(opts.check_steps)]
        return (lambda: train_step(compiled, opt, x, y, amp)), [float(v) for v in losses], 0
    if mode == "cuda_graph":
        return _capture(model, opt, x, y, amp, opts.check_steps)
    raise ValueError(f"mode must be one of {', '.join(EXEC_MODES)}, got {mode!r}")


def _cpu_steps(model, opt, x, y, amp, steps: int):
    """CPU (interpreter) smoke, kept short: the check steps are also the measurements; the first
    one under the profiler (peak bytes), the last one timed (the returned "step" reports it)."""
    losses: list[torch.Tensor] = []
    times: list[float] = []
    for i in range(steps):
        t0 = time.perf_counter()
        if i == 0:
            peak = peak_bytes(lambda: losses.append(train_step(model, opt, x, y, amp)), x.device)
        else:
            losses.append(train_step(model, opt, x, y, amp))
        times.append((time.perf_counter() - t0) * 1e3)
    return _Measured(times[-1]), [float(v) for v in losses], peak


@dataclass(frozen=True)
class _Measured:
    """A step already timed (CPU smoke): ``bench`` returns its time instead of running again."""

    ms: float


def _capture(model, opt, x, y, amp, warm: int):
    """The whole training step captured as one CUDA graph (torch's recipe: warm-up steps on a
    side stream, gradients None before capture, autocast without its cache)."""
    import torch.nn.functional as F

    losses = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(max(warm, 3)):
            losses.append(train_step(model, opt, x, y, amp))
    torch.cuda.current_stream().wait_stream(s)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None,
                            cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    return graph.replay, [float(v) for v in losses[:warm]], 0


def describe(rows: list[dict]) -> str:
    """A plain-text table of images/s per case, variant and mode."""
    lines = []
    for r in rows:
        if r["metric"] == "images_per_s":
            lines.append(f"{r['case']:16s} {r['shape']:14s} {r['dtype']:5s} {r['provider']:22s} "
                         f"{r['mode']:11s} {float(r['value']):10.1f} img/s")
        elif r["metric"] == "error":
            lines.append(f"{r['case']:16s} {r['provider']:22s} {r['mode']:11s} ERROR {r['value']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: triton-bn bench --model NAME")
