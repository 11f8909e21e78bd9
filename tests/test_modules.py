"""triton_bn.BatchNorm1d/2d/3d and convert_model against torch.nn on the CPU (Triton interpreter)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from torch import nn
from torch.testing import assert_close

from triton_bn.convert import convert_model
from triton_bn.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm
from triton_bn.reference import reference_batch_norm

F32 = TOL[torch.float32]
BF16 = TOL[torch.bfloat16]
CL = torch.channels_last
CL3 = torch.channels_last_3d
STATE = ("running_mean", "running_var", "num_batches_tracked")


def _pair(ours_cls, torch_cls, *args, **kwargs):
    """Our module and torch's, with the same random parameters and buffers."""
    ref = torch_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
        if ref.running_mean is not None:
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _step(module, x, dy, **kwargs):
    x = x.detach().clone().requires_grad_()
    y = module(x, **kwargs)
    y.backward(dy)
    return y, x.grad


def _assert_same_state(ours, ref, tol=F32):
    for name in STATE:
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=name)


CASES = [  # (our class, torch class, input shape, memory format, momentum, affine)
    pytest.param(BatchNorm1d, nn.BatchNorm1d, (6, 5), None, 0.1, True, id="1d-NC"),
    pytest.param(BatchNorm1d, nn.BatchNorm1d, (4, 3, 7), None, None, True, id="1d-NCL-cma"),
    pytest.param(BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 6), None, 0.1, True, id="2d"),
    pytest.param(BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 6), CL, None, False, id="2d-cl-cma"),
    pytest.param(BatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 4), CL3, 0.3, True, id="3d-cl"),
]


@pytest.mark.parametrize("ours_cls,torch_cls,shape,fmt,momentum,affine", CASES)
def test_matches_torch(ours_cls, torch_cls, shape, fmt, momentum, affine):
    C = shape[1]
    ours, ref = _pair(ours_cls, torch_cls, C, momentum=momentum, affine=affine)
    for _ in range(2):  # two steps: the second depends on the first's running statistics
        x = torch.randn(shape) * 3 + 2
        if fmt is not None:
            x = x.to(memory_format=fmt)
        dy = torch.randn_like(x)
        y, dx = _step(ours, x, dy)
        y_ref, dx_ref = _step(ref, x, dy)
        torch.testing.assert_close(y, y_ref, **F32)
        torch.testing.assert_close(dx, dx_ref, **F32)
        assert y.stride() == y_ref.stride() and dx.stride() == dx_ref.stride()
        _assert_same_state(ours, ref)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **F32)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **F32)
    ours.eval()
    ref.eval()
    y, dx = _step(ours, x, dy)
    y_ref, dx_ref = _step(ref, x, dy)
    torch.testing.assert_close(y, y_ref, **F32)
    torch.testing.assert_close(dx, dx_ref, **F32)
    _assert_same_state(ours, ref)


def test_without_running_stats():
    ours, ref = _pair(BatchNorm2d, nn.BatchNorm2d, 3, track_running_stats=False)
    assert ours.state_dict().keys() == ref.state_dict().keys() == {"weight", "bias"}
    x, dy = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for mode in (True, False):  # batch statistics in eval mode too, as torch
        ours.train(mode)
        ref.train(mode)
        for a, b in zip(_step(ours, x, dy), _step(ref, x, dy)):
            torch.testing.assert_close(a, b, **F32)


def test_track_running_stats_switched_off_after_construction():
    ours, ref = _pair(BatchNorm2d, nn.BatchNorm2d, 3)
    ours.track_running_stats = ref.track_running_stats = False
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x), **F32)  # batch statistics, buffers untouched
    _assert_same_state(ours, ref)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), **F32)  # the buffers are used in eval


def test_empty_batch_like_torch():
    ours, ref = _pair(BatchNorm2d, nn.BatchNorm2d, 3)
    x, dy = torch.randn(0, 3, 2, 2), torch.randn(0, 3, 2, 2)
    y, dx = _step(ours, x, dy)
    assert y.shape == dx.shape == x.shape
    _step(ref, x, dy)
    _assert_same_state(ours, ref)  # num_batches_tracked counts it, statistics unchanged
    torch.testing.assert_close(ours.weight.grad, torch.zeros(3))


def test_state_dict_loads_both_ways():
    ref = nn.BatchNorm2d(5, momentum=None)
    ref(torch.randn(4, 5, 3, 3))
    ours = BatchNorm2d(5, momentum=None)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_state(ours, ref)
    back = nn.BatchNorm2d(5)
    ours(torch.randn(4, 5, 3, 3))
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(back, ours, tol={"atol": 0, "rtol": 0})
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("bad,match", [
    (torch.randn(1, 3), "more than 1 value per channel"),  # torch increments, then rejects
    (torch.randn(4, 5), "must have shape"),  # wrong channel count (torch: same)
    (torch.randn(2, 3, 4, 5), "expected 2D or 3D input"),
])
def test_rejected_input_changes_no_state(bad, match):
    m = BatchNorm1d(3, momentum=None)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        m(bad)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_bad_residual_is_rejected_before_any_change():
    m = BatchNorm2d(3, activation="relu")
    with pytest.raises(ValueError, match="residual"):
        m(torch.randn(2, 3, 2, 2), residual=torch.randn(2, 3, 2, 1))
    assert m.num_batches_tracked.item() == 0


def test_constructor_checks_and_repr():
    with pytest.raises(ValueError, match="activation"):
        BatchNorm2d(3, activation="gelu")
    with pytest.raises(ValueError, match="track_running_stats"):
        BatchNorm2d(3, renorm=True, track_running_stats=False)
    m = BatchNorm2d(3, renorm=True, rmax=2.0, dmax=1.0, activation="relu")
    assert isinstance(m, nn.BatchNorm2d)
    assert repr(m) == repr(nn.BatchNorm2d(3))[:-1] + \
        ", renorm=True, rmax=2.0, dmax=1.0, activation='relu')"


def test_renorm_against_reference():
    C, rmax, dmax = 4, 1.5, 0.5
    m = BatchNorm2d(C, renorm=True, rmax=rmax, dmax=dmax, momentum=0.2)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.running_mean.copy_(torch.tensor([0.0, 1.0, 2.5, -1.0]))
        m.running_var.copy_(torch.tensor([1.0, 0.2, 9.0, 2.0]))  # r and d clip on some channels
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(3, C, 4, 5) * 1.5 + 1
    dy = torch.randn_like(x)
    y, dx = _step(m, x, dy)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y_ref, state = reference_batch_norm(
        x64, w64, b64, axis=1, running_mean=rm, running_var=rv, momentum=0.2,
        renorm={"style": "torch", "rmin": 1 / rmax, "rmax": rmax, "dmax": dmax})
    y_ref.backward(dy.double())
    torch.testing.assert_close(y, y_ref.float(), **F32)
    torch.testing.assert_close(dx, x64.grad.float(), **F32)
    torch.testing.assert_close(m.weight.grad, w64.grad.float(), **F32)
    torch.testing.assert_close(m.bias.grad, b64.grad.float(), **F32)
    torch.testing.assert_close(m.running_mean, state["running_mean"].float(), **F32)
    torch.testing.assert_close(m.running_var, state["running_var"].float(), **F32)
    m.eval()  # inference: plain batch norm with the running statistics
    ref = nn.BatchNorm2d(C).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x), **F32)


@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_relu_and_residual(with_residual):
    ours, ref = _pair(BatchNorm2d, nn.BatchNorm2d, 3)
    ours.activation = "relu"
    x = torch.randn(2, 3, 4, 5).to(memory_format=CL)
    z = torch.randn_like(x).requires_grad_() if with_residual else None
    zr = z.detach().clone().requires_grad_() if with_residual else None
    dy = torch.randn_like(x)
    y, dx = _step(ours, x, dy, residual=z)
    xr = x.clone().requires_grad_()
    y_ref = F.relu(ref(xr) + zr) if with_residual else F.relu(ref(xr))
    y_ref.backward(dy)
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, y_ref, **F32)
    torch.testing.assert_close(dx, xr.grad, **F32)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **F32)
    if with_residual:
        torch.testing.assert_close(z.grad, zr.grad, **F32)


def test_autocast_bfloat16_like_torch():
    conv = nn.Conv2d(3, 4, 1)
    ours, ref = _pair(BatchNorm2d, nn.BatchNorm2d, 4)
    x = torch.randn(2, 3, 4, 4)
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(conv(xi))
        y.float().square().sum().backward()
        outs.append((y, xi.grad, m.weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert ours.running_mean.dtype == torch.float32 and dw.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **BF16)
    torch.testing.assert_close(dx, dx_ref, atol=0.1, rtol=0.05)
    torch.testing.assert_close(dw, dw_ref, atol=0.1, rtol=0.05)
    _assert_same_state(ours, ref, tol=BF16)


def test_training_path_has_no_host_sync(monkeypatch):
    """CUDA graphs / compile need forward and backward without .item(), bool(t), float(t)."""
    m = BatchNorm2d(3, momentum=None, renorm=True, activation="relu")
    x = torch.randn(2, 3, 3, 3, requires_grad=True)
    z = torch.randn(2, 3, 3, 3, requires_grad=True)

    def host_sync(*args, **kwargs):
        raise AssertionError("host synchronisation on the training path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with pytest.raises(AssertionError):
        bool(torch.ones(()))  # the patch is in force
    m(x, residual=z).sum().backward()
    monkeypatch.undo()
    assert m.num_batches_tracked.item() == 1 and x.grad is not None


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_convert_model_trains_in_step_with_torch():
    torch.manual_seed(0)
    ref = _cnn()
    model = copy.deepcopy(ref)
    params = list(model.parameters())
    model = convert_model(model)
    assert [type(m) for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [BatchNorm2d, BatchNorm2d, BatchNorm1d]
    assert all(a is b for a, b in zip(model.parameters(), params))  # optimizer-safe
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref)]
    for _ in range(3):
        x, target = torch.randn(4, 3, 6, 6), torch.randn(4, 2)
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            F.mse_loss(m(x), target).backward()
            opt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        for a, b in zip(model.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_convert_model_keeps_dtype_mode_and_sync():
    class MyBN(nn.BatchNorm2d):  # a subclass may change the forward: left alone
        pass

    model = nn.Sequential(nn.BatchNorm3d(2, affine=False), nn.SyncBatchNorm(2), MyBN(2)).double()
    model[1].eval()
    out = convert_model(model)
    assert type(out[0]) is BatchNorm3d and type(out[1]) is SyncBatchNorm and type(out[2]) is MyBN
    assert out[0].running_mean.dtype == torch.float64 and out[0].weight is None
    assert out[1].weight.dtype == torch.float64
    assert out[0].training and not out[1].training
    single = convert_model(nn.BatchNorm1d(3), synchronized=True)
    assert type(single) is SyncBatchNorm and single.num_features == 3


def test_eval_calls_take_the_planned_launch_and_match_torch():
    """Eval mode with nothing to differentiate: the first call of a signature is validated by the
    full path, later ones take its planned launch (modules._PLANS). Every call, planned
    or not, matches torch.nn.BatchNorm2d on the same state, including state changed in place
    between calls, a new signature (layout, dtype, residual + ReLU) and an input needing grad."""
    from triton_bn import modules

    modules._PLANS.clear()
    ours, ref = BatchNorm2d(5), nn.BatchNorm2d(5)
    with torch.no_grad():
        for m in (ours, ref):
            m.running_mean.copy_(torch.linspace(-1, 1, 5))
            m.running_var.copy_(torch.linspace(0.5, 2, 5))
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-0.2, 0.2, 5))
    ours.eval(), ref.eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        for step in range(3):
            x = torch.randn(3, 5, 4, 6).contiguous(memory_format=fmt)
            with torch.no_grad():
                assert_close(ours(x), ref(x), **TOL[torch.float32])
                for m in (ours, ref):  # state changes in place: read on every call
                    m.running_mean.add_(0.25)
                    m.weight.mul_(1.1)
    assert len(modules._PLANS) == 2  # one per layout
    x = torch.randn(3, 5, 4, 6, requires_grad=True)  # a graph to record: the full path
    y = ours(x)
    assert y.requires_grad
    assert_close(y, ref(x), **TOL[torch.float32])
    relu = BatchNorm2d(5, activation="relu").eval()
    relu.load_state_dict(ours.state_dict())
    z = torch.randn(3, 5, 4, 6)
    for _ in range(2):
        with torch.no_grad():
            assert_close(relu(x.detach(), z), torch.relu(ref(x.detach()) + z), **TOL[torch.float32])
    assert len(modules._PLANS) == 3


def test_training_calls_reuse_their_plan_and_match_torch():
    """Training calls of one signature reuse what their first call planned (ops.call_memo: tile
    plans, launch keys, scratch for the split reductions' parts and dx coefficients). Checked
    against torch.nn.BatchNorm2d step after step: split path and single pass (a new tuning policy
    plans anew), dy in another layout than x (the backward plans per dy layout), and two layers
    run in turn (they share one scratch buffer: each call must finish with it before the next)."""
    from triton_bn import tuning

    torch.manual_seed(0)
    pairs = [_pair(BatchNorm2d, nn.BatchNorm2d, 6) for _ in range(2)]
    for policy in (dict(force_fused=False, parts=3), dict(force_fused=True), {}):
        with tuning.override(**policy):
            for step in range(3):
                x = torch.randn(4, 6, 5, 3) * 3 + 1
                fmt = torch.channels_last if step == 1 else torch.contiguous_format
                dys = [torch.randn(4, 6, 5, 3).contiguous(memory_format=fmt) for _ in pairs]
                outs = []
                for (ours, ref), dy in zip(pairs, dys):  # layer 1 forward, layer 2 forward, ...
                    outs.append([_step(m, x, dy) for m in (ours, ref)])
                for (ours, ref), ((y, dx), (y_ref, dx_ref)) in zip(pairs, outs):
                    assert_close(y, y_ref, **F32)
                    assert_close(dx, dx_ref, **F32)
                    assert_close(ours.weight.grad, ref.weight.grad, **F32)
                    assert_close(ours.bias.grad, ref.bias.grad, **F32)
                    _assert_same_state(ours, ref)


def test_planned_calls_with_a_two_level_finalize_match_torch():
    """Channels-last training calls whose split reductions have enough parts (13, merged 2 at a
    time) that the finalize takes two levels (kernels/common.py arrive_in_group): the planned launches
    size the parts (a row per group after the parts) and the arrival counters for it. Step after
    step against torch.nn.BatchNorm2d: output, gradients, running statistics and the count."""
    from triton_bn import tuning

    torch.manual_seed(2)
    ours, ref = _pair(BatchNorm2d, nn.BatchNorm2d, 3)
    with tuning.override(force_fused=False, parts=13, tile=32, max_block_channels=2,
                         finalize_parts=2):
        for _ in range(3):
            x = (torch.randn(8, 3, 5, 5) * 3 + 1).contiguous(memory_format=CL)
            dy = (torch.randn(8, 3, 5, 5) + 2).contiguous(memory_format=CL)
            (y, dx), (y_ref, dx_ref) = (_step(m, x, dy) for m in (ours, ref))
            assert_close(y, y_ref, **F32)
            assert_close(dx, dx_ref, **F32)
            assert_close(ours.weight.grad, ref.weight.grad, **F32)
            assert_close(ours.bias.grad, ref.bias.grad, **F32)
            _assert_same_state(ours, ref)


@pytest.mark.parametrize("fused", [False, True], ids=["split", "single"])
def test_planned_residual_relu_calls_match_torch(fused):
    """The planned launches with the fused residual + ReLU, call after call, against torch's
    BatchNorm2d, add and ReLU (gradients of x, the residual and the parameters)."""
    from triton_bn import tuning

    torch.manual_seed(1)
    ours, ref = _pair(BatchNorm2d, nn.BatchNorm2d, 5)
    ours.activation = "relu"
    with tuning.override(force_fused=fused, **({} if fused else {"parts": 2})):
        for _ in range(3):
            x = torch.randn(3, 5, 4, 4).contiguous(memory_format=CL)
            z = torch.randn(3, 5, 4, 4).contiguous(memory_format=CL)
            dy = torch.randn(3, 5, 4, 4)
            grads = []
            for m, call in ((ours, lambda m, x, z: m(x, z)),
                            (ref, lambda m, x, z: torch.relu(m(x) + z))):
                xg, zg = x.clone().requires_grad_(), z.clone().requires_grad_()
                m.zero_grad()
                y = call(m, xg, zg)
                y.backward(dy)
                grads.append((y, xg.grad, zg.grad, m.weight.grad, m.bias.grad))
            for a, b in zip(*grads):
                assert_close(a, b, **F32)
            _assert_same_state(ours, ref)


def test_planned_backward_with_another_thread_between_its_launches(monkeypatch):
    """A layer's split backward writes its dx coefficients to scratch in one launch and reads them
    in the next; another host thread's backward running between the two (its own layer, its own
    coefficients) must not clobber them (ops.scratch keeps a buffer per thread)."""
    import threading

    from triton_bn import ops, tuning

    torch.manual_seed(2)
    main, other = (_pair(BatchNorm2d, nn.BatchNorm2d, 6) for _ in range(2))
    x, dy = torch.randn(4, 6, 5, 3) * 2 + 1, torch.randn(4, 6, 5, 3)
    x2, dy2 = torch.randn(4, 6, 5, 3) - 3, torch.randn(4, 6, 5, 3) * 5
    launch, fired = ops.launch, []

    def launch_then_other_thread(kernel, *args, **kwargs):
        launch(kernel, *args, **kwargs)
        if kernel is ops.bn_backward_reduce_kernel and threading.current_thread() is \
                threading.main_thread() and not fired:
            fired.append(1)
            t = threading.Thread(target=lambda: _step(other[0], x2, dy2))
            t.start()
            t.join()

    with tuning.override(force_fused=False, parts=3):
        for m in (main[0], other[0]):  # plan both layers (first and second calls)
            for _ in range(2):
                _step(m, x, dy)
        monkeypatch.setattr(ops, "launch", launch_then_other_thread)
        y, dx = _step(main[0], x, dy)
    assert fired
    for _ in range(3):
        y_ref, dx_ref = _step(main[1], x, dy)
    assert_close(y, y_ref, **F32)
    assert_close(dx, dx_ref, **F32)
