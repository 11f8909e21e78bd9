"""Synchronized batch norm over torch.distributed: 3 gloo processes on the CPU holding batches of
different sizes (one empty) against one process over the concatenated batch."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import triton_bn
from triton_bn.distributed import sync_normalize
from triton_bn.modules import BatchNorm2d, SyncBatchNorm

SIZES = (3, 0, 4)  # batch size per rank
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _split(t: torch.Tensor, rank: int, sizes=SIZES) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _check_torch_module(rank: int) -> None:
    """triton_bn.SyncBatchNorm against nn.BatchNorm2d over the whole batch: two training steps (the
    second channels_last), then eval."""
    C = 3
    ours = SyncBatchNorm(C)
    ref = nn.BatchNorm2d(C)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    for step, fmt in enumerate((torch.contiguous_format, torch.channels_last)):
        x = (torch.randn(sum(SIZES), C, 4, 5) * 2 + 1).to(memory_format=fmt)
        dy = torch.randn_like(x)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        xl = _split(x, rank).detach().requires_grad_()
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = ours(xl)
        own = {t.untyped_storage().data_ptr() for t in (xl, *ours.parameters(), *ours.buffers())}
        # what torch's batch norm saves beyond x: 8 bytes per channel (the merged mean, rstd)
        assert sum(b for p, b in saved.items() if p not in own) == 8 * C
        y.backward(_split(dy, rank))
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, _split(yr, rank), **TOL)
        torch.testing.assert_close(xl.grad, _split(xr.grad, rank), **TOL)
        # parameter gradients stay local (as torch's SyncBatchNorm); their sum is the global one
        torch.testing.assert_close(_summed(ours.weight.grad), ref.weight.grad, **TOL)
        torch.testing.assert_close(_summed(ours.bias.grad), ref.bias.grad, **TOL)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL)
        ours.zero_grad()
        ref.zero_grad()
    ours.eval()
    ref.eval()
    x = torch.randn(sum(SIZES), C, 4, 5)
    torch.testing.assert_close(ours(_split(x, rank)), _split(ref(x), rank), **TOL)


def _check_keras(rank: int) -> None:
    """sync_normalize with Keras conventions (axis=-1, momentum 0.99, biased variance, two ghost
    batches) against normalize over the concatenated batch."""
    sizes, C = (2, 0, 4), 5
    x = torch.randn(sum(sizes), 3, 2, C) + 3
    dy = torch.randn_like(x)
    w, b = torch.rand(C) + 0.5, torch.randn(C)

    def run(fn, x, dy, **kw):
        x = x.clone().requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = torch.randn(C), torch.rand(C) + 0.5
        running = triton_bn.RunningStats(rm, rv, momentum=0.99, convention="keras",
                                         unbiased=False)
        y = fn(x, wg, bg, axis=-1, training=True, eps=1e-3, running=running, groups=2, **kw)
        y.backward(dy)
        return y, x.grad, wg.grad, bg.grad, rm, rv

    torch.manual_seed(1)
    got = run(sync_normalize, _split(x, rank, sizes), _split(dy, rank, sizes))
    torch.manual_seed(1)
    want = run(triton_bn.normalize, x, dy)
    torch.testing.assert_close(got[0], _split(want[0], rank, sizes), **TOL)
    torch.testing.assert_close(got[1], _split(want[1], rank, sizes), **TOL)
    torch.testing.assert_close(_summed(got[2]), want[2], **TOL)
    torch.testing.assert_close(_summed(got[3]), want[3], **TOL)
    torch.testing.assert_close(got[4], want[4], **TOL)
    torch.testing.assert_close(got[5], want[5], **TOL)


def _check_keras_layer(rank: int) -> None:
    """BatchNormalization(synchronized=True) on each rank's slice against one (non-fused, as Keras
    takes with synchronized) layer over the concatenated batch: outputs, gradients, moving stats."""
    C = 4
    x = torch.randn(sum(SIZES), 3, 2, C) * 3 - 1
    dy = torch.randn_like(x)
    ours = triton_bn.BatchNormalization(momentum=0.9, synchronized=True)
    ref = triton_bn.BatchNormalization(momentum=0.9, fused=False)
    weights = [w.numpy() for w in (torch.rand(C) + 0.5, torch.randn(C), torch.randn(C),
                                   torch.rand(C) + 0.5)]
    for layer in (ours, ref):
        layer.build(x.shape)
        layer.set_weights(weights)
    for _ in range(2):
        xl = _split(x, rank).requires_grad_()
        y = ours(xl, training=True)
        y.backward(_split(dy, rank))
        xr = x.clone().requires_grad_()
        yr = ref(xr, training=True)
        yr.backward(dy)
        torch.testing.assert_close(y, _split(yr, rank), **TOL)
        torch.testing.assert_close(xl.grad, _split(xr.grad, rank), **TOL)
        torch.testing.assert_close(_summed(ours.gamma.grad), ref.gamma.grad, **TOL)
        for a, b in zip(ours.get_weights()[2:], ref.get_weights()[2:]):
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), **TOL)
        ours.zero_grad()
        ref.zero_grad()


def _check_every_rank_empty(rank: int) -> None:
    """Every rank's batch empty: the state stays as it was (as one process with an empty batch,
    and torch's module), for the torch module and for Keras renorm state; gradients are zeros."""
    C = 3
    ours = SyncBatchNorm(C, renorm=True)
    ref = nn.BatchNorm2d(C)
    with torch.no_grad():
        for m in (ours, ref):
            m.running_mean.copy_(torch.arange(C) + 0.5)
            m.running_var.copy_(torch.arange(C) + 2.0)
    x = torch.randn(0, C, 4, 5, requires_grad=True)
    y = ours(x)
    y.sum().backward()
    ref(torch.randn(0, C, 4, 5))
    assert y.shape == x.shape and x.grad.shape == x.shape
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, torch.zeros(C), rtol=0, atol=0)
    rm, rv, mstd = torch.randn(C), torch.rand(C) + 0.5, torch.rand(C) + 0.5
    r_mean, r_std = torch.randn(C), torch.rand(C) + 0.5
    running = triton_bn.RunningStats(rm.clone(), rv.clone(), momentum=0.9, convention="keras",
                                     unbiased=False, moving_stddev=mstd.clone())
    renorm = triton_bn.Renorm(style="keras", mean=r_mean.clone(), stddev=r_std.clone())
    sync_normalize(torch.randn(0, 2, C), axis=-1, training=True, running=running, renorm=renorm)
    for got, want in ((running.mean, rm), (running.var, rv), (running.moving_stddev, mstd),
                      (renorm.mean, r_mean), (renorm.stddev, r_std)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # every rank draws the same full batch and keeps its slice
        _check_torch_module(rank)
        torch.manual_seed(0)
        _check_keras(rank)
        torch.manual_seed(0)
        _check_keras_layer(rank)
        _check_every_rank_empty(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_three_processes_uneven_batches(tmp_path):
    world = len(SIZES)
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / "init")), nprocs=world, join=False)
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("synchronized batch norm timed out (a collective is stuck)")


def test_single_process_falls_back_to_local_batch_norm():
    assert not (dist.is_available() and dist.is_initialized())
    sync, local = SyncBatchNorm(4), BatchNorm2d(4)
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(sync(x), local(x))
    torch.testing.assert_close(sync.running_var, local.running_var)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync(torch.randn(1, 4))
    assert sync.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        sync(torch.randn(2, 0, 3))


def test_convert_sync_batchnorm_shares_state():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, momentum=None),
                          BatchNorm2d(4, activation="relu"))
    weight = model[1].weight
    out = SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(out[1], SyncBatchNorm) and isinstance(out[2], SyncBatchNorm)
    assert out[1].weight is weight and out[1].momentum is None
    assert out[2].activation == "relu"


if __name__ == "__main__":  # python tests/test_sync.py: the 3-process check alone
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import tempfile

    mp.spawn(_worker, args=(3, os.path.join(tempfile.mkdtemp(), "init")), nprocs=3)
