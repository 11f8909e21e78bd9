"""Timing: ``triton.testing.do_bench`` (median, p20, p80) on a GPU; a host-clock loop in Triton's
CPU interpreter, where do_bench cannot run (it needs a GPU driver) and figures are not GPU figures.
Also the device's copy bandwidth, measured in the same run, as the ceiling for memory-bound kernels.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Timing", "TimerConfig", "bench_fn", "copy_bandwidth", "quantile", "synchronize"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    median: float
    p20: float
    p80: float
    reps: int = 0


@dataclass(frozen=True)
class TimerConfig:
    cuda: bool
    warmup_ms: float = 10.0  # do_bench warm-up (GPU)
    rep_ms: float = 50.0  # do_bench measuring time (GPU)
    cpu_min_reps: int = 3
    cpu_max_reps: int = 10
    cpu_budget_s: float = 0.25  # stop repeating after this much host time (CPU interpreter)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty sequence."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _clear_grads(tensors: Optional[Sequence[torch.Tensor]]) -> None:
    for t in tensors or ():
        t.grad = None


def bench_fn(fn: Callable[[], object], cfg: TimerConfig,
             grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Timing:
    """Times ``fn``. GPU: do_bench with quantiles [0.5, 0.2, 0.8] (cold L2 each call, grads reset).
    CPU: one warm-up call, then repeats timed with perf_counter until the budget or max reps."""
    if cfg.cuda:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms,
                                                grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80))
    _clear_grads(grad_to_none)
    fn()  # warm-up (compiles)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < cfg.cpu_max_reps:
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= cfg.cpu_min_reps and time.perf_counter() - start > cfg.cpu_budget_s:
            break
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8), len(times))


def copy_bandwidth(device: torch.device, cfg: TimerConfig, nbytes: int) -> tuple[Timing, float]:
    """Times a device-to-device copy of an ``nbytes`` buffer; returns (timing, GB/s) counting the
    bytes read plus the bytes written (2 * nbytes), as the kernels' GB/s are counted."""
    n = nbytes // 4
    bufs = [torch.randn(n, device=device, dtype=torch.float32)]
    bufs.append(torch.empty_like(bufs[0]))
    t = bench_fn(lambda: bufs[1].copy_(bufs[0]), cfg)
    gbps = 2 * n * 4 / (t.median * 1e-3) / 1e9
    bufs.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return t, gbps
