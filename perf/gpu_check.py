#!/usr/bin/env python
"""One-call GPU check of triton_bn at real sizes: correctness against PyTorch, timings, CUDA graphs.

    python perf/gpu_check.py [--out perf/results/gpu_check.txt]     # on a CUDA machine, ~1-3 min
    python perf/gpu_check.py --cpu-smoke                             # tiny shapes, CPU interpreter

1. Correctness: every distinct BatchNorm shape of ResNet-50 at batch 64 (fp32 and bf16, NCHW and
   channels_last), 3e7 x 3 and 4096 x 1024: a training step (y, dx, dweight, dbias, running mean
   and variance) and an inference forward of triton_bn.batch_norm and of
   torch.nn.functional.batch_norm, each compared with float64. triton_bn passes when its error is
   at most 2x PyTorch's own error in the same dtype (plus a small floor).
2. Timing: forward (training) and backward of both, triton.testing.do_bench (median, p20, p80),
   with GB/s from minimal byte counts (forward: read x, write y; backward: read x and dy, write dx).
3. CUDA graphs: a captured training step (forward + backward, torch.cuda.graph) replayed on new
   data must match the same steps run eagerly, running statistics included.
4. The opt-in persistent forward and backward (TRITON_BN_PERSISTENT=1, never yet run on a GPU),
   in a child process killed after --persistent-timeout seconds, so that a grid barrier that
   never releases fails the check instead of hanging it: ResNet-50 shapes at --persistent-batch
   (which path each took, the checks of 1., forward and forward + backward times persistent vs
   split vs torch), repeated calls bitwise
   equal (the barrier counter resets itself), CUDA-graph replay, a grid too large for the GPU
   falling back to the split path, and a grid the capacity check is told to allow but the
   driver must refuse (a cooperative launch too large) falling back with a warning.
5. The split path's last-program finalize (integer arrival counters that reset themselves) and
   num_batches_tracked counted in the forward kernel: 20 repeated training steps bitwise equal,
   two streams at once equal to serial, the count and the cumulative running mean vs torch.

Needs only torch and triton (works with torch 2.11 / triton 3.6); prints a table and writes it to
--out. Exit status 1 when a check fails. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: import this repository's triton_bn
    sys.path.insert(0, str(ROOT))

# ResNet-50 (torchvision v1.5, 224x224): the distinct BN shapes as (channels, spatial size)
RESNET50 = ((64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
            (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7))
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 3e-4}
DNAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = (out.detach().double() - ref).norm().item()
    r = ref.norm().item()
    e = d / r if r > 0 else d
    return e if math.isfinite(e) else math.inf


def make(shape, dtype, layout, device, gen):
    x = (torch.randn(shape, device=device, generator=gen) * 1.7 + 0.4).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def cases(cpu_smoke: bool, batch: int):
    out = []
    if cpu_smoke:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("nchw", "channels_last"):
                out.append(((4, 4, 5, 5), dtype, layout))
            out.append(((64, 3), dtype, "nc"))
            out.append(((32, 16), dtype, "nc"))
        return out
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("nchw", "channels_last"):
            for c, hw in RESNET50:
                out.append(((batch, c, hw, hw), dtype, layout))
    for dtype in (torch.float32, torch.bfloat16):
        out.append(((30_000_000, 3), dtype, "nc"))
        out.append(((4096, 1024), dtype, "nc"))
    return out


def train_step(fn, x, dy, w, b, rm, rv):
    """One training step of fn (triton_bn.batch_norm or F.batch_norm); returns the outputs."""
    xi = x.detach().clone().requires_grad_(True)
    wi = w.detach().clone().requires_grad_(True)
    bi = b.detach().clone().requires_grad_(True)
    rmi, rvi = rm.clone(), rv.clone()
    y = fn(xi, rmi, rvi, wi, bi, True, 0.1, 1e-5)
    y.backward(dy)
    return dict(y=y.detach(), dx=xi.grad, dw=wi.grad, db=bi.grad, rm=rmi, rv=rvi)


def check_case(shape, dtype, layout, device, gen):
    import triton_bn

    x = make(shape, dtype, layout, device, gen)
    dy = make(shape, dtype, layout, device, gen)
    C = shape[1]
    w = torch.rand(C, device=device, generator=gen) + 0.5
    b = torch.rand(C, device=device, generator=gen) - 0.5
    rm = (torch.rand(C, device=device, generator=gen) - 0.5) * 0.5
    rv = torch.rand(C, device=device, generator=gen) + 0.5
    tri = train_step(triton_bn.batch_norm, x, dy, w, b, rm, rv)
    ref_t = train_step(F.batch_norm, x, dy, w, b, rm, rv)
    # float64 oracle (PyTorch's native kernel in float64)
    ora = train_step(F.batch_norm, x.double(), dy.double(), w.double(), b.double(), rm.double(),
                     rv.double())
    worst = 0.0
    detail = []
    floor = FLOOR[dtype]
    ok = True
    for k in ("y", "dx", "dw", "db", "rm", "rv"):
        e_t = rel(tri[k], ora[k])
        e_p = rel(ref_t[k], ora[k])
        ratio = e_t / max(e_p, floor)
        worst = max(worst, ratio)
        if not (e_t <= 2 * e_p + floor):
            ok = False
            detail.append(f"{k}: triton {e_t:.2e} vs torch {e_p:.2e}")
    # inference
    with torch.no_grad():
        y_t = triton_bn.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
        y_p = F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
        y_o = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False,
                           0.1, 1e-5)
    e_t, e_p = rel(y_t, y_o), rel(y_p, y_o)
    worst = max(worst, e_t / max(e_p, floor))
    if not (e_t <= 2 * e_p + floor):
        ok = False
        detail.append(f"inference y: triton {e_t:.2e} vs torch {e_p:.2e}")
    if tri["y"].stride() != x.stride():
        detail.append(f"note: y strides {tri['y'].stride()} differ from x {x.stride()}")
    return ok, worst, "; ".join(detail), (x, dy, w, b, rm, rv)


def time_case(tensors, cuda: bool, rep_ms: int, warmup_ms: int):
    import triton_bn

    x, dy, w, b, rm, rv = tensors
    res = {}
    for name, fn in (("triton_bn", triton_bn.batch_norm), ("torch", F.batch_norm)):
        xi = x.detach().clone().requires_grad_(True)
        wi = w.detach().clone().requires_grad_(True)
        bi = b.detach().clone().requires_grad_(True)
        rmi, rvi = rm.clone(), rv.clone()

        args = (xi, rmi, rvi, wi, bi, True, 0.1, 1e-5)

        def fwd(fn=fn, args=args):
            return fn(*args)
        y = fwd()

        def bwd(y=y):
            y.backward(dy, retain_graph=True)
        res[(name, "fwd")] = bench(fwd, cuda, rep_ms, warmup_ms, None)
        res[(name, "bwd")] = bench(bwd, cuda, rep_ms, warmup_ms, [xi, wi, bi])
        del y, bwd
    return res


def bench(fn, cuda, rep_ms, warmup_ms, grad_to_none):
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                       grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    times = []
    fn()
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return [times[1], times[0], times[2]]


def cuda_graph_check(shape, dtype, layout, device, gen, steps: int = 3):
    """Captures triton_bn's training step in a CUDA graph, replays it on fresh data and compares
    with the same steps run eagerly. Returns (ok, max abs difference, message)."""
    import triton_bn

    C = shape[1]
    w0 = torch.rand(C, device=device, generator=gen) + 0.5
    b0 = torch.rand(C, device=device, generator=gen) - 0.5
    data = [(make(shape, dtype, layout, device, gen), make(shape, dtype, layout, device, gen))
            for _ in range(steps)]

    def fresh():
        return (w0.clone().requires_grad_(True), b0.clone().requires_grad_(True),
                torch.zeros(C, device=device), torch.ones(C, device=device))

    # eager
    w, b, rm, rv = fresh()
    eager = []
    for xd, dyd in data:
        xi = xd.clone().requires_grad_(True)
        w.grad = b.grad = None
        y = triton_bn.batch_norm(xi, rm, rv, w, b, True, 0.1, 1e-5)
        y.backward(dyd)
        eager.append((y.detach().clone(), xi.grad.clone(), w.grad.clone(), b.grad.clone()))
    eager_state = (rm.clone(), rv.clone())

    # graph: warm up on a side stream (compiles the kernels), then capture one step
    w, b, rm, rv = fresh()
    sx = data[0][0].clone().requires_grad_(True)
    sdy = data[0][1].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    warm_rm, warm_rv = rm.clone(), rv.clone()
    with torch.cuda.stream(s):
        for _ in range(2):
            y = triton_bn.batch_norm(sx, warm_rm, warm_rv, w, b, True, 0.1, 1e-5)
            y.backward(sdy)
    torch.cuda.current_stream().wait_stream(s)
    sx.grad = w.grad = b.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sy = triton_bn.batch_norm(sx, rm, rv, w, b, True, 0.1, 1e-5)
        sy.backward(sdy)
    # capture does not run the kernels: the state is untouched, the first replay is step 1
    rm.copy_(torch.zeros_like(rm))
    rv.copy_(torch.ones_like(rv))
    worst = 0.0
    for (xd, dyd), (ye, dxe, dwe, dbe) in zip(data, eager, strict=True):
        with torch.no_grad():
            sx.copy_(xd)
            sdy.copy_(dyd)
        g.replay()
        torch.cuda.synchronize()
        for got, want in ((sy, ye), (sx.grad, dxe), (w.grad, dwe), (b.grad, dbe)):
            worst = max(worst, (got.detach().float() - want.float()).abs().max().item())
    for got, want in zip((rm, rv), eager_state, strict=True):
        worst = max(worst, (got - want).abs().max().item())
    ok = worst <= (1e-6 if dtype == torch.float32 else 1e-2)
    return ok, worst, "bitwise equal" if worst == 0 else f"max |diff| {worst:.3g}"


PERSISTENT_SHAPES = ((64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7),
                     (2048, 7))


def counter_checks(device, gen, emit, cpu_smoke: bool) -> int:
    """Section 5: the split path's last-program finalize (kernels/common.py last_to_arrive: an
    int32 arrival counter per channel tile, reset by the last arrival) and num_batches_tracked
    counted in the forward kernel. Forced split path at a shape with hundreds of parts per channel:
    20 repeated training steps bitwise equal (a counter left non-zero would change which program
    finalizes: wrong or stale coefficients); two streams running different layers at once equal to
    the same layers run one after the other (counters are per stream); num_batches_tracked == the
    number of training calls, the cumulative running mean equal to torch's (in the CPU
    interpreter: 4 steps, a tiny shape). Returns failures."""
    import triton_bn
    from triton_bn import tuning

    cuda = device.type == "cuda"
    shape = (4, 8, 6, 6) if cpu_smoke else (64, 64, 56, 56)
    knobs = {"force_fused": False} if not cpu_smoke else {"force_fused": False, "parts": 3,
                                                           "tile": 32}
    fails = 0

    def step(m, x, dy):
        xi = x.detach().requires_grad_(True)
        y = m(xi)
        y.backward(dy)
        return [y.detach().clone(), xi.grad.clone(), m.weight.grad.clone(),
                m.running_mean.clone(), m.running_var.clone()]

    def fresh(C):
        return triton_bn.BatchNorm2d(C, momentum=None).to(device)

    with tuning.override(**knobs):
        x = make(shape, torch.bfloat16, "channels_last", device, gen)
        dy = make(shape, torch.bfloat16, "channels_last", device, gen)
        first = None
        same = True
        # the interpreter runs one program after another, so repeats race nothing there: a few
        # show that each call leaves the counters at zero
        steps = 20 if cuda else 4
        for _ in range(steps):
            m = fresh(shape[1])
            out = step(m, x, dy)
            first = first or out
            same = same and all(torch.equal(a, b) for a, b in zip(out, first))
        fails += 0 if same else 1
        emit(f"arrival counters: {steps} split-path training steps bitwise equal: "
             f"{'ok' if same else 'FAIL'}")

        m, ref = fresh(shape[1]), torch.nn.BatchNorm2d(shape[1], momentum=None).to(device)
        for _ in range(5):
            m(x)
            ref(x)
        ok = int(m.num_batches_tracked) == 5 == int(ref.num_batches_tracked) and \
            rel(m.running_mean, ref.running_mean.double()) < 1e-3
        fails += 0 if ok else 1
        emit(f"num_batches_tracked counted by the kernel (5 calls, momentum=None vs torch): "
             f"{'ok' if ok else 'FAIL'} ({int(m.num_batches_tracked)})")

        if cuda:
            shape2 = (32, 128, 28, 28)
            x2 = make(shape2, torch.float32, "nchw", device, gen)
            dy2 = make(shape2, torch.float32, "nchw", device, gen)
            serial = [step(fresh(shape[1]), x, dy), step(fresh(shape2[1]), x2, dy2)]
            streams = [torch.cuda.Stream(), torch.cuda.Stream()]
            outs = [None, None]
            torch.cuda.synchronize()
            for _ in range(10):
                for i, (s_, (xx, dd, C)) in enumerate(zip(streams, ((x, dy, shape[1]),
                                                                      (x2, dy2, shape2[1])))):
                    with torch.cuda.stream(s_):
                        outs[i] = step(fresh(C), xx, dd)
                torch.cuda.synchronize()
                ok = all(torch.equal(a, b) for o, s in zip(outs, serial) for a, b in zip(o, s))
                if not ok:
                    break
            fails += 0 if ok else 1
            emit(f"arrival counters: two streams at once equal to serial (10 rounds): "
                 f"{'ok' if ok else 'FAIL'}")
    return fails


def persistent_checks(args, device, gen, emit) -> int:
    """Section 4 (run in the child process): returns the number of failed checks."""
    import triton_bn
    from triton_bn import persistent, tuning

    cuda = device.type == "cuda"
    os.environ[persistent.ENV] = "1"
    taken = []
    real_launch = persistent._launch

    def spy(kernel, grid, a, kw, phases):
        taken.append(("fwd" if "forward" in kernel.fn.__name__ else "bwd", grid[0]))
        return real_launch(kernel, grid, a, kw, phases)

    persistent._launch = spy
    limits = contextlib.ExitStack()
    if not cuda:  # tiny shapes: force several parts per channel (and no single pass)
        limits.enter_context(persistent.limits(tile_channels_fast=64, tile_reduction_fast=32,
                                               max_block_channels=4, max_programs=64))
        limits.enter_context(tuning.override(force_fused=False))
    n_fail = 0

    def report(name, ok, msg):
        nonlocal n_fail
        n_fail += 0 if ok else 1
        emit(f"persistent {name}: {'ok' if ok else 'FAIL'} ({msg})")

    batch = args.persistent_batch
    shapes = ([((batch, c, hw, hw), dt, lay) for dt, lay in
               ((torch.float32, "nchw"), (torch.bfloat16, "channels_last"))
               for c, hw in PERSISTENT_SHAPES] if cuda else
              [((4, 3, 5, 7), torch.float32, "nchw"), ((4, 5, 6, 5), torch.bfloat16, "channels_last")])
    with limits:
        # 1. correctness and the path each shape takes; forward time persistent / split / torch
        for shape, dtype, layout in shapes:
            sname = "x".join(map(str, shape))
            before = len(taken)
            try:
                ok, worst, detail, tensors = check_case(shape, dtype, layout, device, gen)
                if cuda:
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001
                report(f"{sname} {DNAME[dtype]} {layout}", False, f"{type(exc).__name__}: {exc}")
                continue
            ran = dict(taken[before:])
            path = ", ".join(f"{k} persistent ({ran[k]} programs)" for k in ("fwd", "bwd")
                             if k in ran) or "not persistent (single pass or split)"
            msg = f"{path}, err/torch {worst:.2f}" + (f"; {detail}" if detail else "")
            if cuda and not args.no_timing and ran:
                x, dy, w, b, rm, rv = tensors
                xg = x.detach().clone().requires_grad_(True)

                def step(fn, grad):
                    y = fn(xg if grad else x, rm, rv, w, b, True, 0.1, 1e-5)
                    if grad:
                        y.backward(dy)

                t = {}
                for name, fn, env in (("persistent", triton_bn.batch_norm, "1"),
                                      ("split", triton_bn.batch_norm, "0"),
                                      ("torch", F.batch_norm, "1")):
                    os.environ[persistent.ENV] = env
                    for grad in (False, True):
                        t[name, grad] = bench(lambda fn=fn, grad=grad: step(fn, grad), True,
                                              args.rep_ms, args.warmup_ms, [xg])[0]
                os.environ[persistent.ENV] = "1"
                for grad, label in ((False, "fwd"), (True, "fwd+bwd")):
                    msg += (f"; {label} ms persistent {t['persistent', grad]:.4f}, split "
                            f"{t['split', grad]:.4f}, torch {t['torch', grad]:.4f}")
            report(f"{sname} {DNAME[dtype]} {layout}", ok, msg)
            del tensors
        fits = [s for s in shapes if s[0][0] * s[0][1] * s[0][2] * s[0][3] <= 2_000_000][-1:] or shapes
        shape, dtype, layout = fits[0]
        sname = f"{'x'.join(map(str, shape))} {DNAME[dtype]} {layout}"
        # 2. repeated calls: the same input gives the same bits every time
        x = make(shape, dtype, layout, device, gen)
        before = len(taken)
        repeats = 50 if cuda else 3
        ys = [triton_bn.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
              for _ in range(repeats)]
        if cuda:
            torch.cuda.synchronize()
        same = all(torch.equal(ys[0], y) for y in ys)
        report(f"{repeats} repeated calls {sname}", same and len(taken) - before == repeats,
               f"{len(taken) - before} persistent launches, bitwise equal: {same}")
        del ys
        # 3. CUDA-graph replay (training step captured with the persistent forward)
        if cuda:
            before = len(taken)
            try:
                ok, worst, msg = cuda_graph_check(shape, dtype, layout, device, gen)
            except Exception as exc:  # noqa: BLE001
                ok, msg = False, f"{type(exc).__name__}: {exc}"
            report(f"CUDA graph replay {sname}", ok and len(taken) > before,
                   f"{msg}; {len(taken) - before} persistent launches (eager + capture)")
        # 4. a grid that does not fit: the split path, still correct
        big = (max(64, 2 * batch), 256, 56, 56) if cuda else (16, 5, 6, 5)
        before = len(taken)
        try:
            ok, worst, detail, _ = check_case(big, torch.float32, "channels_last", device, gen)
            report(f"grid too large {'x'.join(map(str, big))}", ok and len(taken) == before,
                   f"persistent launches {len(taken) - before} (want 0), err/torch {worst:.2f}"
                   + (f"; {detail}" if detail else ""))
        except Exception as exc:  # noqa: BLE001
            report("grid too large", False, f"{type(exc).__name__}: {exc}")
        # 5. the driver refuses a cooperative grid larger than the GPU holds (capacity check
        #    told to allow it): a warning and the split path, never a hang
        if cuda:
            real_cap = persistent.capacity
            persistent.capacity = lambda compiled, dev: 1 << 30
            known = dict(persistent._CAPACITY)  # the check above cached the real capacity
            persistent._CAPACITY.clear()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ok, worst, detail, _ = check_case(big, torch.float32, "channels_last", device,
                                                      gen)
                    torch.cuda.synchronize()
                refused = any("persistent kernel not launched" in str(c.message) for c in caught)
                report("driver refuses an oversized cooperative grid", ok and refused,
                       f"warned: {refused}, err/torch {worst:.2f}")
            except Exception as exc:  # noqa: BLE001
                report("driver refuses an oversized cooperative grid", False,
                       f"{type(exc).__name__}: {exc}")
            finally:
                persistent.capacity = real_cap
                persistent._CAPACITY.clear()
                persistent._CAPACITY.update(known)
    return n_fail


def run_persistent_child(args, emit) -> int:
    """Runs section 4 in a child process with a timeout; returns the number of failures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--persistent-only",
           "--persistent-batch", str(args.persistent_batch), "--rep-ms", str(args.rep_ms),
           "--warmup-ms", str(args.warmup_ms)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    if args.no_timing:
        cmd.append("--no-timing")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.persistent_timeout,
                              check=False)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = None
    for line in out.splitlines():
        if line.startswith("persistent "):
            emit(line)
    if rc is None:
        emit(f"persistent: FAIL (killed after {args.persistent_timeout:g} s: a grid barrier that "
             "never released? the last line above is the last check that finished)")
        return 1
    fails = sum(1 for line in out.splitlines() if line.startswith("persistent ") and ": FAIL" in line)
    if rc != 0 and not fails:
        emit(f"persistent: FAIL (child exited {rc}): {(proc.stderr or '').strip()[-800:]}")
        return 1
    return fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="without CUDA: tiny shapes in Triton's CPU interpreter (no CUDA graphs)")
    ap.add_argument("--batch", type=int, default=64, help="ResNet-50 batch (default 64)")
    ap.add_argument("--rep-ms", type=int, default=40, help="do_bench measuring time per timing")
    ap.add_argument("--warmup-ms", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=240.0,
                    help="stop timing (keep checking) after this many seconds (default 240)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-persistent", action="store_true",
                    help="skip section 4 (the opt-in persistent forward)")
    ap.add_argument("--persistent-only", action="store_true",
                    help="run only section 4, in this process (what the child process runs)")
    ap.add_argument("--persistent-batch", type=int, default=32,
                    help="ResNet-50 batch of section 4 (default 32)")
    ap.add_argument("--persistent-timeout", type=float, default=300.0,
                    help="seconds before section 4's child process is killed (default 300)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu_check: CUDA is not available on this machine; nothing to check here. "
              "(Run it on a CUDA machine, or pass --cpu-smoke for a tiny run in Triton's CPU "
              "interpreter.)")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)  # steadier host timings of tiny ops
    import triton

    import triton_bn

    t_start = time.perf_counter()
    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    lines = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    if args.persistent_only:
        return 1 if persistent_checks(args, device, gen, emit) else 0

    gpu = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: NOT GPU figures)"
    emit(f"gpu_check: {gpu}; torch {torch.__version__}, triton {triton.__version__}, "
         f"triton_bn {triton_bn.__version__}")
    if cuda:
        n = 256 * 2**20  # 1 GiB of fp32
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        ms = bench(lambda: dst.copy_(src), True, 100, 20, None)[0]
        copy_gbps = 2 * n * 4 / (ms * 1e-3) / 1e9
        del src, dst
        torch.cuda.empty_cache()
        emit(f"device-to-device copy: {copy_gbps:.0f} GB/s (1 GiB, read + write)")
    else:
        copy_gbps = None
    head = (f"{'shape':>18s} {'dtype':5s} {'layout':13s} {'check':5s} {'err/torch':>9s} "
            f"{'fwd ms tbn':>10s} {'torch':>8s} {'x':>5s} {'bwd ms tbn':>10s} {'torch':>8s} "
            f"{'x':>5s} {'fwd GB/s':>8s} {'bwd GB/s':>8s}")
    emit(head)
    emit("-" * len(head))
    n_fail = 0
    speed_f, speed_b = [], []
    timing_stopped = False
    for shape, dtype, layout in cases(not cuda, args.batch):
        sname = "x".join(map(str, shape))
        try:
            ok, worst, detail, tensors = check_case(shape, dtype, layout, device, gen)
        except Exception as exc:  # noqa: BLE001
            n_fail += 1
            emit(f"{sname:>18s} {DNAME[dtype]:5s} {layout:13s} ERROR {type(exc).__name__}: {exc}")
            continue
        n_fail += 0 if ok else 1
        cols = f"{sname:>18s} {DNAME[dtype]:5s} {layout:13s} {'ok' if ok else 'FAIL':5s} " \
               f"{worst:9.2f}"
        if not args.no_timing and time.perf_counter() - t_start > args.max_seconds:
            if not timing_stopped:
                emit(f"(--max-seconds {args.max_seconds:g} reached: timing stops, checks go on)")
            timing_stopped = True
        if not args.no_timing and not timing_stopped:
            t = time_case(tensors, cuda, args.rep_ms, args.warmup_ms)
            nbytes = tensors[0].numel() * tensors[0].element_size()
            tf, pf = t[("triton_bn", "fwd")][0], t[("torch", "fwd")][0]
            tb, pb = t[("triton_bn", "bwd")][0], t[("torch", "bwd")][0]
            speed_f.append(pf / tf)
            speed_b.append(pb / tb)
            cols += (f" {tf:10.4f} {pf:8.4f} {pf / tf:5.2f} {tb:10.4f} {pb:8.4f} {pb / tb:5.2f}"
                     f" {2 * nbytes / tf / 1e6:8.0f} {3 * nbytes / tb / 1e6:8.0f}")
        emit(cols)
        if detail:
            emit(f"{'':>18s}   {detail}")
        del tensors
        if cuda:
            torch.cuda.empty_cache()

    def gm(v):
        return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")

    emit("")
    if speed_f:
        emit(f"geomean speedup over torch.nn.functional.batch_norm: forward {gm(speed_f):.2f}x, "
             f"backward {gm(speed_b):.2f}x ({len(speed_f)} cases)"
             + ("" if cuda else "  [CPU interpreter: NOT GPU figures]"))
    if copy_gbps:
        emit(f"GB/s columns count the minimal bytes; the copy ceiling is {copy_gbps:.0f} GB/s")
    if cuda:
        for shape, dtype, layout in (((args.batch, 128, 28, 28), torch.float32, "nchw"),
                                     ((args.batch, 256, 14, 14), torch.bfloat16,
                                      "channels_last")):
            try:
                ok, worst, msg = cuda_graph_check(shape, dtype, layout, device, gen)
            except Exception as exc:  # noqa: BLE001
                ok, msg = False, f"{type(exc).__name__}: {exc}"
            n_fail += 0 if ok else 1
            emit(f"CUDA graph replay vs eager, {'x'.join(map(str, shape))} {DNAME[dtype]} "
                 f"{layout}: {'ok' if ok else 'FAIL'} ({msg})")
    else:
        emit("CUDA graph check: skipped (no CUDA)")
    try:
        n_fail += counter_checks(device, gen, emit, not cuda)
    except Exception as exc:  # noqa: BLE001
        n_fail += 1
        emit(f"arrival counter checks: ERROR {type(exc).__name__}: {exc}")
    if not args.no_persistent:
        n_fail += run_persistent_child(args, emit)
    emit(f"{'ALL CHECKS PASSED' if n_fail == 0 else f'{n_fail} CHECKS FAILED'} in "
         f"{time.perf_counter() - t_start:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"table -> {args.out}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
