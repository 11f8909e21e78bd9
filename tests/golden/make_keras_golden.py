#!/usr/bin/env python3
"""Write golden .npz files from the real tf.keras (Keras 2) BatchNormalization.

Run by hand, NOT in CI (CI has no TensorFlow; the tests only read the .npz
files with numpy).  Needs tensorflow-cpu==2.21.0 and tf-keras==2.21.0:

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0 numpy
    /tmp/tfenv/bin/python tests/golden/make_keras_golden.py

For every case in CASES it builds `tf_keras.layers.BatchNormalization(**kwargs)`
on the case's input shape, sets random initial weights, runs N_STEPS training
calls (`training=True`, no optimizer step: only the moving statistics change)
recording y, dx, dgamma, dbeta and every weight after each call, then one
inference call.  See README.md next to this file for the key layout.

Cases that Keras refuses to build, and the deliberate error probes in
ERROR_PROBES, are written to ERRORS.md / data/errors.json instead of an npz.
"""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # force CPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import collections.abc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
ERRORS_MD = HERE / "ERRORS.md"
N_STEPS = 3
EXPECTED_VERSIONS = {"tensorflow": "2.21.0", "tf_keras": "2.21.0"}


# --------------------------------------------------------------------------
# Random data
# --------------------------------------------------------------------------
def default_x(rng, shape):
    return rng.normal(0.3, 1.7, size=shape)


def ill_conditioned_x(rng, shape):
    return 1000.0 + 0.01 * rng.normal(0.0, 1.0, size=shape)


def small_x(rng, shape):
    # Variance ~1e-6, so an epsilon of 1e-10 vs a clamped 1.001e-5 is visible.
    return 0.3 + 1e-3 * rng.normal(0.0, 1.0, size=shape)


def default_init(rng, name, shape, values):
    """Initial value of weight `name`; `values` holds the weights drawn so far."""
    if name == "gamma":
        return rng.uniform(0.5, 1.5, size=shape)
    if name in ("beta", "moving_mean", "renorm_mean"):
        return rng.normal(0.0, 0.5, size=shape)
    if name == "moving_variance":
        return rng.uniform(0.5, 2.0, size=shape)
    if name == "moving_stddev":
        return np.sqrt(values["moving_variance"])
    if name == "renorm_stddev":
        return rng.uniform(0.7, 1.4, size=shape)
    raise KeyError(f"no initializer for weight {name!r}")


def per_channel(values):
    """Init override: a fixed per-channel value (reshaped to the weight's shape)."""
    values = np.asarray(values, dtype=np.float64)
    return lambda rng, shape, drawn: values.reshape(shape)


# --------------------------------------------------------------------------
# The cases
#   kwargs:  constructor kwargs (JSON-friendly, recorded as config_json)
#   shape:   input shape; dtype: compute dtype of x/dy/y/dx
#   x:       f(rng, shape) -> float64 input (default N(0.3, 1.7))
#   init:    {weight name: f(rng, shape, drawn_so_far)} overrides
#   adjustment: True -> pass adjustment=lambda shape: (adj_scale, adj_bias)
# --------------------------------------------------------------------------
IMG = (4, 5, 6, 3)
RENORM_CLIP_STDDEV = [1.7, 0.9, 2.6]  # r ~ 1 (free), ~1.9 (> rmax), ~0.65 (< rmin)
RENORM_CLIP_MEAN = [0.35, -1.0, 0.3]  # d mixed, ~1.4 (> dmax), small

CASES = {
    "default": dict(kwargs={}, shape=IMG),
    "nchw_axis1": dict(kwargs={"axis": 1}, shape=(4, 3, 5, 6)),
    "fused_false": dict(kwargs={"fused": False}, shape=IMG),
    "multi_axis": dict(kwargs={"axis": [1, 3]}, shape=(4, 3, 5, 2)),
    "rank2": dict(kwargs={}, shape=(16, 5)),
    "rank3": dict(kwargs={}, shape=(4, 7, 3)),
    "rank5": dict(kwargs={}, shape=(2, 3, 4, 5, 3)),
    "rank5_axis1": dict(kwargs={"axis": 1}, shape=(2, 3, 4, 5, 3)),
    "no_center_scale": dict(kwargs={"center": False, "scale": False}, shape=IMG),
    "no_scale": dict(kwargs={"scale": False}, shape=IMG),
    "renorm": dict(
        kwargs={"renorm": True, "renorm_momentum": 0.9, "momentum": 0.9},
        shape=(8, 4, 3, 3),
    ),
    "renorm_clip": dict(
        kwargs={
            "renorm": True,
            "renorm_clipping": {"rmin": 0.8, "rmax": 1.2, "dmax": 0.1},
            "renorm_momentum": 0.9,
            "momentum": 0.9,
        },
        shape=(8, 4, 3, 3),
        init={
            "renorm_mean": per_channel(RENORM_CLIP_MEAN),
            "renorm_stddev": per_channel(RENORM_CLIP_STDDEV),
        },
    ),
    "ghost": dict(kwargs={"virtual_batch_size": 2}, shape=(8, 3, 3, 4)),
    "ghost_axis1": dict(
        kwargs={"virtual_batch_size": 4, "axis": 1}, shape=(8, 3, 4, 4)
    ),
    "ghost_renorm": dict(
        kwargs={
            "virtual_batch_size": 2,
            "renorm": True,
            "renorm_clipping": {"rmax": 1.5, "dmax": 0.5},
        },
        shape=(8, 3, 3, 4),
    ),
    "adjustment": dict(kwargs={}, shape=(6, 4, 4, 3), adjustment=True),
    "trainable_false": dict(kwargs={"trainable": False}, shape=IMG),
    "float16": dict(kwargs={"dtype": "float16"}, shape=IMG, dtype="float16"),
    "tiny_epsilon": dict(kwargs={"epsilon": 1e-10, "fused": False}, shape=IMG),
    # Extra: same epsilon on the fused path, with a tiny batch variance, to
    # show whether the fused kernel clamps epsilon (cuDNN needs >= 1e-5).
    "tiny_epsilon_fused": dict(
        kwargs={"epsilon": 1e-10},
        shape=IMG,
        x=small_x,
        init={
            "moving_mean": lambda rng, shape, d: 0.3 + 1e-3 * rng.normal(size=shape),
            "moving_variance": lambda rng, shape, d: rng.uniform(0.5e-6, 2e-6, shape),
        },
    ),
    "ill_conditioned": dict(
        kwargs={},
        shape=(8, 4, 4, 3),
        x=ill_conditioned_x,
        init={
            "moving_mean": lambda rng, shape, d: 1000.0 + 0.01 * rng.normal(size=shape),
            "moving_variance": lambda rng, shape, d: rng.uniform(0.5e-4, 2e-4, shape),
        },
    ),
    "momentum_variants": dict(kwargs={"momentum": 0.5, "epsilon": 0.01}, shape=IMG),
}

# Constructions that must fail: (name, kwargs, input shape, expected message part).
ERROR_PROBES = [
    ("fused_true_renorm", {"fused": True, "renorm": True}, IMG,
     "Passing both `fused=True` and `renorm=True` is not supported"),
    ("fused_true_virtual_batch", {"fused": True, "virtual_batch_size": 2}, IMG,
     "Passing `fused=True` is not supported when `virtual_batch_size` is specified"),
    ("fused_true_multi_axis", {"fused": True, "axis": [1, 3]}, IMG,
     "Passing `fused=True` is only supported when axis is 1 or 3"),
    ("fused_true_rank3", {"fused": True}, (4, 7, 3),
     "only support 4D or 5D input tensors"),
    ("renorm_clipping_bad_key", {"renorm": True, "renorm_clipping": {"rmaxx": 2.0}}, IMG,
     "Received invalid keys for `renorm_clipping` argument"),
    ("virtual_batch_axis0", {"virtual_batch_size": 2, "axis": 0}, (8, 3),
     "axis cannot include 0"),
    ("virtual_batch_adjustment", {"virtual_batch_size": 2, "adjustment": True}, IMG,
     "adjustment cannot be specified"),
    # Raised at call time, by the reshape to [virtual_batch_size, -1, ...].
    ("virtual_batch_not_dividing", {"virtual_batch_size": 3}, (8, 3, 3, 4),
     "requested shape requires a multiple of"),
]


# --------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------
def short_name(variable):
    return variable.name.split("/")[-1].split(":")[0]


def json_default(obj):
    # get_config contains tf trackable wrappers (ListWrapper, _DictWrapper).
    if isinstance(obj, collections.abc.Mapping):
        return dict(obj)
    if isinstance(obj, collections.abc.Sequence):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


def make_adjustment(rng, channels):
    adj_scale = rng.uniform(0.5, 1.5, size=(channels,)).astype(np.float32)
    adj_bias = rng.normal(0.0, 0.5, size=(channels,)).astype(np.float32)
    fn = lambda shape: (tf.constant(adj_scale), tf.constant(adj_bias))  # noqa: E731
    return fn, adj_scale, adj_bias


def build_layer(kwargs, shape, adjustment=None):
    keras.backend.clear_session()  # stable layer name "batch_normalization"
    kwargs = dict(kwargs)
    if adjustment is not None:
        kwargs["adjustment"] = adjustment
    layer = keras.layers.BatchNormalization(**kwargs)
    layer.build(shape)
    return layer


def forward_backward(layer, x, dy, training, dtype):
    """One call under a tape; returns y, dx and {dgamma, dbeta} where trainable."""
    x_t = tf.constant(x, dtype=dtype)
    dy_t = tf.constant(dy, dtype=dtype)
    params = {}
    if layer.trainable:
        if layer.gamma is not None:
            params["dgamma"] = layer.gamma
        if layer.beta is not None:
            params["dbeta"] = layer.beta
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        y = layer(x_t, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy_t, tf.float32))
    grads = tape.gradient(loss, [x_t] + list(params.values()))
    out = {"y": y.numpy(), "dx": grads[0].numpy()}
    for key, g in zip(params, grads[1:]):
        out[key] = g.numpy()
    return out


def run_case(name, spec):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape, dtype = spec["shape"], spec.get("dtype", "float32")
    draw_x = spec.get("x", default_x)
    kwargs = spec["kwargs"]
    config = dict(kwargs)
    arrays = {}

    adjustment = None
    if spec.get("adjustment"):
        axis = kwargs.get("axis", -1)
        adjustment, arrays["adj_scale"], arrays["adj_bias"] = make_adjustment(
            rng, shape[axis]
        )
        config["adjustment"] = True

    layer = build_layer(kwargs, shape, adjustment)
    names = [short_name(w) for w in layer.weights]
    arrays["config_json"] = np.array(json.dumps(config))
    arrays["keras_config_json"] = np.array(
        json.dumps(layer.get_config(), default=json_default)
    )
    arrays["weight_names"] = np.array(names)
    arrays["n_steps"] = np.array(N_STEPS)

    overrides = spec.get("init", {})
    drawn = {}
    for wname, current in zip(names, layer.get_weights()):
        init = overrides.get(wname, lambda r, s, d, n=wname: default_init(r, n, s, d))
        drawn[wname] = np.asarray(init(rng, current.shape, drawn), np.float64)
    init_values = [drawn[n].astype(w.dtype) for n, w in zip(names, layer.get_weights())]
    layer.set_weights(init_values)
    for wname, value in zip(names, layer.get_weights()):
        arrays[f"init_{wname}"] = value

    for step in range(N_STEPS):
        x = draw_x(rng, shape).astype(dtype)
        dy = rng.normal(0.0, 1.0, size=shape).astype(dtype)
        out = forward_backward(layer, x, dy, training=True, dtype=dtype)
        arrays[f"x_{step}"], arrays[f"dy_{step}"] = x, dy
        for key, value in out.items():
            arrays[f"{key}_{step}"] = value
        for wname, value in zip(names, layer.get_weights()):
            arrays[f"state_{step}_{wname}"] = value

    x = draw_x(rng, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, size=shape).astype(dtype)
    out = forward_backward(layer, x, dy, training=False, dtype=dtype)
    arrays["x_infer"], arrays["dy_infer"] = x, dy
    arrays["y_infer"], arrays["dx_infer"] = out["y"], out["dx"]
    return arrays


# --------------------------------------------------------------------------
# Checks and reports
# --------------------------------------------------------------------------
def renorm_batch_stats(x, virtual_batch_size):
    """Per-channel batch mean and biased variance (channels last), as renorm sees
    them: with ghost batches, the average over ghost batches (strided split)."""
    x = x.astype(np.float64)
    if virtual_batch_size:
        x = x.reshape((virtual_batch_size, -1) + x.shape[1:])
        axes = (0,) + tuple(range(2, x.ndim - 1))
        return x.mean(axes).mean(0), x.var(axes).mean(0)
    axes = tuple(range(x.ndim - 1))
    return x.mean(axes), x.var(axes)


def renorm_clip_report(arrays, kwargs):
    """Recompute r and d (before clipping) per step; count clipped / free values
    and the smallest distance of any r or d to a clipping bound."""
    clipping, eps = kwargs["renorm_clipping"], kwargs.get("epsilon", 1e-3)
    dmax = clipping.get("dmax")
    bounds = {"r": (clipping.get("rmin"), clipping.get("rmax")),
              "d": (None if dmax is None else -dmax, dmax)}
    def state(prefix, n):
        return arrays[f"{prefix}{n}"].reshape(-1).astype(np.float64)
    prefix = "init_"
    clipped = free = 0
    margin = np.inf
    for step in range(int(arrays["n_steps"])):
        mean, var = renorm_batch_stats(arrays[f"x_{step}"], kwargs.get("virtual_batch_size"))
        s = np.maximum(state(prefix, "renorm_stddev"), np.sqrt(eps))
        values = {"r": np.sqrt(var + eps) / s, "d": (mean - state(prefix, "renorm_mean")) / s}
        for key, v in values.items():
            lo, hi = bounds[key]
            lo = -np.inf if lo is None else lo
            hi = np.inf if hi is None else hi
            outside = (v < lo) | (v > hi)
            clipped += int(outside.sum())
            free += int((~outside).sum())
            dist = np.minimum(np.abs(v - lo), np.abs(v - hi))
            margin = min(margin, float(dist.min()))
        prefix = f"state_{step}_"
    return clipped, free, margin


def condense(message):
    """One line: drop TF's 'Call arguments received' trailer and blank lines."""
    message = message.split("Call arguments received")[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def error_probes():
    """Build each probe; return [(name, kwargs, shape, message)]; assert it fails."""
    results = []
    for name, kwargs, shape, expected in ERROR_PROBES:
        kwargs = dict(kwargs)
        if kwargs.get("adjustment"):
            kwargs["adjustment"] = lambda s: (tf.ones([shape[-1]]), tf.zeros([shape[-1]]))
        try:
            layer = build_layer(kwargs, shape)
            layer(tf.zeros(shape), training=True)
        except Exception as exc:  # noqa: BLE001 - we record whatever Keras raises
            message = condense(f"{type(exc).__name__}: {exc}")
        else:
            raise AssertionError(f"error probe {name} did not raise")
        if expected is not None:
            assert expected in message, (name, message)
        results.append((name, kwargs, shape, message))
    return results


def write_errors(case_failures, probes):
    lines = [
        "# Keras BatchNormalization errors (generated by make_keras_golden.py)",
        "",
        f"tensorflow {tf.__version__}, tf_keras {keras.__version__}. "
        "Machine-readable copy: data/errors.json.",
        "",
        "## Golden cases that could not be built",
        "",
    ]
    if case_failures:
        lines += [f"- `{n}`: ``{m}``" for n, m in case_failures]
    else:
        lines.append("None: every case in CASES produced an npz.")
    lines += ["", "## Error probes (constructions Keras rejects)", ""]
    records = []
    for name, kwargs, shape, message in probes:
        shown = {k: (True if k == "adjustment" else v) for k, v in kwargs.items()}
        lines.append(f"- `{name}`: kwargs `{json.dumps(shown)}`, input {tuple(shape)}"
                     f"\n  -> ``{message}``")
        records.append({"name": name, "kwargs": shown, "shape": list(shape),
                        "error": message})
    records += [{"name": n, "case_failure": True, "error": m} for n, m in case_failures]
    ERRORS_MD.write_text("\n".join(lines) + "\n")
    (DATA_DIR / "errors.json").write_text(json.dumps(records, indent=1) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="subset of case names (default: all)")
    args = parser.parse_args()

    versions = {"tensorflow": tf.__version__, "tf_keras": keras.__version__}
    if versions != EXPECTED_VERSIONS:
        print(f"WARNING: running with {versions}, goldens were made with {EXPECTED_VERSIONS}")
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    DATA_DIR.mkdir(parents=True, exist_ok=True)

    failures = []
    for name in args.cases or CASES:
        spec = CASES[name]
        try:
            arrays = run_case(name, spec)
        except Exception as exc:  # noqa: BLE001 - recorded in ERRORS.md
            failures.append((name, condense(f"{type(exc).__name__}: {exc}")))
            print(f"{name:20s} FAILED: {failures[-1][1]}")
            continue
        path = DATA_DIR / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{name:20s} {path.stat().st_size / 1024:6.1f} KB  "
              f"weights={arrays['weight_names'].tolist()}")
        if spec["kwargs"].get("renorm_clipping"):
            clipped, free, margin = renorm_clip_report(arrays, spec["kwargs"])
            print(f"{'':20s} renorm clipping: {clipped} r/d values clipped, "
                  f"{free} not clipped, closest to a bound: {margin:.3g}")
    if not args.cases:
        write_errors(failures, error_probes())


if __name__ == "__main__":
    main()
