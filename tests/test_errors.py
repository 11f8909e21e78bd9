"""Argument checking: every bad call raises a clear TypeError/ValueError naming the argument, before
anything runs, so that the running statistics (and all other state) are bitwise unchanged."""

import pytest
import torch
import torch.nn.functional as F

from triton_bn import Renorm, RunningStats, batch_norm, normalize

C = 3


@pytest.fixture
def state():
    """Fresh state tensors; the test checks that they survive a rejected call untouched."""
    s = {"rm": torch.randn(C), "rv": torch.rand(C) + 0.5, "nbt": torch.tensor(5),
             "mstd": torch.rand(C) + 0.5, "rmean": torch.randn(C), "rstd": torch.rand(C) + 0.5}
    snapshot = {k: v.clone() for k, v in s.items()}
    yield s
    for k, v in s.items():
        assert torch.equal(v, snapshot[k]), f"{k} changed by a rejected call"


def x4():
    return torch.randn(4, C, 2, 3)


def W():
    return torch.rand(C) + 0.5


def stats(s, **kw):
    return RunningStats(s["rm"], s["rv"], num_batches_tracked=s["nbt"],
                        moving_stddev=s.get("mstd_used"), **kw)


META = torch.device("meta")

# name -> (call(state), exception, match)
CASES = {
    "integer-input": (lambda s: batch_norm(torch.randint(0, 9, (4, C, 2)), s["rm"], s["rv"],
                                           training=True), TypeError, "input"),
    "not-a-tensor": (lambda s: normalize([[1.0, 2.0], [3.0, 4.0]]), TypeError, "input"),
    "rank-1-axis0": (lambda s: batch_norm(torch.randn(C), s["rm"], s["rv"], training=False,
                                          axis=0), ValueError, "rank"),
    # in training the one-value-per-channel rule may fire first: either reason is a clear one
    "rank-1-axis0-training": (lambda s: batch_norm(torch.randn(C), s["rm"], s["rv"],
                                                   training=True, axis=0), ValueError,
                              "rank|more than 1 value per channel"),
    "rank-1-normalize": (lambda s: normalize(torch.randn(C), axis=0, running=stats(s)),
                         ValueError, "rank"),
    "rank-1-default-axis": (lambda s: batch_norm(torch.randn(6), s["rm"], s["rv"],
                                                 training=True), ValueError, "rank"),
    "weight-shape": (lambda s: batch_norm(x4(), s["rm"], s["rv"], torch.ones(C + 1),
                                          training=True), ValueError, "weight"),
    # (a weight of shape (1, C) is accepted, as torch accepts it: test_torch_contract.py)
    "weight-2d-wrong-size": (lambda s: batch_norm(x4(), s["rm"], s["rv"], torch.ones(2, C),
                                                  training=True), ValueError, "weight"),
    "bias-shape": (lambda s: batch_norm(x4(), s["rm"], s["rv"], W(), torch.zeros(C - 1),
                                        training=True), ValueError, "bias"),
    "running-mean-shape": (lambda s: batch_norm(x4(), torch.zeros(C + 2), s["rv"],
                                                training=True), ValueError, "running_mean"),
    "running-var-shape": (lambda s: batch_norm(x4(), s["rm"], torch.ones(2 * C),
                                               training=True), ValueError, "running_var"),
    "running-mean-int": (lambda s: batch_norm(x4(), torch.zeros(C, dtype=torch.long), s["rv"],
                                              training=True), TypeError, "running_mean"),
    "running-var-int": (lambda s: batch_norm(x4(), s["rm"], torch.ones(C, dtype=torch.int32),
                                             training=True), TypeError, "running_var"),
    "weight-int": (lambda s: batch_norm(x4(), s["rm"], s["rv"], torch.ones(C, dtype=torch.long),
                                        training=True), TypeError, "weight"),
    "only-running-mean": (lambda s: batch_norm(x4(), s["rm"], None, training=True), ValueError,
                          "running_var"),
    "eval-without-stats": (lambda s: batch_norm(x4(), None, None, training=False), ValueError,
                           "running_mean"),
    "weight-other-device": (lambda s: batch_norm(x4(), s["rm"], s["rv"],
                                                 torch.ones(C, device=META), training=True),
                            ValueError, "weight"),
    "bias-other-device": (lambda s: batch_norm(x4(), s["rm"], s["rv"], W(),
                                               torch.zeros(C, device=META), training=True),
                          ValueError, "bias"),
    "running-var-other-device": (lambda s: batch_norm(x4(), s["rm"], torch.ones(C, device=META),
                                                      training=True), ValueError, "running_var"),
    "residual-other-device": (lambda s: normalize(x4(), running=stats(s),
                                                  residual=torch.zeros(4, C, 2, 3, device=META)),
                              ValueError, "residual"),
    "residual-shape": (lambda s: normalize(x4(), running=stats(s), residual=torch.zeros(4, C, 3, 2)),
                       ValueError, "residual"),
    "axis-out-of-range": (lambda s: batch_norm(x4(), s["rm"], s["rv"], training=True, axis=4),
                          ValueError, "axis"),
    "axis-negative-out-of-range": (lambda s: normalize(x4(), running=stats(s), axis=-5),
                                   ValueError, "axis"),
    "duplicate-axes": (lambda s: normalize(torch.randn(4, C, 2, C), running=stats(s),
                                           axis=[1, 1]), ValueError, "axis"),
    "duplicate-axes-negative": (lambda s: normalize(x4(), axis=[1, -3]), ValueError, "axis"),
    "axis-bool": (lambda s: normalize(x4(), running=stats(s), axis=True), TypeError, "axis"),
    "axis-empty": (lambda s: normalize(x4(), running=stats(s), axis=[]), TypeError, "axis"),
    "one-value-per-channel": (lambda s: batch_norm(torch.randn(1, C), s["rm"], s["rv"],
                                                   training=True), ValueError,
                              "more than 1 value per channel"),
    "one-value-per-channel-4d": (lambda s: batch_norm(torch.randn(1, C, 1, 1), s["rm"], s["rv"],
                                                      training=True), ValueError,
                                 "more than 1 value per channel"),
    "rmin-above-rmax": (lambda s: normalize(x4(), running=stats(s),
                                            renorm=Renorm("torch", rmin=1.5, rmax=1.2)),
                        ValueError, "rmin"),
    "renorm-style": (lambda s: normalize(x4(), running=stats(s), renorm=Renorm("tf")),
                     ValueError, "style"),
    "keras-renorm-missing-state": (lambda s: normalize(x4(), running=stats(s),
                                                       renorm=Renorm("keras", mean=s["rmean"])),
                                   ValueError, "renorm_stddev"),
    "renorm-mean-shape": (
        lambda s: normalize(x4(), running=RunningStats(s["rm"], s["rv"], moving_stddev=s["mstd"]),
                            renorm=Renorm("keras", mean=torch.zeros(C + 1), stddev=s["rstd"])),
        ValueError, "renorm_mean"),
    "moving-stddev-shape": (
        lambda s: normalize(x4(), running=RunningStats(s["rm"], s["rv"],
                                                       moving_stddev=torch.ones(1)),
                            renorm=Renorm("keras", mean=s["rmean"], stddev=s["rstd"])),
        ValueError, "moving_stddev"),
    "activation": (lambda s: normalize(x4(), running=stats(s), activation="gelu"), ValueError,
                   "activation"),
    "groups-not-dividing-batch": (lambda s: normalize(torch.randn(6, C, 2), running=stats(s),
                                                      groups=4), ValueError, "groups"),
    "groups-zero": (lambda s: normalize(x4(), running=stats(s), groups=0), ValueError, "groups"),
    "groups-on-batch-axis": (lambda s: normalize(torch.randn(4, 4, 2), axis=0, groups=2),
                             ValueError, "batch axis"),
    "adjustment-shape": (lambda s: normalize(x4(), running=stats(s),
                                             adjustment=(torch.ones(C), torch.zeros(C + 1))),
                         ValueError, "adjustment"),
    "momentum-range": (lambda s: normalize(x4(), running=stats(s, momentum=1.5)), ValueError,
                       "momentum"),
    "cumulative-without-counter": (
        lambda s: normalize(x4(), running=RunningStats(s["rm"], s["rv"], momentum=None)),
        ValueError, "num_batches_tracked"),
    "cumulative-keras": (lambda s: normalize(x4(), running=stats(s, momentum=None,
                                                                 convention="keras")),
                         ValueError, "momentum=None"),
    "convention": (lambda s: normalize(x4(), running=stats(s, convention="tf")), ValueError,
                   "convention"),
    "eps-negative": (lambda s: normalize(x4(), running=stats(s), eps=-1e-5), ValueError, "eps"),
    # (non-contiguous running statistics are updated in place, as torch does)
}


@pytest.mark.parametrize("name", list(CASES))
def test_rejected_calls_raise_and_leave_state(name, state):
    call, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        call(state)
    # (the fixture then checks every state tensor bitwise)


def test_one_value_per_channel_like_torch(state):
    """batch_norm refuses one value per channel in training exactly like torch does."""
    x = torch.randn(1, C)
    with pytest.raises(ValueError, match="more than 1 value per channel") as ours:
        batch_norm(x, state["rm"], state["rv"], training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel") as theirs:
        F.batch_norm(x, state["rm"].clone(), state["rv"].clone(), training=True)
    assert type(ours.value) is type(theirs.value)
    # eval mode is fine with a single sample
    y = batch_norm(x, state["rm"], state["rv"], training=False)
    torch.testing.assert_close(y, F.batch_norm(x, state["rm"], state["rv"], training=False))


def test_meta_device_input_rejected_against_cpu_state(state):
    """The input itself on another device than the running statistics."""
    x = torch.randn(4, C, 2, device=META)
    with pytest.raises(ValueError, match="running_mean"):
        batch_norm(x, state["rm"], state["rv"], training=True)


def test_error_before_a_valid_call_leaves_later_call_correct(state):
    """A rejected call must not leave a half-updated plan or state behind."""
    x = x4()
    with pytest.raises(ValueError):
        batch_norm(x, state["rm"], state["rv"], torch.ones(C + 1), training=True)
    rm, rv = state["rm"].clone(), state["rv"].clone()
    batch_norm(x, rm, rv, training=True)
    rmt, rvt = state["rm"].clone(), state["rv"].clone()
    F.batch_norm(x, rmt, rvt, training=True)
    torch.testing.assert_close(rm, rmt)
    torch.testing.assert_close(rv, rvt)
