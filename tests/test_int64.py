"""64-bit addressing: tensors whose element offsets pass 2**31.

Two kinds of test. Views with huge strides over lazily allocated buffers (``torch.empty`` of many GB
touches no page until written; only the view's few elements are written), so the real 64-bit path
runs on a CPU in a second; before products of program ids and strides were 64-bit, the first of them
crashed the interpreter with a segmentation fault. And the 64-bit path forced on small shapes of
every kind, so each kernel's INT64 specialization is checked against the float64 reference.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, grad_tol

from triton_bn import normalize, ops, tuning
from triton_bn.functional import RunningStats
from triton_bn.reference import reference_batch_norm

BIG = 2**31


def lazy_view(shape, strides, dtype=torch.float32):
    """A view with the given strides into an untouched buffer just large enough for it, filled
    with random values (only the view's elements are written)."""
    span = sum((s - 1) * st for s, st in zip(shape, strides)) + 1
    assert span > BIG, "the view must need 64-bit offsets"
    x = torch.empty(span, dtype=dtype).as_strided(shape, strides)
    x.copy_(torch.randn(shape, dtype=dtype) * 2 + 0.5)
    return x


# (shape, strides): channel stride past 2**27 in the NCHW orientation (reduction fast: the
# program's channel index times the channel stride passes 2**31); row stride past 2**29 in the
# channels-fast orientation (rank 2).
BIG_VIEWS = {
    "nchw_channel_stride": ((2, 32, 4), (4, 2**27 + 1, 1)),
    "rows_stride": ((5, 16), (2**29 + 3, 1)),
}
PATHS = {"fused": {"force_fused": True},
         "split3": {"force_fused": False, "parts": 3, "tile": 16, "max_block_inner": 4,
                    "max_block_channels": 2}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("view", BIG_VIEWS)
def test_big_strided_view_training_forward_backward(view, path):
    shape, strides = BIG_VIEWS[view]
    x = lazy_view(shape, strides).requires_grad_(True)
    C = shape[1]
    w = torch.randn(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    dy = torch.randn(shape)
    with tuning.override(**PATHS[path]):
        y = normalize(x, w, b, training=True, running=RunningStats(rm, rv, momentum=0.1))
        dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    xd = x.detach().contiguous().requires_grad_(True)
    wt, bt = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y_t = F.batch_norm(xd, rm_t, rv_t, wt, bt, training=True, momentum=0.1)
    dx_t, dw_t, db_t = torch.autograd.grad(y_t, (xd, wt, bt), dy)
    tol = TOL[torch.float32]
    torch.testing.assert_close(y, y_t, **tol)
    torch.testing.assert_close(dx, dx_t, **tol)
    n = x.numel() // C
    torch.testing.assert_close(dw, dw_t, **grad_tol(torch.float32, n))
    torch.testing.assert_close(db, db_t, **grad_tol(torch.float32, n))
    torch.testing.assert_close(rm, rm_t, **tol)
    torch.testing.assert_close(rv, rv_t, **tol)


@pytest.mark.parametrize("view", BIG_VIEWS)
def test_big_strided_view_inference(view):
    shape, strides = BIG_VIEWS[view]
    x = lazy_view(shape, strides)
    C = shape[1]
    w, b = torch.randn(C), torch.randn(C)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    y = normalize(x, w, b, training=False, running=RunningStats(rm, rv))
    torch.testing.assert_close(y, F.batch_norm(x.contiguous(), rm, rv, w, b, training=False),
                               **TOL[torch.float32])


# Small shapes with the 64-bit path forced: every kernel's INT64 specialization.
FORCED = [
    # (name, shape, memory format, groups, residual+relu, path)
    ("nchw_fused", (4, 3, 5, 6), torch.contiguous_format, 1, False, "fused"),
    ("nchw_split", (4, 3, 5, 6), torch.contiguous_format, 1, True, "split3"),
    ("nhwc_fused", (4, 5, 3, 3), torch.channels_last, 1, True, "fused"),
    ("nhwc_split", (4, 5, 3, 3), torch.channels_last, 1, False, "split3"),
    ("ghost_nchw", (6, 3, 2, 5), torch.contiguous_format, 3, False, "split3"),
    ("ghost_nhwc", (6, 5, 2, 3), torch.channels_last, 2, True, "split3"),
]


@pytest.mark.parametrize("case", FORCED, ids=[c[0] for c in FORCED])
def test_forced_int64_matches_reference(case, monkeypatch):
    calls = []

    def always_int64(*tensors):
        calls.append(len(tensors))
        return True

    monkeypatch.setattr(ops, "_needs_int64", always_int64)
    _, shape, fmt, groups, with_res, path = case
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)
    C = shape[1]
    w = torch.randn(C, dtype=torch.float64).float().requires_grad_(True)
    b = torch.randn(C).requires_grad_(True)
    z = torch.randn(shape).requires_grad_(True) if with_res else None
    dy = torch.randn(shape)
    act = "relu" if with_res else None
    with tuning.override(**PATHS[path]):
        y = normalize(x, w, b, training=True, groups=groups, residual=z, activation=act)
        inputs = (x, w, b) + ((z,) if with_res else ())
        grads = torch.autograd.grad(y, inputs, dy)
        y_eval = normalize(x.detach(), w.detach(), b.detach(), training=False,
                           running=RunningStats(torch.zeros(C), torch.ones(C)))
    assert calls, "the forced 64-bit decision was never consulted"

    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    z64 = z.detach().double().requires_grad_(True) if with_res else None
    ref, _ = reference_batch_norm(x64, w64, b64, axis=1, groups=groups, residual=z64,
                                  activation=act)
    ref_inputs = (x64, w64, b64) + ((z64,) if with_res else ())
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double())
    tol = TOL[torch.float32]
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], **tol)
    n = x.numel() // C
    for g, r in zip(grads[1:3], ref_grads[1:3]):
        torch.testing.assert_close(g.double(), r, **grad_tol(torch.float32, n))
    if with_res:
        torch.testing.assert_close(grads[3].double(), ref_grads[3], **tol)
    y_eval_ref = F.batch_norm(x.detach().double(), torch.zeros(C, dtype=torch.float64),
                              torch.ones(C, dtype=torch.float64), w64.detach(), b64.detach())
    torch.testing.assert_close(y_eval.double(), y_eval_ref, **tol)
