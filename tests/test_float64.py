"""float64 is exact: results match torch's own float64 batch norm (and the float64 reference) to
1e-12 relative, running statistics included.

eps, momentum, the renorm bounds and the element count used to reach the kernels as fp32 scalar
arguments, which left float64 running statistics ~5e-9 relative off; these tests fail then.
"""

import pytest
import torch
import torch.nn.functional as F

import triton_bn
from triton_bn import normalize, tuning
from triton_bn.functional import Renorm, RunningStats
from triton_bn.reference import reference_batch_norm

F64 = dict(rtol=1e-12, atol=1e-12)
PATHS = {"fused": {"force_fused": True}, "split3": {"force_fused": False, "parts": 3}}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def rel_close(actual, expected):
    """Relative to the largest magnitude (elementwise rtol is meaningless for values near 0)."""
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual / scale, expected / scale, **F64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("eps,momentum", [(1e-3, 0.1), (1e-5, 0.3)])
def test_training_matches_torch_float64(layout, path, eps, momentum):
    shape = (4, 5, 3, 6)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).contiguous(memory_format=LAYOUTS[layout])
    x.requires_grad_(True)
    C = shape[1]
    w = torch.randn(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    dy = torch.randn(shape, dtype=torch.float64)
    with tuning.override(**PATHS[path]):
        y = triton_bn.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    xt = x.detach().clone().requires_grad_(True)
    wt, bt = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y_t = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=momentum, eps=eps)
    grads_t = torch.autograd.grad(y_t, (xt, wt, bt), dy)
    rel_close(y, y_t)
    for g, g_t in zip(grads, grads_t):
        rel_close(g, g_t)
    rel_close(rm, rm_t)
    rel_close(rv, rv_t)


def test_inference_matches_torch_float64():
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) * 1e-3
    eps = 1.1e-4  # comparable to the variance: an fp32 eps shows at ~1e-9
    y = triton_bn.batch_norm(x, rm, rv, w, b, training=False, eps=eps)
    rel_close(y, F.batch_norm(x, rm, rv, w, b, training=False, eps=eps))


def test_cumulative_momentum_module_float64():
    torch.manual_seed(3)
    m = triton_bn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(4, 3, 2, 5, dtype=torch.float64) * 2 + 1
        rel_close(m(x), ref(x))
    rel_close(m.running_mean, ref.running_mean)
    rel_close(m.running_var, ref.running_var)


@pytest.mark.parametrize("path", PATHS)
def test_keras_renorm_with_clipping_float64(path):
    """Keras momentum, renorm with clipping bounds that bind: against the float64 reference."""
    torch.manual_seed(5)
    C = 4
    x = torch.randn(8, C, 3, dtype=torch.float64) * 2 + 0.7
    mm, mv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    mstd = mv.sqrt()
    r_mean, r_std = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.3
    clip = dict(rmin=0.9013, rmax=1.1017, dmax=0.3019)
    state0 = dict(mean=r_mean.clone(), stddev=r_std.clone(), moving_stddev=mstd.clone())
    ref_y, ref_state = reference_batch_norm(
        x, axis=1, eps=1.1e-3, running_mean=mm, running_var=mv, momentum=0.93,
        convention="keras", unbiased=False,
        renorm=dict(style="keras", momentum=0.87, **clip, **state0))
    running = RunningStats(mm.clone(), mv.clone(), momentum=0.93, convention="keras",
                           unbiased=False, moving_stddev=mstd.clone())
    renorm = Renorm(style="keras", momentum=0.87, mean=r_mean.clone(), stddev=r_std.clone(), **clip)
    with tuning.override(**PATHS[path]):
        y = normalize(x, training=True, eps=1.1e-3, running=running, renorm=renorm)
    rel_close(y, ref_y)
    rel_close(running.mean, ref_state["running_mean"])
    rel_close(running.var, ref_state["running_var"])
    rel_close(running.moving_stddev, ref_state["moving_stddev"])
    rel_close(renorm.mean, ref_state["renorm_mean"])
    rel_close(renorm.stddev, ref_state["renorm_stddev"])
