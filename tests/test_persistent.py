"""The opt-in persistent training forward and backward (triton_bn/persistent.py,
kernels/persistent.py).

In the interpreter each kernel runs as two launches split at its grid barrier (PHASE 1, PHASE 2),
so everything but the spinning itself runs here: the partial statistics in their fixed slots,
the fixed-order merge in every program, the one writer per channel of the running statistics
(forward) and of dgamma / dbeta (backward), the outputs from the tiles loaded before the
barrier. Small ``persistent.limits`` tiles give
many parts per channel. The barrier's counter arithmetic is tested with arrivals only (SPIN=False)
and a one-program grid; the spin itself needs a GPU (perf/gpu_check.py)."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from conftest import TOL, grad_tol
from test_functional import check_nan_propagates, check_relu_mask_at_zero

from triton_bn import Renorm, RunningStats, batch_norm, normalize, persistent, tuning
from triton_bn.kernels.persistent import grid_barrier
from triton_bn.layout import plan_geometry
from triton_bn.reference import reference_batch_norm

SMALL = dict(tile_channels_fast=64, tile_reduction_fast=32, max_block_channels=4)


@pytest.fixture
def launches(monkeypatch):
    """Turns the persistent path on and records (grid, phases) of each persistent launch."""
    monkeypatch.setenv(persistent.ENV, "1")
    seen = []
    real = persistent._launch

    def spy(kernel, grid, args, kw, phases):
        seen.append((grid[0], tuple(phases), kernel.fn.__name__))
        return real(kernel, grid, args, kw, phases)

    monkeypatch.setattr(persistent, "_launch", spy)
    with tuning.override(force_fused=False), persistent.limits(**SMALL):
        yield seen


def make_x(shape, dtype, layout, offset=0.0):
    x = torch.randn(shape, dtype=torch.float64) * 2 + offset
    x = x.to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# programs under SMALL: 3 channels x (4 x 2) parts; 2 channel tiles (4 + 1) x 15 parts; 7 parts;
# 2 channels x (3 x 2) parts (a 1-D spatial extent)
LAYOUTS = [("nchw", (4, 3, 5, 7)), ("nhwc", (4, 5, 6, 5)), ("nc", (50, 3)), ("nchw", (3, 2, 40))]
# every layout in fp32; the two 4-D layouts in bf16 and fp64 (the interpreter is slow)
CASES = ([(torch.float32, lay, sh) for lay, sh in LAYOUTS]
         + [(dt, lay, sh) for dt in (torch.bfloat16, torch.float64) for lay, sh in LAYOUTS[:2]])
CASE_IDS = [f"{str(dt).split('.')[-1]}-{lay}-{'x'.join(map(str, sh))}" for dt, lay, sh in CASES]


@pytest.mark.parametrize("dtype,layout,shape", CASES, ids=CASE_IDS)
def test_matches_reference_and_torch(launches, dtype, layout, shape):
    x = make_x(shape, dtype, layout)
    C = shape[1]
    w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    ref, state = reference_batch_norm(x, w, b, running_mean=rm, running_var=rv, momentum=0.1)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.1)
    y = batch_norm(x, rm, rv, w, b, training=True, momentum=0.1)
    assert launches and launches[-1][1] == (1, 2)
    programs = launches[-1][0]
    assert programs > (C if layout != "nhwc" else 2), "several parts per channel"
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert_close(y, ref, **TOL[dtype])
    assert_close(rm, state["running_mean"], **TOL[dtype])
    assert_close(rv, state["running_var"], **TOL[dtype])
    # no worse than about twice torch's own error in this dtype
    err = (y.double() - ref).abs().max().item()
    err_t = (y_t.double() - ref).abs().max().item()
    assert err <= 2 * err_t + TOL[dtype]["atol"]


@pytest.mark.parametrize("layout,shape", [("nchw", (4, 3, 5, 7)), ("nhwc", (4, 5, 6, 5))])
def test_ill_conditioned(launches, layout, shape):
    """1000 + small noise: the pivot (each channel's first element, shared by every part) keeps
    the digits that sums of raw values would lose."""
    x = (1000 + 0.01 * torch.randn(shape, dtype=torch.float64)).float()
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    y = normalize(x)
    ref, _ = reference_batch_norm(x)
    assert launches
    assert_close(y, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("layout,shape", [("nchw", (4, 3, 5, 7)), ("nhwc", (4, 5, 6, 5))])
def test_residual_relu_adjustment_and_gradients(launches, layout, shape):
    """Residual + ReLU and the Keras adjustment, running statistics in Keras's convention with
    the biased variance; the gradients (split backward) use the saved centre, offset, rstd and
    coefficients that only the part-0 programs write."""
    dtype = torch.float32
    C = shape[1]
    x = make_x(shape, dtype, layout, offset=3.0).requires_grad_()
    z = make_x(shape, dtype, layout).requires_grad_()
    w = torch.randn(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    adj = (torch.rand(C) + 0.5, torch.randn(C))
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    stats = RunningStats(rm0.clone(), rv0.clone(), momentum=0.9, convention="keras", unbiased=False)
    y = normalize(x, w, b, running=stats, adjustment=adj, residual=z, activation="relu")
    assert [k for _, _, k in launches] == ["bn_persistent_forward_kernel"]
    dy = torch.randn_like(y)
    gx, gz, gw, gb = torch.autograd.grad(y, [x, z, w, b], dy)
    xr, zr, wr, br = (t.detach().double().requires_grad_() for t in (x, z, w, b))
    ref, state = reference_batch_norm(xr, wr, br, running_mean=rm0, running_var=rv0, momentum=0.9,
                                      convention="keras", unbiased=False, adjustment=adj,
                                      residual=zr, activation="relu")
    rgx, rgz, rgw, rgb = torch.autograd.grad(ref, [xr, zr, wr, br], dy.double())
    assert [k for _, _, k in launches][1:] == ["bn_persistent_backward_kernel"]
    n = x.numel() // C
    assert_close(y, ref, **TOL[dtype])
    assert_close(stats.mean, state["running_mean"], **TOL[dtype])
    assert_close(stats.var, state["running_var"], **TOL[dtype])
    assert_close(gx, rgx, **TOL[dtype])
    assert_close(gz, rgz, **TOL[dtype])
    assert_close(gw, rgw, **grad_tol(dtype, n))
    assert_close(gb, rgb, **grad_tol(dtype, n))


@pytest.mark.parametrize("where", ["x-training", "residual"])
def test_nan_propagates_as_torch(launches, where):
    """test_functional's NaN check on the persistent kernels: the fused ReLU keeps a NaN, and the
    backward passes the gradient where y is NaN, as torch's ReLU."""
    check_nan_propagates(where, "relu")
    assert [k for _, _, k in launches] == ["bn_persistent_forward_kernel",
                                           "bn_persistent_backward_kernel"]


@pytest.mark.parametrize("dtype,layout,shape", CASES, ids=CASE_IDS)
def test_backward_matches_reference(launches, dtype, layout, shape):
    """dx, dgamma, dbeta of the persistent backward (x and dy read once) against float64
    autograd of the reference, on data far from zero."""
    C = shape[1]
    x = make_x(shape, dtype, layout, offset=5.0).requires_grad_()
    w = torch.randn(C, dtype=dtype, requires_grad=True)
    b = torch.randn(C, dtype=dtype, requires_grad=True)
    y = batch_norm(x, None, None, w, b, training=True)
    dy = make_x(shape, dtype, layout)
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], dy)
    kinds = [k for _, _, k in launches]
    assert kinds == ["bn_persistent_forward_kernel", "bn_persistent_backward_kernel"]
    assert launches[1][0] > (C if layout != "nhwc" else 2), "several parts per channel"
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref, _ = reference_batch_norm(xr, wr, br)
    rgx, rgw, rgb = torch.autograd.grad(ref, [xr, wr, br], dy.double())
    n = x.numel() // C
    assert gx.dtype == dtype and gx.stride() == x.stride()
    assert_close(gx, rgx, **TOL[dtype])
    assert_close(gw, rgw, **grad_tol(dtype, n))
    assert_close(gb, rgb, **grad_tol(dtype, n))


def test_backward_after_a_renorm_forward(launches):
    """Renorm's forward takes the split path; its backward (dgamma through r and d, saved as the
    pre-gamma affine) may take the persistent one. Only dweight asked for (no dx)."""
    C = 5
    x = make_x((4, 5, 6, 5), torch.float32, "nhwc", offset=2.0)
    w = torch.randn(C, requires_grad=True)
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    stats = RunningStats(rm0.clone(), rv0.clone(), momentum=0.1)
    y = normalize(x, w, None, running=stats, renorm=Renorm("torch", rmax=1.2, dmax=0.3))
    dy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, [w], dy)
    assert [k for _, _, k in launches] == ["bn_persistent_backward_kernel"]
    wr = w.detach().double().requires_grad_()
    ref, _ = reference_batch_norm(x, wr, running_mean=rm0, running_var=rv0,
                                  renorm=dict(style="torch", rmax=1.2, dmax=0.3))
    (rgw,) = torch.autograd.grad(ref, [wr], dy.double())
    assert_close(gw, rgw, **grad_tol(torch.float32, x.numel() // C))


def test_cumulative_momentum_and_no_affine(launches):
    x = make_x((4, 5, 6, 5), torch.float32, "nhwc")
    bn = torch.nn.BatchNorm2d(5, momentum=None, affine=False)
    ref_bn = torch.nn.BatchNorm2d(5, momentum=None, affine=False)
    for step in range(3):
        bn.num_batches_tracked.add_(1)
        stats = RunningStats(bn.running_mean, bn.running_var, momentum=None,
                             num_batches_tracked=bn.num_batches_tracked)
        xs = x + step
        y = normalize(xs, running=stats)
        y_ref = ref_bn(xs)
        assert_close(y, y_ref, **TOL[torch.float32])
    assert len(launches) == 3
    assert_close(bn.running_mean, ref_bn.running_mean, **TOL[torch.float32])
    assert_close(bn.running_var, ref_bn.running_var, **TOL[torch.float32])


def test_repeated_calls_are_deterministic(launches):
    x = make_x((4, 3, 5, 7), torch.float32, "nchw")
    ys = [normalize(x) for _ in range(2)]
    assert len(launches) == 2
    assert torch.equal(ys[0], ys[1])


def test_routed_to_the_split_path(launches, monkeypatch):
    """Renorm and ghost batches are not taken (the plan says why); the results are still right."""
    x = make_x((4, 3, 5, 7), torch.float32, "nchw")
    C = 3
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    stats = RunningStats(rm0.clone(), rv0.clone(), momentum=0.1)
    y = normalize(x, running=stats, renorm=Renorm("torch", rmax=1.5, dmax=0.5))
    ref, _ = reference_batch_norm(x, running_mean=rm0, running_var=rv0,
                                  renorm=dict(style="torch", rmax=1.5, dmax=0.5))
    assert_close(y, ref, **TOL[torch.float32])
    y = normalize(x, groups=2)
    assert_close(y, reference_batch_norm(x, groups=2)[0], **TOL[torch.float32])
    assert launches == []
    g1 = plan_geometry(x.shape, [x.stride()], (1,), 1)
    g2 = plan_geometry(x.shape, [x.stride()], (1,), 2)
    assert "renorm" in persistent.plan(g1, torch.float32, 2).reason
    assert "ghost" in persistent.plan(g2, torch.float32, 0).reason
    assert persistent.plan(g1, torch.float32, 0).tiles is not None
    # off unless asked for
    monkeypatch.delenv(persistent.ENV)
    normalize(x)
    assert launches == []


def test_grid_that_does_not_fit_falls_back(launches):
    x = make_x((4, 3, 5, 7), torch.float32, "nchw")
    with persistent.limits(max_programs=4):
        y = normalize(x)
    assert launches == []
    assert_close(y, reference_batch_norm(x)[0], **TOL[torch.float32])
    normalize(x)
    assert len(launches) == 1 and launches[0][0] > 4


def test_single_pass_plans_do_not_use_it(monkeypatch):
    """When one program holds a whole channel slice (the single-pass kernel), that runs."""
    monkeypatch.setenv(persistent.ENV, "1")
    seen = []
    monkeypatch.setattr(persistent, "_launch", lambda *a: seen.append(a))
    x = make_x((4, 3, 5, 5), torch.float32, "nchw")
    geo = plan_geometry(x.shape, [x.stride(), x.stride()], (1,), 1)
    assert tuning.plan_tiles(geo, "forward", x.device, x.dtype).fused
    y = normalize(x)
    assert seen == []
    assert_close(y, reference_batch_norm(x)[0], **TOL[torch.float32])


def test_explain(launches, monkeypatch):
    """The plan says which path a tensor takes and why."""
    x = make_x((4, 3, 5, 7), torch.float32, "nchw")
    assert persistent.explain(x).startswith("persistent forward: 24 programs of 1x32 (<= 264")
    assert persistent.explain(x, "backward").startswith("persistent backward: 36 programs")
    assert "ghost" in persistent.explain(x, groups=2)
    assert "renorm" in persistent.explain(x, renorm=2)
    with persistent.limits(max_programs=4):
        assert persistent.explain(x) == "split: 24 programs > 4 (the interpreter's max_programs)"
    with tuning.override(force_fused=True):
        assert persistent.explain(x).startswith("single pass")
    with pytest.raises(ValueError, match="kind"):
        persistent.explain(x, "sideways")
    monkeypatch.delenv(persistent.ENV)
    assert "off" in persistent.explain(x)


def test_limits_validate():
    with pytest.raises(TypeError, match="tile"):
        with persistent.limits(tiles=4):
            pass
    with pytest.raises(ValueError, match="max_programs"):
        with persistent.limits(max_programs=0):
            pass


# ------------------------------------------------------------------------- the grid barrier
@triton.jit
def _arrive_kernel(Bar, SPIN: tl.constexpr):
    grid_barrier(Bar, tl.program_id(0), tl.num_programs(0), SPIN)


@pytest.mark.parametrize("programs", [1, 2, 7, 264])
@pytest.mark.parametrize("start", [0, 12345, 2**31 - 3])
def test_barrier_counter_flips_its_top_bit_and_keeps_the_rest(programs, start):
    """One barrier's arrivals add 2**31 (mod 2**32): the top bit flips, the low 31 bits come
    back, so the counter is ready for the next call without a reset (and wraps harmlessly)."""
    bar = torch.tensor([start], dtype=torch.int32)
    expected = start
    for _ in range(3):
        _arrive_kernel[(programs,)](bar, SPIN=False)
        expected = (expected + 2**31) % 2**32
        assert int(bar.item()) % 2**32 == expected


def test_barrier_returns_for_a_one_program_grid():
    """With one program the spin ends at once (it flipped the bit itself): the spinning code
    path runs in the interpreter too."""
    bar = torch.zeros(1, dtype=torch.int32)
    _arrive_kernel[(1,)](bar, SPIN=True)
    _arrive_kernel[(1,)](bar, SPIN=True)
    assert int(bar.item()) == 0


# ------------------------------------------------------------------------ capacity arithmetic
class _Props:
    regs_per_multiprocessor = 65536
    max_threads_per_multi_processor = 2048
    shared_memory_per_multiprocessor = 233472  # sm_90: 228 KiB
    multi_processor_count = 132


@pytest.mark.parametrize("regs,shared,warps,expected", [
    (255, 8192, 8, 1),   # 8 warps x 8192 registers per warp = the whole register file
    (80, 96, 8, 3),      # 80 -> 2560 per warp (units of 256): 65536 // 20480
    (128, 0, 4, 4),      # 4096 per warp x 4 warps: 4 blocks
    (16, 0, 1, 32),      # the 32-blocks-per-SM limit
    (32, 0, 32, 2),      # threads: 2048 // 1024
    (32, 100000, 4, 2),  # shared memory: 233472 // (100000 + 1024 reserved)
])
def test_occupancy(regs, shared, warps, expected):
    """The CUDA occupancy rules (registers per warp rounded to 256, threads, shared memory with
    1 KiB reserved per block, 32 blocks), worked out by hand for sm_90's limits."""
    assert persistent.occupancy(regs, shared, warps, _Props()) == expected


@pytest.mark.slow
def test_bench_reports_the_persistent_path(launches, tmp_path, capsys):
    """``triton-bn bench`` names the path a triton_bn case took when it was the persistent one
    (a small shape: the bench calls each kernel six times; 4 x 3 x 5 x 7 took 16 s)."""
    from triton_bn.cli import main

    rc = main(["bench", "--shape", "2x2x4x4", "--dtypes", "fp32", "--layouts", "nchw", "--modes",
          "forward_backward", "--providers", "triton_bn", "--cpu-reps", "1", "--copy-mb", "1",
          "--no-progress", "--no-plot", "--csv", str(tmp_path / "b.csv")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "triton_bn path: persistent forward+backward" in out
    assert {k for _, _, k in launches} == {"bn_persistent_forward_kernel",
                                           "bn_persistent_backward_kernel"}


@pytest.mark.parametrize("layout", ["nhwc"])  # (nchw: the same mask code, 26 s more)
def test_relu_mask_is_the_forwards_at_zero(launches, layout):
    """The persistent forward's y and the persistent backward's recomputed ReLU (dbias, dx's
    dresidual) and a double backward's agree on pre-activations at zero (test_functional's
    check_relu_mask_at_zero: -ulp, 0, +ulp in the forward's own arithmetic)."""
    check_relu_mask_at_zero(torch.channels_last if layout == "nhwc" else None)
    kinds = {k for _, _, k in launches}
    assert kinds == {"bn_persistent_forward_kernel", "bn_persistent_backward_kernel"}
