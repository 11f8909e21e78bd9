#!/usr/bin/env python
"""GPU time per BatchNorm layer with the host out of the picture: the training step of each
distinct ResNet-50 BN shape (forward, then dx, dgamma, dbeta) of triton_bn.batch_norm and of
torch.nn.functional.batch_norm, captured REPS times into one CUDA graph and replayed.

    python perf/graph_bench.py [--batch 32] [--reps 20] [--out FILE]     # on a CUDA machine

ms per step = replay time / REPS (median of --replays replays, CUDA events). GB/s counts the
minimal bytes of a step: read x, write y; read x and dy, write dx (5 tensor passes). The same
buffers are used by every step, so layers that fit the L2 (50 MB on an H200) are partly served
from it, for both providers alike. Needs only torch and triton; without CUDA it says so, exits 0.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu_check import RESNET50  # noqa: E402  (perf/ is on sys.path when run as a script)

CASES = ((torch.bfloat16, "channels_last"), (torch.float32, "nchw"))


def graph_step_ms(fn, x, dy, w, b, rm, rv, reps: int, replays: int) -> float:
    xi = x.detach().clone().requires_grad_(True)
    wi = w.detach().clone().requires_grad_(True)
    bi = b.detach().clone().requires_grad_(True)

    def step():
        y = fn(xi, rm, rv, wi, bi, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (xi, wi, bi), dy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20, help="steps captured per graph")
    ap.add_argument("--replays", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_bench: CUDA is not available on this machine; nothing to time here.")
        return 0
    import triton

    import triton_bn

    lines = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    dev = torch.device("cuda")
    n = 256 * 2**20
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        dst.copy_(src)
    e.record()
    torch.cuda.synchronize()
    copy_gbps = 2 * n * 4 * 10 / (s.elapsed_time(e) * 1e-3) / 1e9
    del src, dst
    emit(f"graph_bench: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton "
         f"{triton.__version__}; batch {args.batch}, {args.reps} steps per graph; copy "
         f"{copy_gbps:.0f} GB/s")
    head = (f"{'shape':>18s} {'dtype':5s} {'layout':13s} {'tbn ms':>8s} {'torch ms':>8s} "
            f"{'x':>5s} {'tbn GB/s':>8s} {'% copy':>6s}")
    emit(head)
    emit("-" * len(head))
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    for dtype, layout in CASES:
        speed = []
        for c, hw in RESNET50:
            shape = (args.batch, c, hw, hw)
            x = (torch.randn(shape, device=dev, generator=gen) * 1.7 + 0.4).to(dtype)
            dy = torch.randn(shape, device=dev, generator=gen).to(dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
                dy = dy.contiguous(memory_format=torch.channels_last)
            w = torch.rand(c, device=dev) + 0.5
            b = torch.rand(c, device=dev) - 0.5
            rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
            try:
                t_tbn = graph_step_ms(triton_bn.batch_norm, x, dy, w, b, rm, rv, args.reps,
                                      args.replays)
                t_pt = graph_step_ms(F.batch_norm, x, dy, w, b, rm, rv, args.reps, args.replays)
            except Exception as exc:  # noqa: BLE001
                emit(f"{'x'.join(map(str, shape)):>18s} ERROR {type(exc).__name__}: {exc}")
                continue
            gbps = 5 * x.numel() * x.element_size() / (t_tbn * 1e-3) / 1e9
            speed.append(t_pt / t_tbn)
            emit(f"{'x'.join(map(str, shape)):>18s} {str(dtype)[6:]:5s} {layout:13s} "
                 f"{t_tbn:8.4f} {t_pt:8.4f} {t_pt / t_tbn:5.2f} {gbps:8.0f} "
                 f"{100 * gbps / copy_gbps:5.0f}%")
            del x, dy
            torch.cuda.empty_cache()
        if speed:
            gm = math.exp(sum(map(math.log, speed)) / len(speed))
            emit(f"geomean speedup over torch (CUDA graphs, training step), {str(dtype)[6:]} "
                 f"{layout}: {gm:.2f}x ({len(speed)} shapes)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
