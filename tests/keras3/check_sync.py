"""triton_bn.keras3.BatchNormalization(synchronized=True) in 2 gloo processes holding batches of
different sizes, against Keras's own layer over the concatenated batch (in each process)."""

import time

import keras
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from triton_bn import keras3

SIZES = (5, 3)  # batch size per rank
KWARGS = {"momentum": 0.6, "renorm": True, "renorm_clipping": {"rmax": 1.3, "dmax": 0.2},
          "renorm_momentum": 0.7}


def _check(rank: int) -> None:
    ours = keras3.BatchNormalization(synchronized=True, **KWARGS)
    theirs = keras.layers.BatchNormalization(**KWARGS)
    shape = (sum(SIZES), 4, 3)
    for layer in (ours, theirs):
        layer.build(shape)
    theirs.gamma.assign(np.linspace(0.5, 1.5, 3))
    theirs.beta.assign(np.linspace(-1, 1, 3))
    ours.set_weights(theirs.get_weights())
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    rng = np.random.RandomState(0)  # every rank draws the same full batch and keeps its rows
    for step in range(2):
        x = torch.tensor(rng.normal(2.0, 3.0, size=shape).astype("float32"))
        dy = torch.tensor(rng.normal(size=shape).astype("float32"))
        xf, xl = x.clone().requires_grad_(), x[rows].clone().requires_grad_()
        yf, yl = theirs(xf, training=True), ours(xl, training=True)
        (yf * dy).sum().backward()
        (yl * dy[rows]).sum().backward()
        torch.testing.assert_close(yl, yf[rows].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xl.grad, xf.grad[rows], atol=1e-5, rtol=1e-5)
        for w0, w1 in zip(ours.weights, theirs.weights):  # every variable, on every rank
            torch.testing.assert_close(w0.value, w1.value, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, p=f"step {step} {w1.path}": f"{p}: {m}")
        for w in (ours.gamma, ours.beta):  # parameter gradients stay local; their sum is global
            g = w.value.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, getattr(theirs, w.path.split("/")[-1]).value.grad,
                                       atol=1e-5, rtol=1e-5)
            w.value.grad = None
        for w in (theirs.gamma, theirs.beta):
            w.value.grad = None


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _check(rank)
    finally:
        dist.destroy_process_group()


def test_synchronized_two_processes_uneven_batches(tmp_path):
    world = len(SIZES)
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / "init")), nprocs=world, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("synchronized Keras 3 layer timed out (a collective is stuck)")
