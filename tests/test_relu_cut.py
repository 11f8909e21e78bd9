"""kernels/common.relu_cut: the fused ReLU's recomputed mask as one compare per element.

For every (scale, shift) the cut (s, t) must give the mask the kernels otherwise recompute,
not (xm * scale + shift <= 0), for every float xm = x - m, or say it cannot (s = 0). The oracle
is torch's fp32 multiply and add, the interpreter's arithmetic for the same expression
(common.pre_activation), evaluated at the values where a wrong cut would show: the floats around
the true boundary -shift / scale and around t, zeros, subnormals, the largest floats, infinities
and NaN."""

import math

import pytest
import torch
import triton
import triton.language as tl

from triton_bn.kernels.common import relu_cut

F32 = torch.float32
TINY = torch.finfo(F32).tiny * 2.0**-23  # the smallest subnormal
MAX = torch.finfo(F32).max


@triton.jit
def _cut_kernel(Scale, Shift, Sign, Cut, N: tl.constexpr):
    i = tl.arange(0, N)
    sign, cut = relu_cut(tl.load(Scale + i), tl.load(Shift + i))
    tl.store(Sign + i, sign)
    tl.store(Cut + i, cut)


def _cuts(scale, shift):
    n = triton.next_power_of_2(scale.numel())
    pad = n - scale.numel()
    scale_p = torch.cat([scale, torch.ones(pad, dtype=F32)])
    shift_p = torch.cat([shift, torch.zeros(pad, dtype=F32)])
    sign, cut = torch.empty(n, dtype=F32), torch.empty(n, dtype=F32)
    _cut_kernel[(1,)](scale_p, shift_p, sign, cut, N=n)
    return sign[:scale.numel()], cut[:scale.numel()]


def _neighbours(v, k=4):
    """v and the k floats on either side of it (element-wise), [n, 2k + 1]."""
    out = [v]
    up, down = v, v
    for _ in range(k):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        out += [up, down]
    return torch.stack(out, 1)


def _probe_values(scale, shift, cut):
    boundary = torch.where(scale != 0, -shift / scale, torch.zeros_like(scale))
    fixed = torch.tensor([0.0, -0.0, TINY, -TINY, 1e-30, -1e-30, 1.0, -1.0, MAX, -MAX,
                          math.inf, -math.inf, math.nan], dtype=F32)
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(scale.numel(), 16, generator=g) * 10
    finite_cut = torch.where(torch.isfinite(cut), cut, torch.zeros_like(cut))
    return torch.cat([_neighbours(boundary), _neighbours(finite_cut), _neighbours(-finite_cut),
                      fixed.expand(scale.numel(), -1), rand], 1)


def _check(scale, shift):
    sign, cut = _cuts(scale, shift)
    xm = _probe_values(scale, shift, cut)
    expected = ~(xm * scale[:, None] + shift[:, None] <= 0)  # the kernels' mask (interpreter)
    got = ~(sign[:, None] * xm <= cut[:, None])
    exact = sign != 0
    wrong = (expected != got) & exact[:, None]
    assert not wrong.any(), (
        f"cut wrong for scale={scale[wrong.any(1)][:4].tolist()}, "
        f"shift={shift[wrong.any(1)][:4].tolist()}")
    return exact


def test_random_channels_all_get_an_exact_cut():
    g = torch.Generator().manual_seed(0)
    scale = torch.randn(4096, generator=g) * torch.exp(torch.randn(4096, generator=g) * 3)
    shift = torch.randn(4096, generator=g) * torch.exp(torch.randn(4096, generator=g) * 3)
    exact = _check(scale.float(), shift.float())
    assert exact.all(), f"{(~exact).sum().item()} channels without a cut"


def test_cuts_at_the_edges():
    specials = [0.0, -0.0, TINY, -TINY, 1e-30, -1e-30, 1e-20, 3.0, -3.0, 1e30, -1e30, MAX,
                math.inf, -math.inf, math.nan]
    scale, shift = torch.meshgrid(torch.tensor(specials, dtype=F32),
                                  torch.tensor(specials, dtype=F32), indexing="ij")
    scale, shift = scale.reshape(-1), shift.reshape(-1)
    exact = _check(scale, shift)
    # the one case no cut can express: scale 0 and shift <= 0 blocks every finite x - m and
    # passes an infinite one (0 * inf is NaN)
    inexpressible = (scale == 0) & (shift <= 0)
    assert not (exact & inexpressible).any()
    # a NaN or +inf shift or a NaN scale pass everything (t = NaN); an infinite scale with a
    # finite shift blocks exactly x - m < 0; a shift of -inf may be refused (its boundary is
    # where v * scale overflows, far from -shift / scale = inf)
    passes_all = scale.isnan() | shift.isnan() | (shift == math.inf)
    assert exact[(passes_all | (scale.isinf() & shift.isfinite())) & ~inexpressible].all()
    assert exact[(scale != 0) & shift.isfinite() & (shift.abs() >= 1.0)].all()


@pytest.mark.parametrize("shift", [0.0, TINY, -TINY])
def test_underflow_near_zero_is_exact_or_refused(shift):
    """shift 0 or subnormal: the boundary lies where v * scale underflows, up to many floats
    from -shift / scale; the cut is exact there or refused (s = 0), never wrong."""
    scale = torch.tensor([1e-3, 0.1, 0.5, 0.75, 1.0, 4.0, -0.1, -1.0], dtype=F32)
    _check(scale, torch.full_like(scale, shift))
