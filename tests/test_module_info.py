"""A ModuleInfo-style check of every drop-in class against torch's module on the same inputs, in
the spirit of PyTorch's test/test_modules.py for BatchNorm1d/2d/3d (and SyncBatchNorm in one
process): forward, grad, gradgrad, errors, memory format, pickle/deepcopy, repr and state_dict.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import triton_bn

F32 = dict(atol=2e-5, rtol=2e-5)
C = 3
CL = torch.channels_last
CL3 = torch.channels_last_3d

CLASSES = {  # name -> (ours, torch's, input shapes it accepts, a wrong-rank shape, memory format)
    "BatchNorm1d": (triton_bn.BatchNorm1d, nn.BatchNorm1d, [(4, C), (3, C, 5)], (2, C, 2, 2),
                    None),
    "BatchNorm2d": (triton_bn.BatchNorm2d, nn.BatchNorm2d, [(2, C, 3, 2)], (2, C, 4), CL),
    "BatchNorm3d": (triton_bn.BatchNorm3d, nn.BatchNorm3d, [(2, C, 2, 2, 3)], (2, C, 2, 2),
                    CL3),
    "SyncBatchNorm": (triton_bn.SyncBatchNorm, nn.SyncBatchNorm, [(4, C), (2, C, 3, 2)], (C,),
                      CL),
}

CONSTRUCTORS = {  # torch's sample constructor arguments for batch norm
    "default": {},
    "eps-momentum": dict(eps=1e-3, momentum=0.3),
    "cumulative": dict(momentum=None),
    "no-affine": dict(affine=False),
    "no-running-stats": dict(track_running_stats=False),
    "no-affine-no-stats": dict(affine=False, track_running_stats=False),
}


def _pair(name, **kwargs):
    ours_cls, torch_cls = CLASSES[name][:2]
    theirs = torch_cls(C, **kwargs)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
        if theirs.running_mean is not None:
            theirs.running_mean.normal_()
            theirs.running_var.uniform_(0.5, 2.0)
    ours = ours_cls(C, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _run(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return y, x.grad, grads


@pytest.mark.parametrize("ctor", list(CONSTRUCTORS))
@pytest.mark.parametrize("name", list(CLASSES))
def test_forward_and_grad(name, ctor):
    ours, theirs = _pair(name, **CONSTRUCTORS[ctor])
    for shape in CLASSES[name][2]:
        for training in (True, False, True):
            ours.train(training)
            theirs.train(training)
            x = torch.randn(shape) * 2 + 1
            dy = torch.randn(shape)
            got, want = _run(ours, x, dy), _run(theirs, x, dy)
            torch.testing.assert_close(got[0], want[0], **F32)
            torch.testing.assert_close(got[1], want[1], **F32)
            for a, e in zip(got[2], want[2]):
                torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
            for (key, a), e in zip(ours.state_dict().items(), theirs.state_dict().values()):
                torch.testing.assert_close(a, e, **F32, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", list(CLASSES))
def test_empty_batch(name):
    ours, theirs = _pair(name)
    shape = (0,) + CLASSES[name][2][-1][1:]
    x = torch.randn(shape, requires_grad=True)
    y = ours(x)
    assert y.shape == theirs(x).shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", list(CLASSES))
def test_gradgrad(name, training):
    """gradgradcheck in float64 over input, weight and bias (tiny shapes)."""
    ours = CLASSES[name][0](C, dtype=torch.float64, track_running_stats=not training)
    ours.train(training)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        if ours.running_mean is not None:
            ours.running_var.uniform_(0.5, 2.0)
    shape = CLASSES[name][2][0]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = ours.weight.detach().clone().requires_grad_()
    b = ours.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("name", list(CLASSES))
def test_wrong_rank_error_is_torchs(name):
    ours, theirs = _pair(name)
    x = torch.randn(CLASSES[name][3])
    with pytest.raises(ValueError) as want:
        theirs(x)
    with pytest.raises(ValueError) as got:
        ours(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("name", list(CLASSES))
def test_wrong_channel_count_is_a_runtime_error_like_torchs(name):
    ours, theirs = _pair(name)
    shape = list(CLASSES[name][2][-1])
    shape[1] = C + 1
    x = torch.randn(shape)
    with pytest.raises(RuntimeError, match="should contain"):
        theirs(x)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        ours(x)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", [n for n in CLASSES if CLASSES[n][4] is not None])
def test_memory_format(name):
    """channels_last in: channels_last out, with torch's values and strides (forward and dx)."""
    ours, theirs = _pair(name)
    fmt = CLASSES[name][4]
    shape = CLASSES[name][2][-1]
    x = (torch.randn(shape) * 2).to(memory_format=fmt)
    dy = torch.randn(shape).to(memory_format=fmt)
    got, want = _run(ours, x, dy), _run(theirs, x, dy)
    assert got[0].is_contiguous(memory_format=fmt)
    assert got[0].stride() == want[0].stride() and got[1].stride() == want[1].stride()
    torch.testing.assert_close(got[0], want[0], **F32)
    torch.testing.assert_close(got[1], want[1], **F32)


@pytest.mark.parametrize("name", list(CLASSES))
def test_pickle_and_deepcopy(name):
    ours, _ = _pair(name, momentum=None)
    x = torch.randn(CLASSES[name][2][0])
    ours(x)  # some state
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    clones = [pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours),
              torch.load(buffer, weights_only=False)]
    expected = copy.deepcopy(ours)(x)
    for clone in clones:
        assert type(clone) is type(ours) and repr(clone) == repr(ours)
        for a, e in zip(clone.state_dict().values(), ours.state_dict().values()):
            assert torch.equal(a, e)
        torch.testing.assert_close(clone(x), expected)


@pytest.mark.parametrize("ctor", list(CONSTRUCTORS))
@pytest.mark.parametrize("name", list(CLASSES))
def test_repr_matches_torch(name, ctor):
    ours, theirs = _pair(name, **CONSTRUCTORS[ctor])
    assert repr(ours) == repr(theirs)
    extra = CLASSES[name][0](C, renorm=True, activation="relu")
    assert repr(extra).endswith("renorm=True, rmax=3.0, dmax=5.0, activation='relu')")


@pytest.mark.parametrize("name", list(CLASSES))
def test_state_dict_round_trip_with_torch(name):
    ours, theirs = _pair(name, momentum=None)
    x = torch.randn(CLASSES[name][2][0])
    ours(x)
    fresh_torch = CLASSES[name][1](C)
    fresh_torch.load_state_dict(ours.state_dict())  # strict: same keys and shapes
    back = CLASSES[name][0](C)
    back.load_state_dict(fresh_torch.state_dict())
    for a, e in zip(back.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, e)
    # an old checkpoint without num_batches_tracked loads as in torch (version < 2)
    sd = theirs.state_dict()
    sd.pop("num_batches_tracked")
    sd._metadata = {"": {"version": 1}}
    before = ours.num_batches_tracked.clone()
    ours.load_state_dict(sd)  # torch's rule: the module keeps its own counter
    assert torch.equal(ours.num_batches_tracked, before)
    assert torch.equal(ours.running_mean, theirs.running_mean)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ours.load_state_dict(CLASSES[name][1](C + 1).state_dict())
