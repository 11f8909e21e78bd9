"""triton_bn.keras3.BatchNormalization against Keras 3's own layer (same process, torch backend) and
the float64 reference: steps, fit, .keras files, mixed precision, stateless calls, Keras 2 extras.
"""

import keras
import numpy as np
import pytest
import torch

from triton_bn import keras as keras2
from triton_bn import keras3, keras_objects
from triton_bn.reference import reference_batch_norm

TBN = keras3.BatchNormalization


def data(shape, seed=0, loc=3.0, scale=2.0):
    return np.random.RandomState(seed).normal(loc, scale, size=shape).astype("float32")


def t(v):
    if isinstance(v, keras.Variable):
        v = v.value
    return v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))


def close(got, expected, tol=1e-5, what=""):
    got, expected = t(got).double(), t(expected).double()
    torch.testing.assert_close(got, expected, atol=tol * max(1.0, expected.abs().max().item()),
                               rtol=tol, msg=lambda m: f"{what}: {m}")


def twin(kwargs, shape, **ours_only):
    """Keras's own layer and the subclass, built on ``shape``, with the same (random) weights."""
    ours, theirs = TBN(**kwargs, **ours_only), keras.layers.BatchNormalization(**kwargs)
    for layer in (ours, theirs):
        layer.build(shape)
    rng = np.random.RandomState(1)
    for w in theirs.weights:
        value = rng.uniform(0.5, 1.5, size=w.shape) if "var" in w.path or "stddev" in w.path \
            else rng.normal(0, 0.5, size=w.shape)
        w.assign(value.astype("float32"))
    ours.set_weights(theirs.get_weights())
    return ours, theirs


@pytest.mark.parametrize("kwargs, shape", [
    ({}, (6, 5, 4, 3)),
    ({"axis": 1, "momentum": 0.5, "epsilon": 1e-5}, (6, 3, 4, 5)),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.2, "rmin": 0.8, "dmax": 0.1},
      "renorm_momentum": 0.7, "momentum": 0.6}, (10, 3)),
    ({"center": False, "scale": False}, (4, 7, 2)),
])
def test_steps_match_keras(kwargs, shape):
    """Three training steps (output, gradients, every weight) and an inference step."""
    ours, theirs = twin(kwargs, shape)
    for step in range(3):
        x = data(shape, seed=step)
        outs, grads = [], []
        for layer in (ours, theirs):
            xt = torch.tensor(x, requires_grad=True)
            y = layer(xt, training=True)
            (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
            outs.append(y)
            grads.append([xt.grad] + [w.value.grad for w in layer.trainable_weights])
        close(outs[0], outs[1], what=f"step {step} y")
        for g0, g1 in zip(*grads):
            close(g0, g1, 1e-4, what=f"step {step} grad")
        for w0, w1 in zip(ours.weights, theirs.weights):
            assert w0.path.split("/")[-1] == w1.path.split("/")[-1]
            close(w0, w1, what=f"step {step} {w1.path}")
    x = data(shape, seed=9)
    close(ours(x, training=False), theirs(x, training=False), what="inference")


def convnet(bn, **bn_kwargs):
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same"),
        bn(**bn_kwargs),
        keras.layers.ReLU(),
        keras.layers.Conv2D(3, 3, strides=2),
        bn(axis=-1, momentum=0.8),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


def test_fit_losses_match_keras():
    """A small convnet trained by model.fit for a few steps: same losses, weights and moving
    statistics as with Keras's own layer; evaluate (inference) agrees too."""
    keras.utils.set_random_seed(0)
    theirs = convnet(keras.layers.BatchNormalization, momentum=0.9)
    ours = convnet(TBN, momentum=0.9)
    ours.set_weights(theirs.get_weights())
    x, y = data((24, 6, 6, 2)), data((24, 2), seed=1)
    histories = []
    for model in (ours, theirs):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        histories.append(model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0))
    np.testing.assert_allclose(histories[0].history["loss"], histories[1].history["loss"],
                               rtol=1e-5)
    assert histories[1].history["loss"][-1] < histories[1].history["loss"][0]  # it trains
    for w0, w1 in zip(ours.weights, theirs.weights):
        close(w0, w1, 1e-4, what=w1.path)
    assert sum(isinstance(layer, TBN) for layer in ours.layers) == 2
    np.testing.assert_allclose(ours.evaluate(x, y, verbose=0), theirs.evaluate(x, y, verbose=0),
                               rtol=1e-5)


def test_keras_file_round_trip(tmp_path):
    model = keras.Sequential([keras.Input((4, 3)), TBN(
        renorm=True, renorm_clipping={"rmax": 2.0}, virtual_batch_size=2, momentum=0.7,
        gamma_regularizer=keras.regularizers.L2(1e-2), beta_constraint="non_neg", name="bn")])
    x = data((6, 4, 3))
    model(x, training=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    layer = loaded.get_layer("bn")
    assert type(layer) is TBN
    assert layer.get_config() == model.get_layer("bn").get_config()
    assert layer.virtual_batch_size == 2 and layer.renorm_clipping == {"rmax": 2.0}
    assert isinstance(layer.gamma_regularizer, keras.regularizers.L2)
    for w0, w1 in zip(layer.weights, model.get_layer("bn").weights):
        close(w0, w1, 0, what=w1.path)
    close(loaded(x, training=False), model(x, training=False), 0, what="inference")
    close(loaded(x, training=True), model(x, training=True), 1e-6, what="training")


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_bfloat16(mixed_bfloat16):
    """keras.mixed_precision's global policy: bf16 in and out, float32 variables updated in
    float32."""
    shape = (8, 4, 4, 3)
    ours, theirs = twin({"momentum": 0.5}, shape)
    assert ours.compute_dtype == "bfloat16" and ours.variable_dtype == "float32"
    x = data(shape)
    y0, y1 = ours(x, training=True), theirs(x, training=True)
    assert y0.dtype == y1.dtype == torch.bfloat16
    close(y0, y1, 2e-2, what="y")
    for w0, w1 in zip(ours.weights, theirs.weights):
        assert w0.value.dtype == torch.float32
        close(w0, w1, 1e-2, what=w1.path)  # the input itself was rounded to bf16
    close(ours(x, training=False), theirs(x, training=False), 2e-2, what="inference")


def test_fit_under_mixed_bfloat16(mixed_bfloat16):
    keras.utils.set_random_seed(0)
    theirs, ours = convnet(keras.layers.BatchNormalization), convnet(TBN)
    ours.set_weights(theirs.get_weights())
    x, y = data((16, 6, 6, 2)), data((16, 2), seed=1)
    losses = []
    for model in (ours, theirs):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        losses.append(model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
                      .history["loss"])
        assert model.layers[1].moving_mean.value.dtype == torch.float32
    np.testing.assert_allclose(losses[0], losses[1], rtol=5e-3)  # bf16 activations


def test_stateless_call_leaves_the_variables_alone():
    shape = (6, 3)
    ours, theirs = twin({"renorm": True, "momentum": 0.5}, shape)
    before = [w.numpy().copy() for w in ours.weights]
    x = torch.tensor(data(shape))
    results = [layer.stateless_call([w.value for w in layer.trainable_weights],
                                    [w.value for w in layer.non_trainable_weights], x,
                                    training=True) for layer in (ours, theirs)]
    close(results[0][0], results[1][0], what="y")
    for a, b in zip(results[0][1], results[1][1]):
        close(a, b, what="new non-trainable values")
    for w, b in zip(ours.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


@pytest.mark.parametrize("kwargs, shape", [
    ({"virtual_batch_size": 2}, (6, 3, 4)),
    ({"virtual_batch_size": 3, "axis": 1, "renorm": True, "renorm_clipping": {"rmax": 1.1}},
     (6, 4, 2)),
])
def test_virtual_batch_size_against_the_reference(kwargs, shape):
    layer = TBN(momentum=0.75, **kwargs)
    layer.build(shape)
    layer.gamma.assign(np.linspace(0.5, 1.5, layer.gamma.shape[0]))
    layer.beta.assign(np.linspace(-1, 1, layer.beta.shape[0]))
    init = {w.path.split("/")[-1]: t(w).clone() for w in layer.weights}
    x = data(shape)
    y = layer(x, training=True)
    renorm = None
    if layer.renorm:
        renorm = dict(style="keras", momentum=layer.renorm_momentum, mean=init["renorm_mean"],
                      stddev=init["renorm_stddev"], moving_stddev=init["moving_stddev"],
                      **layer.renorm_clipping)
    ref, state = reference_batch_norm(
        torch.tensor(x), init["gamma"], init["beta"], axis=layer.axis % len(shape),
        eps=layer.epsilon, running_mean=init["moving_mean"], running_var=init["moving_variance"],
        momentum=0.75, convention="keras", unbiased=False,
        groups=shape[0] // layer.virtual_batch_size, renorm=renorm)
    close(y, ref, what="y")
    close(layer.moving_mean, state["running_mean"], what="moving_mean")
    close(layer.moving_variance, state["running_var"], what="moving_variance")
    for name in ("renorm_mean", "renorm_stddev", "moving_stddev") if renorm else ():
        close(getattr(layer, name), state[name], what=name)
    close(layer(x, training=False), reference_batch_norm(
        torch.tensor(x), init["gamma"], init["beta"], axis=layer.axis % len(shape),
        training=False, eps=layer.epsilon, running_mean=t(layer.moving_mean),
        running_var=t(layer.moving_variance))[0], what="inference ignores ghost batches")


def test_adjustment_against_the_reference():
    shape = (5, 2, 4)
    seen = []
    a_scale, a_bias = torch.tensor([0.5, 1.0, 1.5, 2.0]), torch.tensor([[[0.1, 0.0, -0.1, 0.3]]])

    def adjustment(input_shape):
        seen.append(tuple(input_shape))
        return a_scale, a_bias

    layer = TBN(adjustment=adjustment, momentum=0.5)
    x = data(shape)
    y = layer(x, training=True)
    ref, state = reference_batch_norm(
        torch.tensor(x), torch.ones(4), torch.zeros(4), axis=2, eps=layer.epsilon,
        running_mean=torch.zeros(4), running_var=torch.ones(4), momentum=0.5, convention="keras",
        unbiased=False, adjustment=(a_scale, a_bias.reshape(4)))
    assert seen == [shape]
    close(y, ref, what="y")
    close(layer.moving_variance, state["running_var"], what="moving_variance")
    layer(x, training=False)
    assert seen == [shape]  # training only
    with pytest.warns(UserWarning, match="adjustment"):
        assert "adjustment" not in layer.get_config()


def test_synchronized_goes_through_sync_normalize(monkeypatch):
    """One process: sync_normalize is plain normalize (the gloo tests cover several ranks)."""
    calls = []
    real = keras3.sync_normalize
    monkeypatch.setattr(keras3, "sync_normalize", lambda *a, **k: calls.append(k) or real(*a, **k))
    ours, theirs = twin({"renorm": True}, (6, 3), synchronized=True)
    assert ours.get_config()["synchronized"] is True
    assert TBN.from_config(ours.get_config()).synchronized
    x = data((6, 3))
    close(ours(x, training=True), theirs(x, training=True), what="y")
    assert len(calls) == 1 and calls[0]["training"] and calls[0]["renorm"] is not None
    for w0, w1 in zip(ours.weights, theirs.weights):
        close(w0, w1, what=w1.path)


@pytest.mark.parametrize("kwargs, match", [
    ({"virtual_batch_size": 0}, "virtual_batch_size"),
    ({"virtual_batch_size": 2, "adjustment": lambda s: (1.0, 0.0)}, "adjustment cannot"),
    ({"adjustment": 3.0}, "adjustment"),
    ({"momentum": 1.5}, "momentum"),
    ({"renorm": True, "renorm_clipping": {"rmin": 2.0, "rmax": 1.0}}, "rmax should be"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TBN(**kwargs)


def test_other_backends_are_refused(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="torch backend.*'jax'"):
        TBN()


@pytest.mark.parametrize("kwargs, shape, mask, match", [
    ({"virtual_batch_size": 4}, (6, 3), None, "must divide the batch"),
    ({"virtual_batch_size": 2, "axis": 0}, (6, 3), None, "axis cannot be 0"),
    ({"virtual_batch_size": 2}, (6, 4, 3), np.ones((6, 4)), "cannot be combined with a mask"),
    ({}, (6, 4, 3), np.ones((6,)), "one dimension less"),
])
def test_rejected_calls_change_no_state(kwargs, shape, mask, match):
    layer = TBN(momentum=0.5, **kwargs)
    layer.build(shape)
    before = [w.numpy().copy() for w in layer.weights]
    with pytest.raises(ValueError, match=match):
        layer(data(shape), training=True, mask=mask)
    for w, b in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_port_takes_keras3_objects():
    """triton_bn.keras.BatchNormalization (the nn.Module port of Keras 2) uses Keras's own
    initializers/regularizers/constraints when given them, and Keras for names it lacks."""
    layer = keras2.BatchNormalization(
        gamma_initializer=keras.initializers.Constant(2.0),
        beta_initializer={"module": "keras.initializers", "class_name": "HeNormal",
                          "config": {"seed": 3, "input_axes": None, "output_axes": None}},
        gamma_regularizer=keras.regularizers.L2(0.25), beta_constraint=keras.constraints.NonNeg())
    assert isinstance(layer.beta_initializer, keras.initializers.HeNormal)
    layer.build((4, 3))
    torch.testing.assert_close(layer.gamma.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(layer.beta.detach(), t(keras.initializers.HeNormal(seed=3)((3,))))
    (loss,) = layer.losses
    torch.testing.assert_close(loss, 0.25 * 4 * 3 * torch.ones(()))
    loss.backward()
    torch.testing.assert_close(layer.gamma.grad, torch.full((3,), 0.25 * 2 * 2.0))
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([-1.0, 0.5, -2.0]))
    layer.apply_constraints()
    torch.testing.assert_close(layer.beta.detach(), torch.tensor([0.0, 0.5, 0.0]))
    config = layer.get_config()
    assert config["gamma_regularizer"] == keras.saving.serialize_keras_object(
        keras.regularizers.L2(0.25))
    again = keras2.BatchNormalization.from_config(config)
    assert again.gamma_regularizer.get_config()["l2"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="gamma_initializer"):
        keras2.BatchNormalization(gamma_initializer="no_such_initializer")
    assert keras_objects.keras_on_torch() is keras
