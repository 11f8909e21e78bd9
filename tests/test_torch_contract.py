"""PyTorch's contract beyond the first derivative, run side by side with torch on the same inputs:
double backward (create_graph=True), forward-mode AD, vmap and batched gradients, torch's input
checks (exception types and conditions), FX tracing, fuse_modules and TorchScript's refusal.

float64 gradchecks use tiny shapes and fast_mode: every evaluation runs the kernels interpreted.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad, gradcheck, gradgradcheck
from torch.func import jacfwd, jacrev, jvp, vmap

import triton_bn
from triton_bn import BatchNorm1d, BatchNorm2d, Renorm, RunningStats, batch_norm, normalize
from triton_bn.reference import reference_batch_norm

F64 = torch.float64
C = 3
GC = functools.partial(gradcheck, fast_mode=True)
GGC = functools.partial(gradgradcheck, fast_mode=True)


def leaf(*shape, low=None):
    t = torch.randn(*shape, dtype=F64) if low is None else torch.rand(*shape, dtype=F64) + low
    return t.requires_grad_()


# ---------------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck_batch_norm(training):
    x, w, b = leaf(4, C, 2), leaf(C, low=0.5), leaf(C)
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5

    def f(x, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    assert GGC(f, (x, w, b))


@pytest.mark.parametrize("case", ["residual-relu", "ghost-groups", "torch-renorm", "adjustment",
                                  "axis-last-2", "no-affine"])
def test_gradgradcheck_normalize(case):
    """Every feature of normalize in the differentiable backward; r, d and the adjustment are
    constants there as in the kernels (the float64 reference treats them the same way)."""
    x, w, b = leaf(4, C, 2), leaf(C, low=0.5), leaf(C)
    z = leaf(4, C, 2)
    rm, rv = torch.randn(C, dtype=F64) * 0.1, torch.rand(C, dtype=F64) + 0.5
    kw, inputs = {}, [x, w, b]
    if case == "residual-relu":
        kw = {"activation": "relu"}
        inputs.append(z)
    elif case == "ghost-groups":
        kw = {"groups": 2}
    elif case == "torch-renorm":  # r and d clipped (so constant, as backward treats them)
        kw = {"renorm": Renorm("torch", rmin=0.9, rmax=1.1, dmax=0.2)}
        rm, rv = rm + 10.0, rv + 100.0
    elif case == "adjustment":
        kw = {"adjustment": (torch.rand(C, dtype=F64) + 0.5, torch.randn(C, dtype=F64))}
    elif case == "axis-last-2":
        x = leaf(3, 2, 2, C)
        inputs = [x, leaf(2 * C, low=0.5), leaf(2 * C)]
        kw = {"axis": [2, 3]}
        rm, rv = torch.zeros(2 * C, dtype=F64), torch.ones(2 * C, dtype=F64)
    elif case == "no-affine":
        inputs = [x]

    def f(x, w=None, b=None, z=None):
        running = RunningStats(rm.clone(), rv.clone())
        return normalize(x, w, b, training=True, running=running, residual=z, **kw)

    assert GGC(f, tuple(inputs))


def _every_feature():
    """normalize with ghost batches, torch-style renorm, adjustment, residual and ReLU, and the
    float64 reference of the same call: (ours, ref), each f(x, w, b, z) -> y."""
    adj = (torch.rand(C, dtype=F64) + 0.5, torch.randn(C, dtype=F64))
    rm, rv = torch.randn(C, dtype=F64) * 0.1, torch.rand(C, dtype=F64) + 0.5
    renorm = dict(style="torch", rmin=0.9, rmax=1.1, dmax=0.2)

    def ours(x, w, b, z):
        return normalize(x, w, b, running=RunningStats(rm.clone(), rv.clone()), groups=2,
                         renorm=Renorm(**renorm), adjustment=adj, residual=z, activation="relu")

    def ref(x, w, b, z):
        return reference_batch_norm(x, w, b, running_mean=rm, running_var=rv, groups=2,
                                    renorm=renorm, adjustment=adj, residual=z,
                                    activation="relu")[0]

    return ours, ref


def test_double_backward_matches_reference_with_every_feature():
    """Second derivatives of a penalty on dx, against the float64 reference's autograd."""
    x, w, b, z = leaf(4, C, 2), leaf(C, low=0.5), leaf(C), leaf(4, C, 2)
    ours, ref = _every_feature()

    grads = []
    for f in (ours, ref):
        y = f(x, w, b, z)
        dx, = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=F64)
                                   .reshape(y.shape)).sum(), x, create_graph=True)
        # dx depends on b and z only through the ReLU mask: zero (ours has no edge there)
        grads.append(torch.autograd.grad((dx ** 2).sum(), (x, w, b, z), allow_unused=True,
                                         materialize_grads=True))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-7)


def test_gradient_penalty_matches_torch_module():
    """WGAN-GP: the penalty on d(critic)/d(input) must change d(loss)/d(weight) exactly as with
    torch.nn.BatchNorm2d (it was silently dropped when backward ignored create_graph)."""
    results = []
    for cls in (nn.BatchNorm2d, BatchNorm2d):
        torch.manual_seed(0)
        critic = nn.Sequential(nn.Conv2d(2, C, 1), cls(C), nn.Flatten(), nn.Linear(C * 4, 1))
        x = torch.randn(6, 2, 2, 2, requires_grad=True)
        out = critic(x)
        dx, = torch.autograd.grad(out.sum(), x, create_graph=True)
        loss = out.mean() + 10.0 * ((dx.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss.backward()
        results.append([p.grad.clone() for p in critic.parameters()])
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", [BatchNorm1d, triton_bn.SyncBatchNorm])
def test_gradgradcheck_modules(cls):
    m = cls(C, dtype=F64)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    x = leaf(5, C)

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert GGC(f, (x, m.weight.detach().clone().requires_grad_(),
                   m.bias.detach().clone().requires_grad_()))


def test_gradgradcheck_keras_layer():
    # (no renorm: its moving statistics change r and d between gradcheck's evaluations)
    layer = triton_bn.BatchNormalization(axis=-1, virtual_batch_size=2, dtype=F64)
    x = leaf(4, 2, C)
    layer(x.detach(), training=True)  # build

    def f(x):
        return layer(x, training=True)

    assert GGC(f, (x,))


def test_double_backward_of_empty_input_is_zero():
    x, w = leaf(0, C, 2), leaf(C, low=0.5)
    y = batch_norm(x, None, None, w, None, training=True)
    dx, = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert dx.shape == x.shape


# ---------------------------------------------------------------------------------------------
# forward-mode AD, vmap and batched gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_jvp_matches_torch(training):
    x, w, b = torch.randn(4, C, 2, dtype=F64), torch.rand(C, dtype=F64) + 0.5, torch.randn(C, dtype=F64)
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    outs = [jvp(lambda x, w, b, fn=fn: fn(x, rm.clone(), rv.clone(), w, b, training=training),
                (x, w, b), tangents) for fn in (batch_norm, F.batch_norm)]
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)


def test_forward_ad_dual_tensors_match_torch():
    x, w = torch.randn(4, C, 2, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    tx = torch.randn_like(x)
    got = []
    for fn in (batch_norm, F.batch_norm):
        with forward_ad.dual_level():
            y = fn(forward_ad.make_dual(x, tx), None, None, w, None, training=True)
            got.append(forward_ad.unpack_dual(y).tangent)
    torch.testing.assert_close(got[0], got[1], atol=1e-10, rtol=1e-8)


def test_jvp_of_every_normalize_feature_matches_reference():
    """Tangents of x and the residual (the reference detaches parameters under torch.func; the
    parameter tangents are checked against F.batch_norm above)."""
    x, w, b, z = (torch.randn(4, C, 2, dtype=F64), torch.rand(C, dtype=F64) + 0.5,
                  torch.randn(C, dtype=F64), torch.randn(4, C, 2, dtype=F64))
    ours, ref = _every_feature()

    tx, tz = torch.randn_like(x), torch.randn_like(z)
    a, e = (jvp(lambda x, z, f=f: f(x, w, b, z), (x, z), (tx, tz))[1] for f in (ours, ref))
    torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-7)


def test_gradcheck_forward_ad_and_batched_grad():
    x, w, b = leaf(4, C, 2), leaf(C, low=0.5), leaf(C)

    def f(x, w, b):
        return batch_norm(x, None, None, w, b, training=True)

    assert GC(f, (x, w, b), check_batched_grad=True)
    assert GC(f, (x, w, b), check_forward_ad=True, check_backward_ad=False,
              check_undefined_grad=False, check_batched_forward_grad=True)


def test_jacobians_match_torch():
    x, w, b = torch.randn(3, C, 2, dtype=F64), torch.rand(C, dtype=F64) + 0.5, torch.randn(C, dtype=F64)
    for transform in (jacrev, jacfwd):
        ours = transform(lambda x, w: batch_norm(x, None, None, w, b, training=True),
                         argnums=(0, 1))(x, w)
        theirs = transform(lambda x, w: F.batch_norm(x, None, None, w, b, training=True),
                           argnums=(0, 1))(x, w)
        for a, e in zip(ours, theirs):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)


def test_is_grads_batched_matches_torch():
    x = leaf(4, C, 2)
    basis = torch.randn(5, 4, C, 2, dtype=F64)
    got = [torch.autograd.grad(fn(x, None, None, training=True), x, basis,
                               is_grads_batched=True)[0] for fn in (batch_norm, F.batch_norm)]
    torch.testing.assert_close(got[0], got[1], atol=1e-10, rtol=1e-8)


def test_vmap_slices_are_independent_batch_norms():
    xb = torch.randn(5, 4, C, 2) * 2 + 1
    w = torch.rand(C) + 0.5
    for training in (True, False):
        rm, rv = torch.randn(C), torch.rand(C) + 0.5
        stats = (None, None) if training else (rm, rv)
        got = [vmap(lambda x, fn=fn, s=stats, t=training: fn(x, *s, w, None, training=t))(xb)
               for fn in (batch_norm, F.batch_norm)]
        torch.testing.assert_close(got[0], got[1], atol=2e-5, rtol=2e-5)


def test_vmap_with_batched_running_stats_updates_each_slice_like_torch():
    xb = torch.randn(5, 4, C, 2) * 2 + 1
    state = {}
    for name, fn in (("ours", batch_norm), ("torch", F.batch_norm)):
        rm, rv = torch.zeros(5, C), torch.ones(5, C)
        y = vmap(lambda x, a, b, fn=fn: fn(x, a, b, training=True, momentum=0.3))(xb, rm, rv)
        state[name] = (y, rm, rv)
    for a, e in zip(state["ours"], state["torch"]):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)
    # batched along dim 1 (non-contiguous slices): each slice updated as its own batch norm
    rm, rv = torch.zeros(C, 5), torch.ones(C, 5)
    vmap(lambda x, a, b: batch_norm(x, a, b, training=True, momentum=0.3),
         in_dims=(0, 1, 1))(xb, rm, rv)
    torch.testing.assert_close(rm.T, state["torch"][1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rv.T, state["torch"][2], atol=2e-5, rtol=2e-5)


def test_vmap_unbatched_running_stats_in_training_fail_like_torch():
    xb = torch.randn(5, 4, C, 2)
    rm, rv = torch.zeros(C), torch.ones(C)
    for fn in (F.batch_norm, batch_norm):
        with pytest.raises(RuntimeError, match="were not batched"):
            vmap(lambda x, fn=fn: fn(x, rm, rv, training=True))(xb)
    assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C))


def test_vmap_over_weights_updates_unbatched_stats_once_like_torch():
    x, wb = torch.randn(4, C, 2), torch.rand(5, C) + 0.5
    got = []
    for fn in (batch_norm, F.batch_norm):
        rm, rv = torch.zeros(C), torch.ones(C)
        y = vmap(lambda w, fn=fn, a=rm, b=rv: fn(x, a, b, w, None, training=True))(wb)
        got.append((y, rm, rv))
    for a, e in zip(*got):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)


def test_vmap_of_module_via_functional_call():
    m = BatchNorm2d(C, track_running_stats=False)
    ref = nn.BatchNorm2d(C, track_running_stats=False)
    xb = torch.randn(3, 4, C, 2, 2)
    got = [vmap(lambda x, mod=mod: torch.func.functional_call(mod, dict(mod.named_parameters()),
                                                                  (x,)))(xb) for mod in (m, ref)]
    torch.testing.assert_close(got[0], got[1], atol=2e-5, rtol=2e-5)


def test_grad_transform_matches_torch():
    x = torch.randn(4, C, 2, dtype=F64)
    w = torch.rand(C, dtype=F64) + 0.5
    got = [torch.func.grad(lambda w, fn=fn: (fn(x, None, None, w, None, training=True) ** 3).sum())(w)
           for fn in (batch_norm, F.batch_norm)]
    torch.testing.assert_close(got[0], got[1], atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# torch's input checks: same exception type, same conditions, state unchanged
# ---------------------------------------------------------------------------------------------

def _x():
    return torch.randn(4, C, 2)


# name -> (args builder for F.batch_norm-style call: returns (args, kwargs))
BAD_CALLS = {
    "eps-zero-training": lambda s: ((_x(), s["rm"], s["rv"]), dict(training=True, eps=0.0)),
    "eps-negative-training": lambda s: ((_x(), s["rm"], s["rv"]), dict(training=True, eps=-1.0)),
    "eps-negative-eval": lambda s: ((_x(), s["rm"], s["rv"]), dict(training=False, eps=-1e-5)),
    "eps-string": lambda s: ((_x(), s["rm"], s["rv"]), dict(training=True, eps="a")),
    "momentum-none": lambda s: ((_x(), s["rm"], s["rv"]), dict(training=True, momentum=None)),
    "weight-size": lambda s: ((_x(), s["rm"], s["rv"], torch.ones(C + 1)), dict(training=True)),
    "weight-size-eval": lambda s: ((_x(), s["rm"], s["rv"], torch.ones(C + 1)),
                                   dict(training=False)),
    "bias-size": lambda s: ((_x(), s["rm"], s["rv"], None, torch.ones(C - 1)),
                            dict(training=True)),
    "running-mean-size": lambda s: ((_x(), torch.zeros(C + 2), s["rv"]), dict(training=True)),
    "running-var-size-eval": lambda s: ((_x(), s["rm"], torch.ones(2 * C)),
                                        dict(training=False)),
    "running-mean-2d": lambda s: ((_x(), torch.zeros(1, C), s["rv"]), dict(training=True)),
    "running-mean-int": lambda s: ((_x(), torch.zeros(C, dtype=torch.long), s["rv"]),
                                   dict(training=True)),
    "weight-int": lambda s: ((_x(), s["rm"], s["rv"], torch.ones(C, dtype=torch.long)),
                             dict(training=True)),
    "weight-half-input-float": lambda s: ((_x(), s["rm"], s["rv"], torch.ones(C).half()),
                                          dict(training=True)),
    "input-double-stats-float": lambda s: ((_x().double(), s["rm"], s["rv"]),
                                           dict(training=True)),
    "input-int": lambda s: ((torch.randint(0, 9, (4, C, 2)), s["rm"], s["rv"]),
                            dict(training=True)),
    "input-int-eval": lambda s: ((torch.randint(0, 9, (4, C, 2)), s["rm"], s["rv"]),
                                 dict(training=False)),
    "only-running-mean": lambda s: ((_x(), s["rm"], None), dict(training=True)),
    "only-running-mean-eval": lambda s: ((_x(), s["rm"], None), dict(training=False)),
    "eval-without-stats": lambda s: ((_x(), None, None), dict(training=False)),
    "rank-1": lambda s: ((torch.randn(C), s["rm"], s["rv"]), dict(training=False)),
    "rank-1-training": lambda s: ((torch.randn(6), s["rm"], s["rv"]), dict(training=True)),
    "rank-1-no-stats": lambda s: ((torch.randn(6), None, None), dict(training=True)),
    "rank-1-one-value": lambda s: ((torch.randn(1), None, None), dict(training=True)),
    "one-value-per-channel": lambda s: ((torch.randn(1, C), s["rm"], s["rv"]),
                                        dict(training=True)),
    "one-value-per-channel-4d": lambda s: ((torch.randn(1, C, 1, 1), s["rm"], s["rv"]),
                                           dict(training=True)),
    "one-value-zero-channels": lambda s: ((torch.randn(1, 0), torch.zeros(0), torch.ones(0)),
                                          dict(training=True)),
    "weight-other-device": lambda s: ((_x(), s["rm"], s["rv"], torch.ones(C, device="meta")),
                                      dict(training=True)),
}


@pytest.fixture
def state():
    s = {"rm": torch.randn(C), "rv": torch.rand(C) + 0.5}
    snapshot = {k: v.clone() for k, v in s.items()}
    yield s
    for k, v in s.items():
        assert torch.equal(v, snapshot[k]), f"{k} changed by a rejected call"


def _raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the test compares exception types
        return e
    return None


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_rejected_like_torch(name, state):
    """F.batch_norm and triton_bn.batch_norm on the same bad input: ours raises an instance of
    torch's exception type (it may also be a ValueError/TypeError: see ArgumentError) and changes
    no state."""
    args, kwargs = BAD_CALLS[name](state)
    copied = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    theirs = _raised(F.batch_norm, *copied, **kwargs)
    assert theirs is not None, "torch accepts this call: the case is wrong"
    ours = _raised(batch_norm, *args, **kwargs)
    assert ours is not None, f"torch raised {theirs!r}, triton_bn accepted the call"
    assert isinstance(ours, type(theirs)), f"torch: {theirs!r}; triton_bn: {ours!r}"


# torch's own tests match on these messages
@pytest.mark.parametrize("name,match", [
    ("eps-zero-training", "batch_norm eps must be positive during training, but got 0"),
    ("eps-negative-eval", "batch_norm eps must be non-negative, but got -1e-05"),
    ("weight-size", "weight should contain 3 elements not 4"),
    ("running-mean-size", "running_mean should contain 3 elements not 5"),
    ("one-value-per-channel", "Expected more than 1 value per channel when training"),
    ("only-running-mean", "running_mean and running_var must either both be None or neither"),
    ("eval-without-stats", "running_mean must be defined in evaluation mode"),
])
def test_messages_keep_torch_wording(name, match, state):
    args, kwargs = BAD_CALLS[name](state)
    with pytest.raises(Exception, match=match):
        F.batch_norm(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    with pytest.raises(Exception, match=match):
        batch_norm(*args, **kwargs)


ACCEPTED = {  # torch accepts these; so must triton_bn, with the same result and state
    "eps-zero-eval": (dict(training=False, eps=0.0), {}),
    "negative-momentum-eval": (dict(training=False, momentum=-1.0), {}),
    "negative-momentum-training": (dict(training=True, momentum=-0.5), {}),
    "momentum-above-one-training": (dict(training=True, momentum=1.5), {}),
    "int-eps": (dict(training=True, eps=1), {}),
    "weight-1xC": (dict(training=True), {"weight": (1, C)}),
    "non-contiguous-running-stats": (dict(training=True), {"strided": True}),
    "half-input-float-params": (dict(training=True), {"half": True}),
    "empty-batch-training": (dict(training=True), {"empty": True}),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_like_torch(name):
    kwargs, opts = ACCEPTED[name]
    x = torch.randn(4, C, 2) * 2 + 1
    if opts.get("half"):
        x = x.half()
    if opts.get("empty"):
        x = x[:0]
    w = torch.rand(*opts.get("weight", (C,))) + 0.5
    results = []
    for fn in (batch_norm, F.batch_norm):
        if opts.get("strided"):  # every other element of a longer buffer: updated in place
            rm_buf, rv_buf = torch.zeros(2 * C), torch.ones(2 * C)
            rm, rv = rm_buf[::2], rv_buf[::2]
        else:
            rm, rv = torch.zeros(C) + 0.1, torch.ones(C) * 1.5
        y = fn(x, rm, rv, w, None, **kwargs)
        results.append((y.float(), rm, rv) + ((rm_buf, rv_buf) if opts.get("strided") else ()))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=2e-3 if opts.get("half") else 2e-5, rtol=2e-3)


MODULE_BAD = {  # (module factory, input factory)
    "wrong-rank": (lambda: BatchNorm2d(C), lambda: torch.randn(2, C, 4)),
    "wrong-channels": (lambda: BatchNorm2d(C), lambda: torch.randn(2, C + 1, 2, 2)),
    "one-value-per-channel": (lambda: BatchNorm2d(C), lambda: torch.randn(1, C, 1, 1)),
    "eps-zero-training": (lambda: BatchNorm2d(C, eps=0.0), lambda: torch.randn(2, C, 2, 2)),
    "double-input-float-module": (lambda: BatchNorm1d(C), lambda: torch.randn(4, C).double()),
    "int-input": (lambda: BatchNorm1d(C), lambda: torch.randint(0, 5, (4, C))),
    "1d-rank-4": (lambda: BatchNorm1d(C), lambda: torch.randn(2, C, 2, 2)),
    "sync-rank-1": (lambda: triton_bn.SyncBatchNorm(C), lambda: torch.randn(C)),
    "sync-zero-channels": (lambda: triton_bn.SyncBatchNorm(0), lambda: torch.randn(4, 0)),
}


@pytest.mark.parametrize("name", list(MODULE_BAD))
def test_module_rejects_like_torch(name):
    make, make_x = MODULE_BAD[name]
    ours = make()
    theirs = getattr(nn, type(ours).__name__)(ours.num_features, eps=ours.eps)
    x = make_x()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    e_theirs = _raised(theirs, x)
    e_ours = _raised(ours, x)
    assert e_theirs is not None and e_ours is not None, (e_theirs, e_ours)
    assert isinstance(e_ours, type(e_theirs)), f"torch: {e_theirs!r}; triton_bn: {e_ours!r}"
    if isinstance(e_theirs, ValueError) and "expected" in str(e_theirs):
        assert str(e_ours) == str(e_theirs)  # torch's own _check_input_dim message
    for k, v in ours.state_dict().items():  # torch bumps num_batches_tracked first; ours does not
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("training", [True, False])
def test_module_ignores_negative_momentum_in_eval_and_uses_it_in_training(training):
    ours, theirs = BatchNorm2d(C, momentum=-0.5), nn.BatchNorm2d(C, momentum=-0.5)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(2, C, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)
    for a, e in zip(ours.buffers(), theirs.buffers()):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)


def test_module_updates_non_contiguous_running_stats_in_place():
    ours, theirs = BatchNorm2d(C), nn.BatchNorm2d(C)
    for m in (ours, theirs):
        m.running_mean = torch.zeros(2 * C)[::2]
    x = torch.randn(2, C, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-5, rtol=2e-5)
    assert not ours.running_mean.is_contiguous()
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=2e-5, rtol=2e-5)


def test_normalize_keeps_its_own_rules():
    """normalize (the Keras-facing API) still rejects momentum outside [0, 1] in training and
    accepts eps = 0 (Keras uses epsilon as given); its shape errors are ValueErrors."""
    x = torch.randn(4, C, 2)
    with pytest.raises(ValueError, match="momentum"):
        normalize(x, running=RunningStats(torch.zeros(C), torch.ones(C), momentum=1.5))
    normalize(x, running=RunningStats(torch.zeros(C), torch.ones(C), momentum=1.5),
              training=False)
    normalize(x * 3, eps=0.0)
    with pytest.raises(ValueError, match="should contain 3 elements not 4"):
        normalize(x, torch.ones(C + 1))


# ---------------------------------------------------------------------------------------------
# FX, fuse_modules, TorchScript
# ---------------------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self, bn2d=BatchNorm2d, bn1d=BatchNorm1d):
        super().__init__()
        self.conv = nn.Conv2d(2, C, 1)
        self.bn = bn2d(C)
        self.head = nn.Linear(C * 4, 4)
        self.bn1 = bn1d(4)

    def forward(self, x):
        return self.bn1(self.head(torch.relu(self.bn(self.conv(x))).flatten(1)))


@pytest.mark.parametrize("training", [True, False])
def test_fx_symbolic_trace_matches_module(training):
    net = Net().train(training)
    traced = torch.fx.symbolic_trace(net)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"
             and getattr(n.target, "__name__", "") == "module_batch_norm"]
    assert len(calls) == 2  # each batch norm is one node
    ref = copy.deepcopy(net)
    x = torch.randn(4, 2, 2, 2)
    torch.testing.assert_close(traced(x), ref(x), atol=1e-6, rtol=1e-6)
    for a, e in zip(traced.buffers(), ref.buffers()):  # state updated through the graph
        torch.testing.assert_close(a, e)


def test_fx_feature_extraction_style_rewrite():
    """An FX rewrite (what torchvision's feature extraction does): return an intermediate."""
    net = Net().eval()
    traced = torch.fx.symbolic_trace(net)
    bn_node = next(n for n in traced.graph.nodes if n.op == "call_function"
                   and getattr(n.target, "__name__", "") == "module_batch_norm")
    out = next(n for n in traced.graph.nodes if n.op == "output")
    out.args = ((out.args[0], bn_node),)
    traced.recompile()
    x = torch.randn(4, 2, 2, 2)
    _, feat = traced(x)
    torch.testing.assert_close(feat, net.bn(net.conv(x)))


def test_fuse_modules_on_converted_model_matches_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1),
                          nn.BatchNorm2d(C), nn.Flatten(), nn.Linear(C * 4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    model.eval()
    groups = [["0", "1", "2"], ["3", "4"], ["6", "7"]]
    theirs = torch.ao.quantization.fuse_modules(copy.deepcopy(model), groups)
    ours = torch.ao.quantization.fuse_modules(triton_bn.convert_model(copy.deepcopy(model)), groups)
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))


def test_fuse_modules_keeps_fused_relu():
    conv, bn = nn.Conv2d(2, C, 1), BatchNorm2d(C, activation="relu")
    with torch.no_grad():
        bn.running_mean.normal_()
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 2, 3, 3)
    expected = model(x)
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1"]])
    assert isinstance(fused[0], torch.ao.nn.intrinsic.ConvReLU2d)
    torch.testing.assert_close(fused(x), expected, atol=1e-6, rtol=1e-6)
    # the explicit mapping (for a torch without the private default table) works as well
    cfg = {"additional_fuser_method_mapping": triton_bn.convert.fuser_method_mapping()}
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1"]],
                                               fuse_custom_config_dict=cfg)
    torch.testing.assert_close(fused(x), expected, atol=1e-6, rtol=1e-6)


def test_torchscript_refuses_clearly():
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile triton_bn.BatchNorm2d"):
        torch.jit.script(nn.Sequential(nn.Conv2d(2, C, 1), BatchNorm2d(C)))


class _OneProcessSync:
    """The sync hook protocol of distributed.ProcessGroupSync for a single process (P = 1)."""

    def exchange(self, x, axes, groups):
        mean, m2, count = triton_bn.ops.local_moments(x, axes, groups)
        return mean[None], m2[None], torch.full((1,), float(count), dtype=mean.dtype)

    def all_reduce(self, t):
        pass


def test_synchronized_double_backward_and_transforms_fail_clearly():
    x, w = leaf(4, C, 2), leaf(C, low=0.5)
    sync = _OneProcessSync()
    y = normalize(x, w, sync=sync)
    dx, = torch.autograd.grad(y.sum() + (y ** 2).sum(), x)  # the ordinary backward works
    torch.testing.assert_close(dx, torch.autograd.grad(
        (lambda y: y.sum() + (y ** 2).sum())(F.batch_norm(x, None, None, w, training=True)),
        x)[0])
    y = normalize(x, w, sync=sync)
    with pytest.raises(RuntimeError, match="double backward .* synchronized"):
        torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="torch.func transforms .* synchronized"):
        vmap(lambda x: normalize(x, w, sync=sync))(x[None])


def test_keras_layer_jvp_and_vmap_match_torch():
    """The Keras layer (axis=-1, epsilon 1e-3) under torch.func.jvp and vmap, against
    F.batch_norm on the channels-first view of the same data."""
    layer = triton_bn.BatchNormalization(axis=-1, dtype=F64)
    x = torch.randn(4, 2, C, dtype=F64)
    layer(x, training=True)  # build

    def ref(x):
        return F.batch_norm(x.movedim(-1, 1), None, None, training=True, eps=1e-3).movedim(1, -1)

    tx = torch.randn_like(x)
    got, want = jvp(lambda x: layer(x, training=True), (x,), (tx,)), jvp(ref, (x,), (tx,))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)
    layer.eval()
    xb = torch.randn(3, 4, 2, C, dtype=F64)
    ys = vmap(lambda x: layer(x, training=False))(xb)
    torch.testing.assert_close(ys, torch.stack([layer(x, training=False) for x in xb]))


def test_func_grad_of_module_in_training_updates_buffers_like_torch():
    """Meta-learning style: torch.func.grad over a module's parameters via functional_call,
    in training (running statistics updated as a side effect, as torch's)."""
    ours, theirs = BatchNorm2d(C, dtype=F64), nn.BatchNorm2d(C, dtype=F64)
    x = torch.randn(4, C, 2, 2, dtype=F64)
    results = []
    for m in (ours, theirs):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = dict(m.named_buffers())  # passed in: torch.func forbids mutating captures

        def loss(p, b, m=m):
            return (torch.func.functional_call(m, (p, b), (x,)) ** 3).sum()

        g = torch.func.grad(loss)(params, buffers)
        results.append([g["weight"], g["bias"], m.running_mean.clone(), m.running_var.clone(),
                        m.num_batches_tracked.clone()])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("groups", [1, 2])
def test_vmap_of_normalize_matches_a_loop_of_calls(groups, monkeypatch):
    """Residual + ReLU, batched weights and running statistics: vmap against calling normalize
    slice by slice. Without ghost batches the slices run as one folded call."""
    import triton_bn.functional as fn

    folded = []
    real = fn._vmap_folded
    monkeypatch.setattr(fn, "_vmap_folded", lambda *a: folded.append(real(*a)) or folded[-1])
    B = 3
    xb, zb = torch.randn(B, 4, C, 2) * 2 + 1, torch.randn(B, 4, C, 2)
    wb, b = torch.rand(B, C) + 0.5, torch.randn(C)
    rm, rv = torch.randn(B, C), torch.rand(B, C) + 0.5
    rm_loop, rv_loop = rm.clone(), rv.clone()

    def f(x, w, z, m, v):
        return normalize(x, w, b, running=RunningStats(m, v), residual=z, activation="relu",
                         groups=groups)

    y = vmap(f)(xb, wb, zb, rm, rv)
    assert (folded[0] is not None) == (groups == 1)
    expected = torch.stack([f(xb[i], wb[i], zb[i], rm_loop[i], rv_loop[i]) for i in range(B)])
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rm, rm_loop, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(rv, rv_loop, atol=2e-6, rtol=2e-6)


def test_per_sample_gradients_and_grad_of_vmap_match_torch():
    """vmap(grad(...)) (per-model gradients, ensembles) and grad(vmap(...)), against torch."""
    xb = torch.randn(3, 4, C, 2, dtype=F64)
    w = torch.rand(C, dtype=F64) + 0.5
    got = []
    for fn in (batch_norm, F.batch_norm):
        def loss(w, x, fn=fn):
            return (fn(x, None, None, w, None, training=True) ** 3).sum()

        per_slice = vmap(torch.func.grad(loss), in_dims=(None, 0))(w, xb)
        whole = torch.func.grad(lambda w, fn=fn: vmap(lambda x: fn(x, None, None, w, None,
                                                                 training=True) ** 3)(xb).sum())(w)
        got.append((per_slice, whole))
    for a, e in zip(*got):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)
