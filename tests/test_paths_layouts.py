"""Memory layouts and code paths: NCHW, channels_last(_3d), strided and expanded views, mixed
layouts of x / dy / residual; the output keeps the input's memory format; layout.plan_geometry's
zero-copy plans; the forced code paths really are the single-pass / multi-part kernels."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, grad_tol

from triton_bn import batch_norm, normalize, tuning
from triton_bn.layout import plan_geometry
from triton_bn.reference import reference_batch_norm

PATHS = {
    "fused": {"force_fused": True},
    "split1": {"force_fused": False, "parts": 1},
    "split3": {"force_fused": False, "parts": 3, "tile": 32, "max_block_inner": 8, "max_block_channels": 2},
}
ALL_PATHS = list(PATHS)
F32 = TOL[torch.float32]


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def with_channel_offsets(x, axis):
    """Adds a different offset to every channel (in place on a fresh tensor; keeps strides)."""
    view = [1] * x.dim()
    view[axis] = x.shape[axis]
    return x.add_(torch.randn(x.shape[axis]).mul_(2).reshape(view))


# Each layout: (name, builder returning x (float32, any strides), channel axis)
def _nchw():
    return torch.randn(3, 4, 3, 5), 1


def _nhwc():
    return torch.randn(3, 4, 3, 5).contiguous(memory_format=torch.channels_last), 1


def _ndhwc():
    return torch.randn(2, 3, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d), 1


def _keras_last():
    return torch.randn(3, 3, 5, 4), -1


def _rank2():
    return torch.randn(10, 6), 1


def _slice_steps():
    return torch.randn(3, 8, 5, 7)[:, ::2, 1:, ::2], 1  # steps in C and W, offset in H


def _transposed():
    return torch.randn(3, 4, 5, 3).transpose(2, 3), 1  # H and W swapped in memory


def _permuted_nhwc():
    return torch.randn(3, 3, 5, 4).permute(0, 3, 1, 2), 1  # channels_last built by hand


def _batch_inner():
    return torch.randn(4, 5, 3).permute(2, 1, 0), 1  # (N, C, L) with N the fastest dimension


def _expanded_input():
    return torch.randn(1, 3, 4, 5).expand(4, 3, 4, 5), 1  # stride 0 batch (not dense)


LAYOUTS = {f.__name__[1:]: f for f in (_nchw, _nhwc, _ndhwc, _keras_last, _rank2, _slice_steps,
                                       _transposed, _permuted_nhwc, _batch_inner,
                                       _expanded_input)}


def build(name):
    x, axis = LAYOUTS[name]()
    if name != "expanded_input":
        with torch.no_grad():
            with_channel_offsets(x, axis)
    return x, axis


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_and_keep_format(layout, path):
    x, axis = build(layout)
    x.requires_grad_()
    K = x.shape[axis]
    w = (torch.rand(K) + 0.5).requires_grad_()
    b = torch.randn(K).requires_grad_()
    rm0, rv0 = torch.randn(K), torch.rand(K) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    dy = torch.randn(x.shape)
    with tuning.override(**PATHS[path]):
        y = batch_norm(x, rm, rv, w, b, training=True, axis=axis)
        dx, dw, db = torch.autograd.grad(y, [x, w, b], dy)

    # output (and dx) in the input's memory format: the strides torch.empty_like gives
    expected_strides = torch.empty_like(x).stride()
    assert y.stride() == expected_strides
    assert dx.stride() == expected_strides
    if layout in ("nhwc", "permuted_nhwc"):
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)
    if layout == "ndhwc":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        assert dx.is_contiguous(memory_format=torch.channels_last_3d)

    yr, st = reference_batch_norm(x, w, b, axis=axis, running_mean=rm0, running_var=rv0)
    dxr, dwr, dbr = torch.autograd.grad(yr, [x, w, b], dy.double())
    xm = x.movedim(axis, 1)
    rmt, rvt = rm0.clone(), rv0.clone()
    yt = F.batch_norm(xm, rmt, rvt, w, b, True).movedim(1, axis)
    dxt, dwt, dbt = torch.autograd.grad(yt, [x, w, b], dy)
    gt = grad_tol(torch.float32, x.numel() // K)
    for ours, ref, tor, t in ((y, yr, yt, F32), (dx, dxr, dxt, F32), (dw, dwr, dwt, gt),
                              (db, dbr, dbt, gt), (rm, st["running_mean"], rmt, F32),
                              (rv, st["running_var"], rvt, F32)):
        assert_close(ours, ref, **t)
        assert_close(ours, tor, **t)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "nhwc"])
def test_multi_axis_copy_path_keeps_format(fmt, path):
    """axis=[1, 3] needs the permuted-copy path; the output still has the input's strides."""
    x = torch.randn(3, 2, 4, 3)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    w = (torch.rand(6) + 0.5).requires_grad_()
    b = torch.randn(6).requires_grad_()
    dy = torch.randn(x.shape)
    with tuning.override(**PATHS[path]):
        y = normalize(x, w, b, axis=[1, 3])
        dx, dw, db = torch.autograd.grad(y, [x, w, b], dy)
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    yr, _ = reference_batch_norm(x, w, b, axis=[1, 3])
    dxr, dwr, dbr = torch.autograd.grad(yr, [x, w, b], dy.double())
    assert_close(y, yr, **F32)
    assert_close(dx, dxr, **F32)
    assert_close(dw, dwr, **grad_tol(torch.float32, 12))
    assert_close(db, dbr, **grad_tol(torch.float32, 12))


# ------------------------------------------------------------------ expanded / mixed dy
DY_KINDS = {
    "scalar-expand": lambda shape: torch.tensor(0.7).expand(shape),
    "channel-expand": lambda shape: torch.randn(1, shape[1], 1, 1).expand(shape),
    "batch-expand": lambda shape: torch.randn((1,) + shape[1:]).expand(shape),
    "nhwc-dy": lambda shape: torch.randn(shape).contiguous(memory_format=torch.channels_last),
    "sliced-dy": lambda shape: torch.randn(shape[0], shape[1], shape[2], 2 * shape[3])[..., ::2],
}


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("xfmt", [None, torch.channels_last], ids=["x-nchw", "x-nhwc"])
@pytest.mark.parametrize("dy_kind", list(DY_KINDS))
def test_upstream_gradient_layouts(dy_kind, xfmt, path):
    shape = (3, 4, 2, 5)
    x = with_channel_offsets(torch.randn(shape), 1)
    if xfmt is not None:
        x = x.contiguous(memory_format=xfmt)
    x.requires_grad_()
    w = (torch.rand(4) + 0.5).requires_grad_()
    b = torch.randn(4).requires_grad_()
    dy = DY_KINDS[dy_kind](shape)
    with tuning.override(**PATHS[path]):
        y = batch_norm(x, None, None, w, b, training=True)
        dx, dw, db = torch.autograd.grad(y, [x, w, b], dy)
    assert dx.stride() == torch.empty_like(x).stride()
    yr, _ = reference_batch_norm(x, w, b)
    dxr, dwr, dbr = torch.autograd.grad(yr, [x, w, b], dy.double())
    yt = F.batch_norm(x, None, None, w, b, True)
    dxt, dwt, dbt = torch.autograd.grad(yt, [x, w, b], dy)
    gt = grad_tol(torch.float32, 30)
    for ours, ref, tor, t in ((dx, dxr, dxt, F32), (dw, dwr, dwt, gt), (db, dbr, dbt, gt)):
        assert_close(ours, ref, **t)
        assert_close(ours, tor, **t)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_sum_backward_and_eval_expanded_dy(path):
    """y.sum().backward(): autograd hands the kernel a fully expanded (stride 0) ones tensor."""
    x = with_channel_offsets(torch.randn(3, 4, 2, 5), 1)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.rand(4) + 0.5).requires_grad_()
    b = torch.randn(4).requires_grad_()
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    for training in (True, False):
        with tuning.override(**PATHS[path]):
            x.grad = w.grad = b.grad = None
            batch_norm(x, rm.clone(), rv.clone(), w, b, training=training).sum().backward()
        xr = x.detach().clone().requires_grad_()
        wr = w.detach().clone().requires_grad_()
        br = b.detach().clone().requires_grad_()
        reference_batch_norm(xr, wr, br, training=training, running_mean=rm,
                             running_var=rv)[0].sum().backward()
        assert_close(x.grad, xr.grad, **F32)
        assert_close(w.grad, wr.grad, **grad_tol(torch.float32, 30))
        assert_close(b.grad, br.grad, **grad_tol(torch.float32, 30))
        if training:  # sum of a batch-normalized channel does not depend on x
            assert x.grad.abs().max() < 1e-5


@pytest.mark.parametrize("path", ALL_PATHS)
def test_mixed_layouts_with_residual(path):
    """x NCHW, residual channels_last, dy a transposed view: each is addressed with its own
    strides."""
    shape = (2, 3, 4, 4)
    x = with_channel_offsets(torch.randn(shape), 1).requires_grad_()
    z = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(2, 3, 4, 4).transpose(2, 3)
    w = (torch.rand(3) + 0.5).requires_grad_()
    b = torch.randn(3).requires_grad_()
    with tuning.override(**PATHS[path]):
        y = normalize(x, w, b, residual=z, activation="relu")
        g = torch.autograd.grad(y, [x, w, b, z], dy)
    yr, _ = reference_batch_norm(x, w, b, residual=z, activation="relu")
    gr = torch.autograd.grad(yr, [x, w, b, z], dy.double())
    assert_close(y, yr, **F32)
    for i, (ours, ref) in enumerate(zip(g, gr)):
        assert_close(ours, ref, **(grad_tol(torch.float32, 32) if i in (1, 2) else F32))
    assert y.stride() == x.stride()


# ------------------------------------------------------------------------ plan_geometry
def _element_offsets(t):
    """Memory offset (in elements) of every element of t, as a tensor of t's shape."""
    idx = torch.zeros(t.shape, dtype=torch.long)
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        view = [1] * t.dim()
        view[d] = size
        idx = idx + (torch.arange(size) * stride).reshape(view)
    return idx


def _check_addressing(geo, t, axes):
    """The geometry's (r0, r1, k) strides address exactly the elements of each channel."""
    offs = _element_offsets(t)
    perm = [d for d in range(t.dim()) if d not in axes] + list(axes)
    K = math.prod(t.shape[a] for a in axes)
    per_channel = offs.permute(perm).reshape(-1, K)
    assert geo.K == K and geo.R0 * geo.R1 == per_channel.shape[0]
    s_r0, s_r1, _, s_k = geo.strides[0]
    r0 = torch.arange(geo.R0).reshape(-1, 1) * s_r0
    r1 = torch.arange(geo.R1).reshape(1, -1) * s_r1
    base = (r0 + r1).reshape(-1)
    for k in range(K):
        got = torch.sort(base + k * s_k).values
        want = torch.sort(per_channel[:, k]).values
        assert torch.equal(got, want), f"channel {k} addresses the wrong elements"


ZERO_COPY = {
    "nchw": (lambda: torch.randn(2, 3, 4, 5), (1,)),
    "nhwc": (lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), (1,)),
    "ndhwc": (lambda: torch.randn(2, 3, 2, 4, 5).contiguous(
        memory_format=torch.channels_last_3d), (1,)),
    "keras-axis-1": (lambda: torch.randn(2, 4, 5, 3), (3,)),
    "strided-slice": (lambda: torch.randn(4, 6, 5, 7)[:, ::2, 1:], (1,)),
    "middle-axis": (lambda: torch.randn(2, 3, 4, 5), (2,)),
    "rank2": (lambda: torch.randn(8, 3), (1,)),
    "adjacent-axes": (lambda: torch.randn(2, 3, 4, 5), (2, 3)),
}


@pytest.mark.parametrize("name", list(ZERO_COPY))
def test_plan_geometry_zero_copy(name):
    make, axes = ZERO_COPY[name]
    x = make()
    geo = plan_geometry(x.shape, [x.stride()], axes)
    assert geo is not None, f"{name} should be addressed in place"
    _check_addressing(geo, x, axes)


def test_plan_geometry_several_tensors_and_ghost_groups():
    x = torch.randn(4, 3, 2, 5)
    y = torch.empty_like(x).contiguous(memory_format=torch.channels_last)
    geo = plan_geometry(x.shape, [x.stride(), y.stride()], (1,))
    assert geo is not None and len(geo.strides) == 2
    geo = plan_geometry(x.shape, [x.stride()], (1,), groups=2)
    assert geo is not None and geo.G == 2 and geo.K == 3 and geo.R == 20
    # group g holds samples g, g + 2: its channel-0 elements start at sample g
    assert geo.strides[0][2] == x.stride(0)


NEEDS_COPY = {
    # three reduction groups that cannot merge: N, H and the sliced W
    "sliced-W-nchw": (lambda: torch.randn(2, 3, 4, 5)[..., 1:], (1,)),
    # two channel dims that are not adjacent in memory
    "axes-1-3": (lambda: torch.randn(2, 3, 4, 5), (1, 3)),
}


@pytest.mark.parametrize("name", list(NEEDS_COPY))
def test_plan_geometry_needs_copy(name):
    make, axes = NEEDS_COPY[name]
    x = make()
    assert plan_geometry(x.shape, [x.stride()], axes) is None


# ------------------------------------------------------------- the forced paths are real
@pytest.mark.parametrize("name", ["nchw", "nhwc", "ndhwc", "keras-axis-1", "middle-axis"])
def test_forced_paths_take_effect(name):
    """The overrides the tests use select what they claim: one single-pass program per channel
    tile for 'fused', and more than one partial sum to merge for 'split3'."""
    make, axes = ZERO_COPY[name]
    x = make()
    geo = plan_geometry(x.shape, [x.stride()], axes)
    for kind in ("forward", "backward"):
        with tuning.override(**PATHS["fused"]):
            assert tuning.plan_tiles(geo, kind, x.device, x.dtype).fused
        with tuning.override(**PATHS["split1"]):
            p = tuning.plan_tiles(geo, kind, x.device, x.dtype)
            assert not p.fused and p.n_parts == 1
        with tuning.override(**PATHS["split3"]):
            p = tuning.plan_tiles(geo, kind, x.device, x.dtype)
            assert not p.fused and p.n_parts > 1
