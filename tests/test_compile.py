"""torch.compile(fullgraph=True) over the triton_bn modules: the kernels are custom operators, so
the graph has no breaks, and compiled outputs, gradients and running statistics match eager."""

import copy
import shutil

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import triton_bn.custom_ops  # noqa: F401  (registers torch.ops.triton_bn.*)
from triton_bn.modules import BatchNorm1d, BatchNorm2d

TOL = {"atol": 1e-5, "rtol": 1e-5}
GRAD_TOL = {"atol": 5e-5, "rtol": 1e-4}  # inductor reorders the conv/linear reductions



class Block(nn.Module):
    """conv -> BN + residual -> ReLU (fused), then a renorm BN with the cumulative momentum."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.bn = BatchNorm2d(C, activation="relu")
        self.bn2 = BatchNorm2d(C, momentum=None, renorm=True, rmax=1.2, dmax=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn(self.conv(x), residual=x))


def _model() -> nn.Module:
    return nn.Sequential(Block(3), nn.Flatten(), nn.Linear(12, 4), BatchNorm1d(4))


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y, x.grad


def _compare(compiled: nn.Module, eager: nn.Module, x: torch.Tensor) -> None:
    for a, b in zip(_run(compiled, x), _run(eager, x)):
        torch.testing.assert_close(a, b, **TOL)
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
    for (name, a), b in zip(compiled.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")


NO_CXX = shutil.which("g++") is None and shutil.which("clang++") is None
INDUCTOR = pytest.param("inductor", marks=pytest.mark.skipif(NO_CXX, reason="no C++ compiler"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    eager = _model()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for _ in range(2):  # the second call reuses the graph; running statistics keep advancing
        _compare(compiled, eager, torch.randn(5, 3, 2, 2) + 1)
        model.zero_grad()
        eager.zero_grad()
    assert int(model[0].bn2.num_batches_tracked) == 2
    model.eval()
    eager.eval()
    _compare(compiled, eager, torch.randn(5, 3, 2, 2))


def test_channels_last_under_compile():
    torch._dynamo.reset()
    bn = BatchNorm2d(3)
    eager = copy.deepcopy(bn)
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    y = torch.compile(bn, fullgraph=True, backend="aot_eager")(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, eager(x), **TOL)
    torch.testing.assert_close(bn.running_var, eager.running_var, **TOL)


def _forward_args(training: bool):
    x = torch.randn(3, 2, 4)
    w, b, rm, rv = torch.rand(2) + 0.5, torch.randn(2), torch.randn(2), torch.rand(2) + 0.5
    nbt = torch.tensor(3)  # training: counted by the kernel (count_batch), read by momentum=None
    args = (x, w, b, None, None, None, rm, rv, nbt, None, None, None)
    kwargs = {"axes": [1], "groups": 1, "training": training, "eps": 1e-5, "momentum": 0.1,
              "cumulative": training, "unbiased": True, "update_running": training, "renorm": 2,
              "renorm_momentum": 0.0, "rmin": 0.5, "rmax": 2.0, "dmax": 1.0, "relu": True,
              "count_batch": training}
    return args, kwargs


def test_custom_ops_pass_opcheck():
    """Schemas (with the mutated buffers), fake implementations and AOT dispatch."""
    args, kwargs = _forward_args(True)
    torch.library.opcheck(torch.ops.triton_bn.bn_forward.default, args, kwargs)
    y, centre, offset, rstd, pre_scale, pre_shift, cut = torch.ops.triton_bn.bn_forward(
        *args, **kwargs)
    assert centre.numel() == 0  # training: the centre is x's pivot, not stored
    assert cut.shape == (4,)  # the ReLU without a residual: each channel's cut (ops.saves_cut)
    x, w, b = args[0], args[1], args[2]
    # y: the forward's output, where a residual was added the ReLU mask's source
    bargs = (torch.randn_like(y), x, w, b, y, None, offset, rstd, pre_scale, pre_shift, cut)
    bkwargs = {"axes": [1], "groups": 1, "training": True, "relu": True, "need_dx": True,
               "need_dweight": True, "need_dbias": False, "need_dresidual": True}
    torch.library.opcheck(torch.ops.triton_bn.bn_backward.default, bargs, bkwargs)


def test_eager_mode_calls_the_kernels_directly():
    """No custom-op dispatch outside compilation (the eager path stays as fast as it can)."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    bn = BatchNorm2d(3)
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    with Record():
        bn(x).sum().backward()
    assert seen and not any("triton_bn" in name for name in seen)
