"""What a batch-norm layer keeps for backward beyond the tensors it is given (x, its parameters
and buffers, all kept by reference; with a fused add and ReLU, its output y, as torch's ReLU
keeps it, and not the residual): torch's BatchNorm keeps its
batch mean and invstd, 8 bytes per channel in fp32 (16 in float64), measured here on torch itself
with the same hooks; a triton_bn layer may keep no more on any path (the mean's offset from x's
pivot and rstd; the centre and rstd in inference and sync BN, see ops.ForwardResult). Renorm and
the Keras adjustment add their pre-gamma affine (r, d): 8 bytes more per channel, and a training
layer with a fused ReLU and no residual its ReLU cuts (ops.saves_cut): 8 bytes more per channel,
still far below torch's BN + ReLU, whose ReLU keeps its output. The sync BN case is checked in
tests/test_sync.py."""

import pytest
import torch
from torch import nn

from triton_bn import Renorm, RunningStats, normalize, persistent, tuning
from triton_bn.modules import BatchNorm2d

C = 6
PATHS = {
    "fused": {"force_fused": True},
    "split3": {"force_fused": False, "parts": 3, "tile": 32, "max_block_inner": 8,
               "max_block_channels": 2},
}


def saved_beyond(step, *given) -> int:
    """Bytes of the storages autograd saves during ``step()`` (each storage once), without the
    storages of ``given`` tensors."""
    own = {t.untyped_storage().data_ptr() for t in given if t is not None}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def torch_bn_saved(x: torch.Tensor) -> int:
    """What torch's own BatchNorm2d (training) saves beyond x, its parameters and buffers."""
    bn = nn.BatchNorm2d(x.shape[1]).to(x.dtype)
    xr = x.detach().clone().requires_grad_()
    return saved_beyond(lambda: bn(xr), xr, *bn.parameters(), *bn.buffers())


def _x(dtype=torch.float32, channels_last=False):
    x = torch.randn(4, C, 3, 5, dtype=dtype) * 3 + 100  # far from 0: a pivot unlike the mean
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _state(dtype=torch.float32):
    w = torch.rand(C, dtype=dtype).add_(0.5).requires_grad_()
    b = torch.randn(C, dtype=dtype).requires_grad_()
    running = RunningStats(torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype))
    return w, b, running


def test_torch_reference_is_8_bytes_per_channel():
    """The bar the tests below hold triton_bn to, measured on torch (fp32 and float64)."""
    assert torch_bn_saved(_x()) == 8 * C
    assert torch_bn_saved(_x(torch.float64)) == 16 * C


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
def test_module_relu_saves_the_statistics_and_the_cuts(path, channels_last, dtype):
    """BatchNorm2d with the fused ReLU keeps torch's batch norm's per-channel statistics and as
    many bytes again for the ReLU's cuts (a sign and a threshold per channel, ops.saves_cut, so
    that the backward tests the mask with one compare), against torch's BN + ReLU, which also
    keeps the ReLU's output."""
    x = _x(dtype, channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bn = BatchNorm2d(C, activation="relu").to(acc)
    bn.train()
    with tuning.override(**PATHS[path]):
        got = saved_beyond(lambda: bn(x), x, *bn.parameters(), *bn.buffers())
        y = bn(x)
        y.backward(torch.randn_like(y))  # and backward runs on what was kept
    stats = torch_bn_saved(x.detach().to(acc))
    assert got == 2 * stats == (32 if dtype == torch.float64 else 16) * C
    tbn = nn.BatchNorm2d(C).to(acc)
    xr = x.detach().to(acc).requires_grad_()
    assert got < saved_beyond(lambda: torch.relu(tbn(xr)), xr, *tbn.parameters(), *tbn.buffers())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("residual_grad", [True, False], ids=["gated", "one_node"])
def test_residual_relu_saves_what_torch_bn_add_relu_saves(path, residual_grad):
    """BN + add + ReLU keeps the statistics and, for the ReLU mask, its output y (torch's ReLU
    keeps its output for the same reason), not the residual: what torch's BatchNorm2d, add and
    ReLU keep, measured with the same hooks. With a residual that needs a gradient the batch
    norm's node and the ReLU gate's share them."""
    x, z = _x(), torch.randn(4, C, 3, 5, requires_grad=residual_grad)
    w, b, running = _state()
    with tuning.override(**PATHS[path]):
        got = saved_beyond(lambda: normalize(x, w, b, running=running, residual=z,
                                             activation="relu"), x, z, w, b)
    bn = nn.BatchNorm2d(C)
    xr, zr = x.detach().clone().requires_grad_(), z.detach().clone().requires_grad_(residual_grad)
    bar = saved_beyond(lambda: torch.relu(bn(xr) + zr), xr, zr, *bn.parameters(), *bn.buffers())
    assert bar == 8 * C + x.numel() * x.element_size()  # the statistics and the ReLU's output
    assert got == bar


def test_ghost_batches_save_16_bytes_per_statistic_channel():
    x = torch.randn(8, C, 3, requires_grad=True)
    w, b, running = _state()
    got = saved_beyond(lambda: normalize(x, w, b, running=running, groups=2, activation="relu"),
                       x, w, b)
    # each ghost batch has its own mean and variance, and cuts: 2 x C statistic channels
    assert got == (8 + 8) * 2 * C


def test_inference_with_gradients_saves_8_bytes_per_channel():
    """Eval mode, x requiring a gradient: the centre (the running mean it used) and rstd."""
    x = _x()
    w, b, running = _state()
    got = saved_beyond(lambda: normalize(x, w, b, training=False, running=running,
                                         activation="relu"), x, w, b)
    assert got == 8 * C


@pytest.mark.parametrize("what", ["renorm", "adjustment"])
def test_renorm_and_adjustment_add_the_pre_gamma_affine(what):
    x = _x()
    w, b, running = _state()
    kw = {}
    if what == "renorm":
        running = RunningStats(torch.zeros(C), torch.ones(C), moving_stddev=torch.ones(C))
        kw["renorm"] = Renorm("keras", rmax=2.0, dmax=1.0, mean=torch.zeros(C),
                              stddev=torch.ones(C))
    else:
        kw["adjustment"] = (torch.rand(C) + 0.5, torch.randn(C))
    got = saved_beyond(lambda: normalize(x, w, b, running=running, activation="relu", **kw),
                       x, w, b)
    assert got == (8 + 8 + 8) * C  # offset, rstd; r * a, d * a + b_adj; the ReLU's cuts


def test_persistent_path_saves_16_bytes_per_channel(monkeypatch):
    monkeypatch.setenv(persistent.ENV, "1")
    x = torch.randn(16, C, 8, 8, requires_grad=True)
    w, b, running = _state()
    launched = persistent.launch_counts()["forward"]
    with tuning.override(force_fused=False), persistent.limits(
            tile_channels_fast=64, tile_reduction_fast=32, max_block_channels=4):
        got = saved_beyond(lambda: normalize(x, w, b, running=running, activation="relu"),
                           x, w, b)
    assert persistent.launch_counts()["forward"] > launched  # the persistent kernel ran
    assert got == (8 + 8) * C  # offset, rstd; the ReLU's cuts
