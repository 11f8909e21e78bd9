"""triton_bn.keras.BatchNormalization against golden data from the real tf_keras 2.21.

Each case in tests/golden/data/*.npz (see tests/golden/README.md): build the layer from the
constructor kwargs, set_weights(init_*), 3 training calls (y, dx, dgamma, dbeta and every weight
after each), one inference call. No TensorFlow needed: the tests read only the npz/json files.
"""

import json
import pathlib
import re
import warnings

import numpy as np
import pytest
import torch

from triton_bn.keras import BatchNormalization
from triton_bn.reference import reference_batch_norm

DATA = pathlib.Path(__file__).parent / "golden" / "data"
CASES = sorted(p.stem for p in DATA.glob("*.npz"))
EXPECTED_CASES = {
    "default", "nchw_axis1", "fused_false", "multi_axis", "rank2", "rank3", "rank5", "rank5_axis1",
    "no_center_scale", "no_scale", "renorm", "renorm_clip", "ghost", "ghost_axis1", "ghost_renorm",
    "adjustment", "trainable_false", "float16", "tiny_epsilon", "tiny_epsilon_fused",
    "ill_conditioned", "momentum_variants",
}

# Error bound relative to the tensor's largest value (and per element). float32: ~1e-5.
# float16: a half-precision ulp. ill_conditioned (x = 1000 + 0.01 N): Keras's own float32 output
# is only good to ~3e-3 (its dgamma to ~1e-2) against float64, see test_more_accurate_than_keras.
# tiny_epsilon_fused (batch variance ~1e-6 around a mean of 0.3): Keras's fused-kernel variance
# carries ~1e-5 relative error. The state variables (float32, diluted by the momentum) are
# always held to DEFAULT_TOL.
TOL = {"float16": 2e-3, "ill_conditioned": 3e-2, "tiny_epsilon_fused": 1e-4}
DEFAULT_TOL = 1e-5


def load(case):
    return np.load(DATA / f"{case}.npz", allow_pickle=False)


def make_layer(data):
    kwargs = json.loads(str(data["config_json"]))
    if kwargs.pop("adjustment", False):
        a_scale, a_bias = torch.from_numpy(data["adj_scale"]), torch.from_numpy(data["adj_bias"])
        kwargs["adjustment"] = lambda shape: (a_scale, a_bias)
    layer = BatchNormalization(**kwargs)
    layer.build(data["x_0"].shape)
    layer.set_weights([data[f"init_{n}"] for n in data["weight_names"]])
    return layer


def check(got, expected, tol, what):
    expected = torch.from_numpy(np.asarray(expected)).to(torch.float64)
    got = torch.as_tensor(got).detach().to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def test_every_golden_case_is_present():
    assert EXPECTED_CASES <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_golden_case(case):
    data = load(case)
    tol = TOL.get(case, DEFAULT_TOL)
    layer = make_layer(data)
    names = list(data["weight_names"])
    assert list(layer.state_dict()) == names  # Keras's weight names, in get_weights() order
    for name, w in zip(names, layer.get_weights()):
        assert w.shape == data[f"init_{name}"].shape and w.dtype == np.float32, name
        np.testing.assert_array_equal(w, data[f"init_{name}"])

    for step in range(int(data["n_steps"])):
        x = torch.from_numpy(data[f"x_{step}"]).requires_grad_()
        y = layer(x, training=True)
        assert y.dtype == x.dtype
        y.backward(torch.from_numpy(data[f"dy_{step}"]))
        check(y, data[f"y_{step}"], tol, f"y step {step}")
        check(x.grad, data[f"dx_{step}"], tol, f"dx step {step}")
        for p in ("gamma", "beta"):
            param = getattr(layer, p)
            if f"d{p}_{step}" in data:
                check(param.grad, data[f"d{p}_{step}"], tol, f"d{p} step {step}")
                param.grad = None
            else:  # absent (scale/center off) or frozen (trainable=False)
                assert param is None or param.grad is None
        for name, w in zip(names, layer.get_weights()):
            check(w, data[f"state_{step}_{name}"], DEFAULT_TOL, f"{name} after step {step}")

    x = torch.from_numpy(data["x_infer"]).requires_grad_()
    y = layer(x, training=False)
    y.backward(torch.from_numpy(data["dy_infer"]))
    check(y, data["y_infer"], tol, "inference y")
    check(x.grad, data["dx_infer"], tol, "inference dx")


@pytest.mark.parametrize("case", CASES)
def test_golden_config(case):
    """Same keys and values as tf_keras's get_config after build, except the layer name (Keras
    numbers its layers per session) and, with virtual_batch_size, the axis: tf_keras reports its
    internal axis shifted by one for the extra ghost dimension (so its own config does not load
    back); we report the input's axis."""
    data = load(case)
    keras_cfg = json.loads(str(data["keras_config_json"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adjustment case warns, as Keras does
        cfg = make_layer(data).get_config()
    assert set(cfg) == set(keras_cfg)
    if "virtual_batch_size" in keras_cfg:
        keras_cfg["axis"] = [a - 1 for a in keras_cfg["axis"]]
    for key in set(cfg) - {"name"}:
        assert cfg[key] == keras_cfg[key], key


@pytest.mark.parametrize("case", ["ill_conditioned", "tiny_epsilon_fused"])
def test_more_accurate_than_keras(case):
    """Where float32 Keras is inaccurate, our output is at least as close to float64 maths."""
    data = load(case)
    layer = make_layer(data)
    x = torch.from_numpy(data["x_0"])
    init = {n: torch.from_numpy(data[f"init_{n}"]) for n in data["weight_names"]}
    expected, _ = reference_batch_norm(
        x, init["gamma"], init["beta"], axis=-1, eps=layer.epsilon,
        running_mean=init["moving_mean"], running_var=init["moving_variance"],
        momentum=layer.momentum, convention="keras", unbiased=True)
    ours = layer(x, training=True).double()
    ours_err = (ours - expected).abs().max()
    keras_err = (torch.from_numpy(data["y_0"]).double() - expected).abs().max()
    assert ours_err <= keras_err


ERRORS = json.loads((DATA / "errors.json").read_text())


@pytest.mark.parametrize("probe", ERRORS, ids=[e["name"] for e in ERRORS])
def test_keras_error_probes(probe):
    """Every construction tf_keras rejects is rejected with Keras's message (TF's
    InvalidArgumentError for a non-dividing virtual batch becomes a ValueError naming it)."""
    kwargs, shape = dict(probe["kwargs"]), tuple(probe["shape"])
    if kwargs.get("adjustment"):
        kwargs["adjustment"] = lambda s: (torch.ones(shape[-1]), torch.zeros(shape[-1]))
    kind, _, keras_message = probe["error"].partition(": ")
    keras_message = re.sub(r"ListWrapper\((.*?)\)", r"\1", keras_message)
    with pytest.raises(ValueError) as info:
        BatchNormalization(**kwargs)(torch.randn(shape), training=True)
    if kind == "ValueError":
        assert str(info.value) == keras_message
    else:
        assert "virtual_batch_size" in str(info.value)
