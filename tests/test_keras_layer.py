"""Unit tests of triton_bn.keras.BatchNormalization (the Keras-compatible layer).

The numbers against real tf_keras are in test_keras_golden.py; here: building, state, modes,
Keras objects, config, weights, errors (with no state change), edge cases, compute dtypes.
Tiny shapes: the kernels run in Triton's interpreter on CPU machines.
"""

import json
import math

import numpy as np
import pytest
import torch

from triton_bn.keras import BatchNormalization
from triton_bn.keras_objects import L2, MaxNorm, RandomNormal, serialize
from triton_bn.reference import reference_batch_norm

SHAPE = (4, 3, 2, 3)  # NHWC, 3 channels on the last axis (Keras's default)


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_same_state(layer, before):
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


def built(shape=SHAPE, **kwargs):
    layer = BatchNormalization(**kwargs)
    layer.build(shape)
    with torch.no_grad():  # non-trivial statistics
        layer.moving_mean.copy_(torch.randn_like(layer.moving_mean))
        layer.moving_variance.uniform_(0.5, 2.0)
    return layer


# ----------------------------------------------------------------------------- building, state
def test_lazy_build_on_first_call():
    layer = BatchNormalization()
    assert not layer.built and layer.gamma is None and layer.state_dict() == {}
    assert layer.weights == [] and "built=False" in repr(layer)
    y = layer(torch.randn(SHAPE) * 3 + 1)
    assert layer.built and y.shape == SHAPE
    assert isinstance(layer.gamma, torch.nn.Parameter) and layer.gamma.shape == (3,)
    assert not torch.equal(layer.moving_mean, torch.zeros(3))  # trained: a fresh module trains


def test_first_call_under_inference_mode_builds_trainable_weights():
    layer = BatchNormalization()
    with torch.inference_mode():
        layer(torch.randn(4, 3), training=False)
    x = torch.randn(4, 3, requires_grad=True)
    (layer(x, training=True) * torch.randn(4, 3)).sum().backward()
    assert layer.gamma.grad is not None and x.grad is not None


def test_explicit_build_then_optimizer():
    layer = BatchNormalization(axis=1)
    layer.build((None, 3, 5))  # unknown batch and length, as in Keras
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(4, 3, 5)
    (layer(x) * torch.randn_like(x)).sum().backward()
    opt.step()
    assert not torch.equal(layer.gamma.detach(), torch.ones(3))  # the optimizer's gamma is the layer's
    layer.build((4, 3, 5))  # a second build is a no-op
    assert layer.gamma is opt.param_groups[0]["params"][0]


@pytest.mark.parametrize("kwargs, shape, keys, wshape", [
    ({}, SHAPE, ["gamma", "beta", "moving_mean", "moving_variance"], (3,)),
    ({"center": False}, SHAPE, ["gamma", "moving_mean", "moving_variance"], (3,)),
    ({"scale": False, "center": False}, SHAPE, ["moving_mean", "moving_variance"], (3,)),
    ({"renorm": True}, SHAPE, ["gamma", "beta", "moving_mean", "moving_variance",
                               "moving_stddev", "renorm_mean", "renorm_stddev"], (3,)),
    ({"axis": [1, 3]}, SHAPE, ["gamma", "beta", "moving_mean", "moving_variance"], (1, 3, 1, 3)),
    ({"virtual_batch_size": 2}, SHAPE, ["gamma", "beta", "moving_mean", "moving_variance"],
     (1, 1, 1, 1, 3)),
    ({"axis": 0}, (5, 2), ["gamma", "beta", "moving_mean", "moving_variance"], (5,)),
])
def test_state_dict_keys_and_shapes(kwargs, shape, keys, wshape):
    layer = BatchNormalization(**kwargs)
    layer.build(shape)
    assert list(layer.state_dict()) == keys
    assert all(v.shape == wshape and v.dtype == torch.float32 for v in layer.state_dict().values())
    assert [n for n, _ in layer.named_parameters()] == [k for k in keys if k in ("gamma", "beta")]
    other = BatchNormalization(**kwargs)
    other.build(shape)
    other.load_state_dict(layer.state_dict())


def test_renorm_state_starts_from_moving_variance_initializer():
    layer = BatchNormalization(renorm=True, moving_variance_initializer={
        "class_name": "Constant", "config": {"value": 4.0}})
    layer.build((2, 3))
    for t in (layer.moving_stddev, layer.renorm_stddev):
        torch.testing.assert_close(t, torch.full((3,), 2.0))


# ----------------------------------------------------------------------------- modes
def test_training_none_follows_module_training():
    layer = built()
    x = torch.randn(SHAPE)
    before = snapshot(layer)
    layer.eval()
    y_eval = layer(x)
    assert_same_state(layer, before)
    torch.testing.assert_close(y_eval, layer(x, training=False))
    layer.train()
    y_train = layer(x)
    assert not torch.equal(layer.moving_mean, before["moving_mean"])
    assert not torch.allclose(y_train, y_eval)
    after_train = snapshot(layer)
    layer(x, training=False)  # explicit False in train mode: no update
    assert_same_state(layer, after_train)
    layer.eval()
    layer(x, training=True)  # explicit True in eval mode: updates
    assert not torch.equal(layer.moving_mean, after_train["moving_mean"])


def test_trainable_false_forces_inference_and_freezes():
    layer = built(trainable=False)
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    x = torch.randn(SHAPE, requires_grad=True)
    before = snapshot(layer)
    y = layer(x, training=True)
    assert_same_state(layer, before)
    torch.testing.assert_close(y, layer(x, training=False))
    y.sum().backward()
    assert x.grad is not None and layer.gamma.grad is None
    layer.trainable = True
    assert layer.gamma.requires_grad
    layer(x, training=True)
    assert not torch.equal(layer.moving_mean, before["moving_mean"])


@pytest.mark.parametrize("kwargs, shape, unbiased", [
    ({}, (4, 3, 2, 3), True),  # Keras's fused path: rank 4/5, axis 1 or last
    ({"axis": 1}, (4, 3, 2, 3), True),
    ({}, (2, 2, 2, 2, 3), True),
    ({"fused": False}, (4, 3, 2, 3), False),
    ({}, (8, 3), False),  # rank 2/3
    ({"axis": 2}, (4, 3, 2, 3), False),
    ({"dtype": "float64"}, (4, 3, 2, 3), False),
    ({"adjustment": lambda s: (1.0, 0.0)}, (4, 3, 2, 3), False),
    ({"synchronized": True}, (4, 3, 2, 3), False),
])
def test_moving_variance_unbiased_only_on_keras_fused_path(kwargs, shape, unbiased):
    layer = BatchNormalization(momentum=0.0, **kwargs)  # moving_variance := the batch value
    x = torch.randn(shape, dtype=torch.float64)
    layer(x, training=True)
    dims = [d for d in range(len(shape)) if d != layer._axes[0]]
    expected = x.float().var(dim=dims, unbiased=unbiased)
    torch.testing.assert_close(layer.moving_variance.float(), expected, rtol=1e-5, atol=1e-6)


def test_adjustment_gets_the_input_shape_and_acts_in_training_only():
    seen = []
    a_scale, a_bias = torch.tensor([1.5, 0.5, 2.0]), torch.tensor([0.1, -0.2, 0.3])

    def adjustment(shape):
        seen.append(tuple(shape))
        return a_scale, a_bias

    layer = built(adjustment=adjustment)
    plain = built(fused=False)  # adjustment is off Keras's fused path: biased moving variance
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(SHAPE)
    torch.testing.assert_close(layer(x, training=True),
                               plain(x, training=True) * a_scale + a_bias)
    torch.testing.assert_close(layer(x, training=False), plain(x, training=False))
    assert seen[0] == SHAPE


# ----------------------------------------------------------------------------- Keras objects
@pytest.mark.parametrize("init", ["zeros", "ones", "random_normal", "random_uniform",
                                  "truncated_normal", "glorot_uniform", "glorot_normal",
                                  "he_normal", "he_uniform", "lecun_normal", "lecun_uniform",
                                  "variance_scaling", "RandomNormal", "Ones"])
def test_initializer_names(init):
    layer = BatchNormalization(gamma_initializer=init)
    layer.build((2, 1000))
    g = layer.gamma.detach()
    assert torch.isfinite(g).all()
    if init in ("truncated_normal",):
        assert g.abs().max() <= 0.1 and g.std() > 0.02  # within 2 stddevs of 0.05
    if init == "random_uniform":
        assert g.abs().max() <= 0.05
    if init == "glorot_uniform":  # fans of a (1000,) weight: 1000 and 1000
        assert g.abs().max() <= math.sqrt(3 / 1000)


def test_initializer_configs_and_callables():
    layer = BatchNormalization(
        gamma_initializer={"class_name": "Constant", "config": {"value": 0.5}},
        beta_initializer=lambda shape, dtype=None: torch.full(shape, 2.0),
        moving_mean_initializer=RandomNormal(mean=3.0, stddev=0.0),
        moving_variance_initializer={"module": "keras.initializers", "class_name": "RandomUniform",
                                     "config": {"minval": 2.0, "maxval": 3.0, "seed": 7}})
    layer.build((2, 4))
    torch.testing.assert_close(layer.gamma.detach(), torch.full((4,), 0.5))
    torch.testing.assert_close(layer.beta.detach(), torch.full((4,), 2.0))
    torch.testing.assert_close(layer.moving_mean, torch.full((4,), 3.0))
    assert ((layer.moving_variance >= 2) & (layer.moving_variance <= 3)).all()
    again = BatchNormalization.from_config(layer.get_config() | {"beta_initializer": "zeros"})
    again.build((2, 4))
    torch.testing.assert_close(again.moving_variance, layer.moving_variance)  # seeded


def test_regularizers_are_losses():
    layer = built(gamma_regularizer="l2", beta_regularizer={
        "class_name": "L1L2", "config": {"l1": 0.1, "l2": 0.2}})
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([1.0, -2.0, 0.5]))
    g, b = layer.gamma.detach(), layer.beta.detach()
    gamma_loss, beta_loss = layer.losses
    torch.testing.assert_close(gamma_loss, 0.01 * (g ** 2).sum())
    torch.testing.assert_close(beta_loss, 0.1 * b.abs().sum() + 0.2 * (b ** 2).sum())
    sum(layer.losses).backward()
    torch.testing.assert_close(layer.gamma.grad, 0.02 * g)
    assert built().losses == []
    custom = built(gamma_regularizer=lambda w: w.sum() * 3, beta_regularizer="l1")
    torch.testing.assert_close(custom.losses[0], custom.gamma.detach().sum() * 3)
    torch.testing.assert_close(custom.losses[1], 0.01 * custom.beta.detach().abs().sum())


def test_constraints_after_an_optimizer_step():
    layer = built(gamma_constraint="non_neg", beta_constraint=MaxNorm(max_value=1.0))
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([1.0, -0.5, 2.0]))
        layer.beta.copy_(torch.tensor([3.0, 0.0, 4.0]))
    layer.apply_constraints()
    torch.testing.assert_close(layer.gamma.detach(), torch.tensor([1.0, 0.0, 2.0]))
    torch.testing.assert_close(layer.beta.detach().norm(), torch.tensor(1.0), atol=1e-6, rtol=0)
    unit = built(gamma_constraint="unit_norm", beta_constraint={
        "class_name": "MinMaxNorm", "config": {"min_value": 2.0, "max_value": 3.0}})
    unit.apply_constraints()
    torch.testing.assert_close(unit.gamma.detach().norm(), torch.tensor(1.0))
    assert unit.beta.detach().norm() < 1e-6  # zeros stay zeros (norm 0 -> scaled by 2/(eps+0))
    fn = built(gamma_constraint=lambda w: w.clamp(max=0.5))
    fn.apply_constraints()
    torch.testing.assert_close(fn.gamma.detach(), torch.full((3,), 0.5))


@pytest.mark.parametrize("arg, value, exc", [
    ("gamma_initializer", "not_an_initializer", ValueError),
    ("beta_initializer", 3.5, TypeError),
    ("beta_regularizer", "l3", ValueError),
    ("gamma_regularizer", {"class_name": "L2", "config": {"l2": "big"}}, ValueError),
    ("gamma_constraint", "positive", ValueError),
    ("beta_constraint", {"class_name": "MaxNorm", "config": {"max_valu": 1}}, TypeError),
])
def test_bad_keras_objects_name_the_argument(arg, value, exc):
    with pytest.raises(exc, match=arg):
        BatchNormalization(**{arg: value})


# ----------------------------------------------------------------------------- config, weights
def test_get_config_from_config_json_round_trip():
    layer = BatchNormalization(
        axis=[1, 3], momentum=0.9, epsilon=1e-4, center=False,
        gamma_initializer={"class_name": "RandomNormal", "config": {"seed": 1}},
        gamma_regularizer=L2(1e-3), gamma_constraint="non_neg", renorm=True,
        renorm_clipping={"rmax": 3.0, "dmax": 5.0}, renorm_momentum=0.8, virtual_batch_size=2,
        trainable=False, name="bn_x", dtype="float16", synchronized=True)
    cfg = layer.get_config()
    assert cfg["axis"] == [1, 3] and cfg["dtype"] == "float16" and cfg["name"] == "bn_x"
    assert cfg["gamma_regularizer"]["config"] == {"l2": float(np.float32(1e-3))}
    restored = BatchNormalization.from_config(json.loads(json.dumps(cfg)))
    assert restored.get_config() == cfg
    layer.build(SHAPE)
    cfg = layer.get_config()
    assert cfg["axis"] == [1, 3]
    assert BatchNormalization.from_config(json.loads(json.dumps(cfg))).get_config() == cfg
    mixed = BatchNormalization(dtype="mixed_bfloat16").get_config()
    assert mixed["dtype"]["config"]["name"] == "mixed_bfloat16"
    assert BatchNormalization.from_config(mixed).compute_dtype == torch.bfloat16


def test_config_defaults_match_keras():
    cfg = BatchNormalization(name="batch_normalization").get_config()
    assert cfg == {
        "name": "batch_normalization", "trainable": True, "dtype": "float32", "axis": -1,
        "momentum": 0.99, "epsilon": 0.001, "center": True, "scale": True,
        "beta_initializer": serialize(BatchNormalization().beta_initializer),
        "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones",
                              "config": {}, "registered_name": None},
        "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                    "config": {}, "registered_name": None},
        "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones",
                                        "config": {}, "registered_name": None},
        "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None,
        "gamma_constraint": None}


def test_adjustment_is_left_out_of_the_config_with_a_warning():
    layer = BatchNormalization(adjustment=lambda s: (1.0, 0.0))
    with pytest.warns(UserWarning, match="adjustment"):
        cfg = layer.get_config()
    assert "adjustment" not in cfg and BatchNormalization.from_config(cfg).adjustment is None


def test_plain_function_round_trips_with_custom_objects():
    def my_reg(w):
        return w.abs().max()

    cfg = json.loads(json.dumps(BatchNormalization(gamma_regularizer=my_reg).get_config()))
    assert cfg["gamma_regularizer"]["config"] == "my_reg"
    with pytest.raises(ValueError, match="gamma_regularizer"):
        BatchNormalization.from_config(cfg)
    assert BatchNormalization.from_config(
        cfg, custom_objects={"my_reg": my_reg}).gamma_regularizer is my_reg


def test_get_weights_set_weights_keras_order():
    layer = built(renorm=True)
    weights = [np.random.rand(3).astype(np.float32) + 0.5 for _ in range(7)]
    layer.set_weights(weights)
    got = layer.get_weights()
    assert all(isinstance(w, np.ndarray) for w in got)
    for w, g, t in zip(weights, got, layer.state_dict().values()):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(t.numpy(), w)
    got[0][:] = 0  # a copy, not a view of the layer's storage
    assert layer.gamma.detach().min() > 0


@pytest.mark.parametrize("bad", [
    lambda w: w[:3],  # too few
    lambda w: w[:-1] + [np.ones(4, np.float32)],  # last has a wrong shape
])
def test_set_weights_rejects_without_changing_state(bad):
    layer = built()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="weight"):
        layer.set_weights(bad([np.full(3, 7.0, np.float32) for _ in range(4)]))
    assert_same_state(layer, before)
    with pytest.raises(ValueError, match="Build it first"):
        BatchNormalization().set_weights([])


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    ({"renorm": True, "renorm_clipping": {"rmaxx": 2.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"rmin": 2.0, "rmax": 1.0}}, "renorm_clipping"),
    ({"fused": True, "renorm": True}, "fused"),
    ({"fused": True, "virtual_batch_size": 2}, "fused"),
    ({"fused": True, "adjustment": lambda s: (1.0, 0.0)}, "fused"),
    ({"fused": True, "axis": 2}, "fused"),
    ({"fused": True, "axis": [1, 3]}, "fused"),
    ({"fused": True, "dtype": "float64"}, "fused"),
    ({"fused": True, "synchronized": True}, "synchronized"),
    ({"virtual_batch_size": 2, "adjustment": lambda s: (1.0, 0.0)}, "virtual_batch_size"),
    ({"virtual_batch_size": 0}, "virtual_batch_size"),
    ({"dtype": "int8"}, "dtype"),
    ({"momentum": 1.5}, "momentum"),
    ({"epsilon": -1.0}, "epsilon"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchNormalization(**kwargs)


@pytest.mark.parametrize("axis", ["channels", [], 1.0, True])
def test_axis_type_error(axis):
    with pytest.raises(TypeError, match="axis"):
        BatchNormalization(axis=axis)


@pytest.mark.parametrize("kwargs, shape, match", [
    ({"fused": True}, (4, 7, 3), "fused"),  # fused needs rank 4/5
    ({"axis": -4}, SHAPE, "axis"),  # Keras: fused (by default) and an unsupported axis
    ({"virtual_batch_size": 2, "axis": 0}, (8, 3), "virtual_batch_size"),
    ({"virtual_batch_size": 2, "axis": -2}, (8, 3), "virtual_batch_size"),
    ({"virtual_batch_size": 3}, SHAPE, "virtual_batch_size"),  # 3 does not divide 4
    ({"axis": 4}, SHAPE, "axis"),
    ({"axis": [1, -3]}, SHAPE, "axis"),  # the same dimension twice
    ({}, (5,), "rank"),
])
def test_first_call_errors_leave_the_layer_unbuilt(kwargs, shape, match):
    layer = BatchNormalization(**kwargs)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape), training=True)
    assert not layer.built and layer.state_dict() == {}


@pytest.mark.parametrize("kwargs, shape, match", [
    ({}, (4, 3, 2, 4), "axis 3"),  # channel count differs from the built one
    ({"axis": [1, 3]}, (4, 2, 2, 3), "axis 1"),
    ({}, (4, 3, 3), "ndim=4"),
    ({"virtual_batch_size": 2}, (5, 3, 2, 3), "virtual_batch_size"),  # also in inference,
    ({"virtual_batch_size": 4}, (6, 3, 2, 3), "virtual_batch_size"),  # as Keras reshapes then
])
@pytest.mark.parametrize("training", [True, False])
def test_rejected_calls_change_no_state(kwargs, shape, match, training):
    layer = built(**kwargs)
    layer(torch.randn(SHAPE), training=True)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape, requires_grad=True), training=training)
    assert_same_state(layer, before)


def test_bad_adjustment_is_rejected_before_build():
    layer = BatchNormalization(adjustment=lambda s: (torch.ones(2), 0.0))
    with pytest.raises(ValueError, match="adjustment"):
        layer(torch.randn(SHAPE), training=True)
    assert not layer.built


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_zero_size_batch(kwargs):
    layer = built(**kwargs)
    before = snapshot(layer)
    x = torch.randn((0,) + SHAPE[1:], requires_grad=True)
    y = layer(x, training=True)
    assert y.shape == x.shape and y.numel() == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert_same_state(layer, before)


def test_zero_size_batch_builds_the_layer():
    layer = BatchNormalization()
    assert layer(torch.randn(0, 5), training=True).shape == (0, 5)
    assert layer.built and torch.equal(layer.moving_mean, torch.zeros(5))


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"virtual_batch_size": 2}])
def test_nan_stays_in_its_channel(kwargs):
    x = torch.randn(SHAPE)
    x_nan = x.clone()
    x_nan[1, 2, 0, 0] = float("nan")
    clean, dirty = built(**kwargs), built(**kwargs)
    dirty.load_state_dict(clean.state_dict())
    xs = [x.clone().requires_grad_(), x_nan.clone().requires_grad_()]
    ys = [clean(xs[0], training=True), dirty(xs[1], training=True)]
    dy = torch.randn(SHAPE)
    for x_, y_ in zip(xs, ys):
        y_.backward(dy)
    # the NaN's channel turns NaN, only in its (strided) ghost batch with virtual_batch_size=2
    nan_samples = [1, 3] if "virtual_batch_size" in kwargs else [0, 1, 2, 3]
    assert ys[1][nan_samples, ..., 0].isnan().all()
    assert ys[1].isnan().sum() == ys[1][nan_samples, ..., 0].numel()
    torch.testing.assert_close(ys[1][..., 1:], ys[0][..., 1:])
    torch.testing.assert_close(xs[1].grad[..., 1:], xs[0].grad[..., 1:])
    assert dirty.moving_mean.reshape(-1)[0].isnan()
    for key, value in dirty.state_dict().items():
        torch.testing.assert_close(value.reshape(-1)[1:], clean.state_dict()[key].reshape(-1)[1:])


# ----------------------------------------------------------------------------- compute dtypes
@pytest.mark.parametrize("dtype, torch_dtype, tol", [
    ("float16", torch.float16, 2e-3), ("bfloat16", torch.bfloat16, 1.6e-2),
    (torch.float16, torch.float16, 2e-3)])
def test_half_compute_dtype(dtype, torch_dtype, tol):
    layer, ref = built(dtype=dtype), built()
    ref.load_state_dict(layer.state_dict())
    assert layer.gamma.dtype == torch.float32 and layer.moving_mean.dtype == torch.float32
    x = torch.randn(SHAPE)  # float32 input: cast to the compute dtype, as Keras does
    y = layer(x, training=True)
    assert y.dtype == torch_dtype
    expected = ref(x.to(torch_dtype).float(), training=True)
    torch.testing.assert_close(y.float(), expected, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(layer.moving_mean, ref.moving_mean, atol=1e-6, rtol=1e-6)
    y.float().sum().backward()
    assert layer.gamma.grad.dtype == torch.float32


def test_float32_layer_casts_other_inputs():
    layer = built()
    assert layer(torch.randn(SHAPE, dtype=torch.float16)).dtype == torch.float32
    assert layer(torch.randn(SHAPE, dtype=torch.float64)).dtype == torch.float32


def test_float64_layer_matches_the_reference():
    layer = built((6, 5), dtype="float64", momentum=0.9)
    assert layer.gamma.dtype == torch.float64
    x = torch.randn(6, 5, dtype=torch.float64)
    mean, var = layer.moving_mean.clone(), layer.moving_variance.clone()
    y = layer(x, training=True)
    expected, state = reference_batch_norm(
        x, layer.gamma, layer.beta, axis=1, eps=1e-3, running_mean=mean, running_var=var,
        momentum=0.9, convention="keras", unbiased=False)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.moving_variance, state["running_var"])


# ----------------------------------------------------------------------------- misc
def test_normalize_is_one_swappable_method():
    calls = []

    class Counting(BatchNormalization):
        def _normalize(self, x, weight, bias, **kwargs):
            calls.append(kwargs["training"])
            return super()._normalize(x, weight, bias, **kwargs)

    layer = Counting(synchronized=True)
    assert layer.synchronized and "synchronized=True" in repr(layer)
    layer(torch.randn(SHAPE), training=True)
    layer(torch.randn(SHAPE), training=False)
    assert calls == [True, False]


def test_extra_repr():
    layer = BatchNormalization(axis=1, renorm=True, virtual_batch_size=2, center=False)
    text = repr(layer)
    for part in ("axis=1", "momentum=0.99", "renorm=True", "virtual_batch_size=2", "center=False"):
        assert part in text
    layer.build((4, 3, 2))
    assert "axis=[1]" in repr(layer) and "weights_shape=(1, 1, 3, 1)" in repr(layer)
