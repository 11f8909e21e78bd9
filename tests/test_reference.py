"""The float64 oracle (triton_bn.reference) against torch.nn.functional.batch_norm and against
formulas written out independently, so that the tests comparing the kernels with it can be trusted.
No Triton kernel runs here."""

import math

import pytest
import torch
import torch.nn.functional as F

from triton_bn.reference import reference_batch_norm

D = torch.float64
EXACT = {"atol": 1e-12, "rtol": 1e-10}


def close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or EXACT))


def torch_bn(x, axes, *args, **kw):
    """F.batch_norm over any channel axes: [reduction..., channels...] flattened to (R, K)."""
    nd = x.dim()
    perm = [d for d in range(nd) if d not in axes] + list(axes)
    xp = x.permute(perm)
    K = math.prod(x.shape[a] for a in axes)
    y = F.batch_norm(xp.reshape(-1, K), *args, **kw)
    return y.reshape(xp.shape).permute([perm.index(d) for d in range(nd)])


SHAPES = [((10, 4), 1), ((5, 3, 7), 1), ((3, 4, 2, 5), 1), ((2, 3, 2, 3, 4), 1),
          ((3, 4, 2, 5), -1), ((3, 4, 2, 5), 2), ((3, 4, 2, 5), [1, 3]), ((2, 3, 2, 3, 4), [2, 4])]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[f"{s}-{a}".replace(" ", "") for s, a in SHAPES])
def test_reference_matches_torch(shape, axis, training, affine):
    nd = len(shape)
    axes = sorted(a % nd for a in ([axis] if isinstance(axis, int) else axis))
    K = math.prod(shape[a] for a in axes)
    x = (torch.randn(shape, dtype=D) * 3 + 1).requires_grad_()
    w = (torch.rand(K, dtype=D) + 0.5).requires_grad_() if affine else None
    b = torch.randn(K, dtype=D).requires_grad_() if affine else None
    rm0, rv0 = torch.randn(K, dtype=D), torch.rand(K, dtype=D) + 0.5
    dy = torch.randn(shape, dtype=D)
    y, st = reference_batch_norm(x, w, b, axis=axis, training=training, eps=1e-3,
                                 running_mean=rm0, running_var=rv0, momentum=0.2)
    rmt, rvt = rm0.clone(), rv0.clone()
    yt = torch_bn(x, axes, rmt, rvt, w, b, training=training, momentum=0.2, eps=1e-3)
    close(y, yt)
    close(st["running_mean"], rmt)
    close(st["running_var"], rvt)
    inputs = [x] + ([w, b] if affine else [])
    for g, gt in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(yt, inputs, dy)):
        close(g, gt)


def test_reference_without_running_stats_and_float32_input():
    """Float32 inputs are upcast (the result is float64); no running stats -> empty state."""
    x = torch.randn(6, 3, 4)
    y, st = reference_batch_norm(x)
    assert y.dtype == D and st == {}
    close(y, F.batch_norm(x.double(), None, None, training=True))


def test_reference_cumulative_momentum_matches_module():
    bn = torch.nn.BatchNorm2d(3, momentum=None).double()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        x = torch.randn(2, 3, 2, 3, dtype=D) * step + step
        bn(x)
        _, st = reference_batch_norm(x, running_mean=rm, running_var=rv, momentum=None,
                                     num_batches_tracked=step)
        rm, rv = st["running_mean"], st["running_var"]
        close(rm, bn.running_mean)
        close(rv, bn.running_var)


@pytest.mark.parametrize("unbiased", [True, False])
def test_reference_keras_convention(unbiased):
    x = torch.randn(4, 3, 5, dtype=D) + 2
    rm0, rv0 = torch.randn(5, dtype=D), torch.rand(5, dtype=D) + 0.5
    _, st = reference_batch_norm(x, axis=-1, running_mean=rm0, running_var=rv0, momentum=0.99,
                                 convention="keras", unbiased=unbiased)
    close(st["running_mean"], rm0 * 0.99 + x.mean(dim=(0, 1)) * 0.01)
    close(st["running_var"], rv0 * 0.99 + x.var(dim=(0, 1), unbiased=unbiased) * 0.01)


def test_reference_ghost_batches():
    """Ghost batch g = samples g, g + G, ...; each normalized alone; the moving statistics get the
    mean over groups of the group means and (biased) variances."""
    G, shape = 3, (6, 4, 5)
    x = (torch.randn(shape, dtype=D) * 2).requires_grad_()
    w = (torch.rand(4, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=D).requires_grad_()
    rm0, rv0 = torch.randn(4, dtype=D), torch.rand(4, dtype=D) + 0.5
    y, st = reference_batch_norm(x, w, b, groups=G, running_mean=rm0, running_var=rv0,
                                 momentum=0.9, convention="keras", unbiased=False)
    yt = torch.empty(shape, dtype=D)
    means, vars_ = [], []
    for g in range(G):
        xg = x[g::G]
        yt[g::G] = F.batch_norm(xg, None, None, w, b, training=True)
        means.append(xg.mean(dim=(0, 2)))
        vars_.append(xg.var(dim=(0, 2), unbiased=False))
    close(y, yt)
    dy = torch.randn(shape, dtype=D)
    for g1, g2 in zip(torch.autograd.grad(y, [x, w, b], dy), torch.autograd.grad(yt, [x, w, b], dy)):
        close(g1, g2)
    close(st["running_mean"], 0.9 * rm0 + 0.1 * torch.stack(means).mean(0).detach())
    close(st["running_var"], 0.9 * rv0 + 0.1 * torch.stack(vars_).mean(0).detach())


def _bn_parts(x, eps):
    mean = x.mean(dim=(0, 2))
    var = x.var(dim=(0, 2), unbiased=False)
    return mean, var, torch.sqrt(var + eps)


@pytest.mark.parametrize("style", ["keras", "torch"])
def test_reference_renorm_unclipped_uses_reference_statistics(style):
    """Unclipped renorm: r * x_hat + d == (x - mu_ref) / sigma_ref; r and d carry no gradient, so
    dx == r * (plain batch-norm dx)."""
    eps = 1e-3
    x = (torch.randn(5, 3, 4, dtype=D) * 2 + 1).requires_grad_()
    rm0, rv0 = torch.randn(3, dtype=D), torch.rand(3, dtype=D) + 0.5
    r_mean, r_std = torch.randn(3, dtype=D), torch.rand(3, dtype=D) + 0.7
    if style == "keras":
        renorm = {"style": "keras", "momentum": 0.8, "mean": r_mean, "stddev": r_std,
                      "moving_stddev": torch.sqrt(rv0)}
        mu_ref, sigma_ref = r_mean, r_std
    else:
        renorm = {"style": "torch"}
        mu_ref, sigma_ref = rm0, torch.sqrt(rv0 + eps)
    y, st = reference_batch_norm(x, eps=eps, running_mean=rm0, running_var=rv0, renorm=renorm,
                                 momentum=0.9 if style == "keras" else 0.1,
                                 convention=style)
    view = (1, 3, 1)
    close(y, (x - mu_ref.view(view)) / sigma_ref.view(view))
    mean, _, std = _bn_parts(x.detach(), eps)
    r = std / sigma_ref
    dy = torch.randn(5, 3, 4, dtype=D)
    (dx,) = torch.autograd.grad(y, [x], dy)
    (dx_plain,) = torch.autograd.grad(F.batch_norm(x, None, None, training=True, eps=eps), [x], dy)
    close(dx, dx_plain * r.view(view))
    if style == "keras":
        close(st["renorm_mean"], r_mean + (mean - r_mean) * 0.2)
        close(st["renorm_stddev"], r_std + (std - r_std) * 0.2)
        mstd = torch.sqrt(rv0) * 0.9 + std * 0.1
        close(st["moving_stddev"], mstd)
        close(st["running_var"], torch.relu(mstd ** 2 - eps))
        close(st["running_mean"], rm0 * 0.9 + mean * 0.1)


def test_reference_renorm_fully_clipped_is_plain_batch_norm():
    """rmin = rmax = 1 and dmax = 0 force r = 1, d = 0: plain batch norm, values and gradients."""
    x = (torch.randn(4, 3, 5, dtype=D) * 2).requires_grad_()
    w = (torch.rand(3, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=D).requires_grad_()
    rm0, rv0 = torch.randn(3, dtype=D) + 5, torch.rand(3, dtype=D) + 3
    y, _ = reference_batch_norm(x, w, b, running_mean=rm0, running_var=rv0,
                                renorm={"style": "torch", "rmin": 1.0, "rmax": 1.0, "dmax": 0.0})
    yt = F.batch_norm(x, None, None, w, b, training=True)
    close(y, yt)
    dy = torch.randn(4, 3, 5, dtype=D)
    for g1, g2 in zip(torch.autograd.grad(y, [x, w, b], dy), torch.autograd.grad(yt, [x, w, b], dy)):
        close(g1, g2)


def test_reference_renorm_clipping():
    """r clipped into [rmin, rmax] and d into [-dmax, dmax], per channel."""
    x = torch.randn(50, 3, dtype=D) * torch.tensor([1.0, 2.0, 0.5], dtype=D) \
        + torch.tensor([0.0, 1.0, -1.0], dtype=D)
    rm0, rv0 = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    eps = 1e-5
    y, _ = reference_batch_norm(x, eps=eps, running_mean=rm0, running_var=rv0,
                                renorm={"style": "torch", "rmin": 0.8, "rmax": 1.25, "dmax": 0.5})
    mean, var = x.mean(0), x.var(0, unbiased=False)
    std = torch.sqrt(var + eps)
    sigma_ref = torch.sqrt(rv0 + eps)
    r = torch.clamp(std / sigma_ref, 0.8, 1.25)
    d = torch.clamp((mean - rm0) / sigma_ref, -0.5, 0.5)
    close(y, (x - mean) / std * r + d)


def test_reference_adjustment_residual_relu():
    x = (torch.randn(4, 3, 5, dtype=D) * 2).requires_grad_()
    z = torch.randn(4, 3, 5, dtype=D).requires_grad_()
    w = (torch.rand(3, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=D).requires_grad_()
    a_s, a_b = torch.rand(3, dtype=D) + 0.5, torch.randn(3, dtype=D)
    y, _ = reference_batch_norm(x, w, b, adjustment=(a_s, a_b), residual=z, activation="relu")
    view = (1, 3, 1)
    xh = F.batch_norm(x, None, None, training=True)
    yt = torch.relu((xh * a_s.view(view) + a_b.view(view)) * w.view(view) + b.view(view) + z)
    close(y, yt)
    dy = torch.randn(4, 3, 5, dtype=D)
    for g1, g2 in zip(torch.autograd.grad(y, [x, w, b, z], dy),
                      torch.autograd.grad(yt, [x, w, b, z], dy)):
        close(g1, g2)


def test_reference_eval_relu_residual():
    x = torch.randn(4, 3, 5, dtype=D).requires_grad_()
    z = torch.randn(4, 3, 5, dtype=D)
    rm, rv = torch.randn(3, dtype=D), torch.rand(3, dtype=D) + 0.5
    w, b = torch.rand(3, dtype=D) + 0.5, torch.randn(3, dtype=D)
    y, st = reference_batch_norm(x, w, b, training=False, running_mean=rm, running_var=rv,
                                 residual=z, activation="relu")
    close(y, torch.relu(F.batch_norm(x, rm, rv, w, b, training=False) + z))
    close(st["running_mean"], rm)
    close(st["running_var"], rv)


def test_reference_leaves_arguments_alone():
    x = torch.randn(4, 3, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rmean, rstd, mstd = torch.randn(3), torch.rand(3) + 0.5, torch.rand(3) + 0.5
    args = (x, w, b, rm, rv, rmean, rstd, mstd)
    before = [t.clone() for t in args]
    reference_batch_norm(x, w, b, running_mean=rm, running_var=rv, convention="keras",
                         momentum=0.9, renorm={"style": "keras", "momentum": 0.9, "mean": rmean,
                                                   "stddev": rstd, "moving_stddev": mstd})
    for t, t0 in zip(args, before):
        assert torch.equal(t, t0)


def test_reference_zero_size():
    x = torch.randn(0, 3, 4)
    rm, rv = torch.randn(3), torch.rand(3)
    y, st = reference_batch_norm(x, running_mean=rm, running_var=rv)
    assert y.shape == x.shape
    assert torch.equal(st["running_mean"], rm.double())
    assert torch.equal(st["running_var"], rv.double())
