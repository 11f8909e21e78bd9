"""Keras's initializers, regularizers and constraints for ``keras.BatchNormalization`` (the
``torch.nn.Module`` port of Keras 2), with Keras's (de)serialization.

The objects the layer's constructor takes by name or config dict (``"zeros"``, ``"l2"``,
``{"class_name": "MaxNorm", "config": {...}}``) are small serializable classes here, so the
layer works without Keras installed. Objects of Keras 3 itself (``keras.initializers.*``,
``keras.regularizers.*``, ``keras.constraints.*``) are used as they are when ``keras`` is installed
and runs on the torch backend; so are names and configs this module does not know.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "Constant",
    "Constraint",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "Ones",
    "RandomNormal",
    "RandomUniform",
    "Regularizer",
    "TruncatedNormal",
    "UnitNorm",
    "VarianceScaling",
    "Zeros",
    "get_constraint",
    "get_initializer",
    "get_regularizer",
    "is_keras3_object",
    "keras_on_torch",
    "serialize",
]


# ---------------------------------------------------------------------------------------------
# Keras objects: initializers, regularizers, constraints
# ---------------------------------------------------------------------------------------------
class KerasObject:
    """Base of the serializable Keras objects: ``get_config()`` holds the constructor kwargs."""

    module = "keras"

    def __init__(self, **config: Any):
        self.config = config

    def get_config(self) -> dict:
        return dict(self.config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """Keras's ``_compute_fans``."""
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class Initializer(KerasObject):
    """``init(shape, dtype, device) -> Tensor``; random ones draw from torch's RNG (or ``seed``)."""

    module = "keras.initializers"

    def __call__(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        seed = self.config.get("seed")
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        out = torch.empty(tuple(shape), dtype=torch.float32)
        return self.fill(out, tuple(shape), gen).to(dtype=dtype, device=device)

    def fill(self, out: torch.Tensor, shape: tuple, gen) -> torch.Tensor:
        raise NotImplementedError


class Zeros(Initializer):
    def fill(self, out, shape, gen):
        return out.zero_()


class Ones(Initializer):
    def fill(self, out, shape, gen):
        return out.fill_(1.0)


class Constant(Initializer):
    def __init__(self, value: float = 0):
        super().__init__(value=value)

    def fill(self, out, shape, gen):
        return out.copy_(torch.as_tensor(self.config["value"], dtype=out.dtype).expand(shape))


class RandomNormal(Initializer):
    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        super().__init__(mean=mean, stddev=stddev, seed=seed)

    def fill(self, out, shape, gen):
        return out.normal_(self.config["mean"], self.config["stddev"], generator=gen)


class RandomUniform(Initializer):
    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None):
        super().__init__(minval=minval, maxval=maxval, seed=seed)

    def fill(self, out, shape, gen):
        return out.uniform_(self.config["minval"], self.config["maxval"], generator=gen)


class TruncatedNormal(Initializer):
    """Normal, redrawn outside two standard deviations (as Keras)."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        super().__init__(mean=mean, stddev=stddev, seed=seed)

    def fill(self, out, shape, gen):
        m, s = self.config["mean"], self.config["stddev"]
        return nn.init.trunc_normal_(out, m, s, m - 2 * s, m + 2 * s, generator=gen)


class VarianceScaling(Initializer):
    def __init__(self, scale: float = 1.0, mode: str = "fan_in",
                 distribution: str = "truncated_normal", seed: int | None = None):
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"VarianceScaling: mode must be fan_in, fan_out or fan_avg, got "
                             f"{mode!r}")
        if distribution not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ValueError("VarianceScaling: distribution must be truncated_normal, "
                             f"untruncated_normal or uniform, got {distribution!r}")
        super().__init__(scale=scale, mode=mode, distribution=distribution, seed=seed)
        self.scaling = (scale, mode, distribution)

    def fill(self, out, shape, gen):
        scale, mode, distribution = self.scaling
        fan_in, fan_out = _fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        var = scale / max(1.0, fan)
        if distribution == "uniform":
            limit = math.sqrt(3.0 * var)
            return out.uniform_(-limit, limit, generator=gen)
        if distribution == "untruncated_normal":
            return out.normal_(0.0, math.sqrt(var), generator=gen)
        s = math.sqrt(var) / 0.87962566103423978
        return nn.init.trunc_normal_(out, 0.0, s, -2 * s, 2 * s, generator=gen)


def _scaling(name: str, scale: float, mode: str, distribution: str) -> type:
    """A named VarianceScaling preset (GlorotUniform, HeNormal, ...) whose config is the seed."""

    def __init__(self, seed: int | None = None):
        VarianceScaling.__init__(self, scale, mode, distribution, seed)
        self.config = {"seed": seed}

    doc = f"VarianceScaling(scale={scale}, mode={mode!r}, distribution={distribution!r})."
    return type(name, (VarianceScaling,), {"__init__": __init__, "__doc__": doc})


GlorotUniform = _scaling("GlorotUniform", 1.0, "fan_avg", "uniform")
GlorotNormal = _scaling("GlorotNormal", 1.0, "fan_avg", "truncated_normal")
HeUniform = _scaling("HeUniform", 2.0, "fan_in", "uniform")
HeNormal = _scaling("HeNormal", 2.0, "fan_in", "truncated_normal")
LecunUniform = _scaling("LecunUniform", 1.0, "fan_in", "uniform")
LecunNormal = _scaling("LecunNormal", 1.0, "fan_in", "truncated_normal")


def _float32(v: float) -> float:
    """``v`` rounded to float32 (Keras keeps regularization factors as float32)."""
    return torch.tensor(v, dtype=torch.float32).item()


class Regularizer(KerasObject):
    """``reg(weight) -> scalar tensor`` added to the loss. Factors are float32, as in Keras."""

    module = "keras.regularizers"

    def __init__(self, **factors: float):
        for k, v in factors.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{type(self).__name__}: {k}={v!r} is not a valid "
                                 "regularization penalty number, expected an int or float value")
        super().__init__(**{k: _float32(v) for k, v in factors.items()})

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        loss = w.new_zeros(())
        if self.config.get("l1"):
            loss = loss + self.config["l1"] * w.abs().sum()
        if self.config.get("l2"):
            loss = loss + self.config["l2"] * w.square().sum()
        return loss


class L1(Regularizer):
    def __init__(self, l1: float = 0.01):
        super().__init__(l1=l1)


class L2(Regularizer):
    def __init__(self, l2: float = 0.01):
        super().__init__(l2=l2)


class L1L2(Regularizer):
    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        super().__init__(l1=l1, l2=l2)


class Constraint(KerasObject):
    """``c(weight) -> projected weight``; the norms reduce over ``axis`` (Keras's default 0)."""

    module = "keras.constraints"
    EPS = 1e-7  # keras.backend.epsilon()

    def _rescale(self, w: torch.Tensor, lo: float, hi: float, rate: float = 1.0) -> torch.Tensor:
        norms = w.square().sum(dim=self.config["axis"], keepdim=True).sqrt()
        desired = rate * norms.clamp(lo, hi) + (1 - rate) * norms
        return w * (desired / (self.EPS + norms))


class NonNeg(Constraint):
    def __call__(self, w):
        return w * (w >= 0).to(w.dtype)


class UnitNorm(Constraint):
    def __init__(self, axis: int = 0):
        super().__init__(axis=axis)

    def __call__(self, w):
        return w / (self.EPS + w.square().sum(dim=self.config["axis"], keepdim=True).sqrt())


class MaxNorm(Constraint):
    def __init__(self, max_value: float = 2, axis: int = 0):
        super().__init__(max_value=max_value, axis=axis)

    def __call__(self, w):
        return self._rescale(w, 0.0, self.config["max_value"])


class MinMaxNorm(Constraint):
    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0,
                 axis: int = 0):
        super().__init__(min_value=min_value, max_value=max_value, rate=rate, axis=axis)

    def __call__(self, w):
        c = self.config
        return self._rescale(w, c["min_value"], c["max_value"], c["rate"])


_INITIALIZERS = {c.__name__: c for c in (
    Zeros, Ones, Constant, RandomNormal, RandomUniform, TruncatedNormal, VarianceScaling,
    GlorotUniform, GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal)}
_INITIALIZERS.update(zeros=Zeros, ones=Ones, constant=Constant, random_normal=RandomNormal,
                     random_uniform=RandomUniform, truncated_normal=TruncatedNormal,
                     variance_scaling=VarianceScaling, glorot_uniform=GlorotUniform,
                     glorot_normal=GlorotNormal, he_uniform=HeUniform, he_normal=HeNormal,
                     lecun_uniform=LecunUniform, lecun_normal=LecunNormal)
_REGULARIZERS = {"L1": L1, "L2": L2, "L1L2": L1L2, "l1": L1, "l2": L2,
                 "l1_l2": lambda l1=0.01, l2=0.01: L1L2(l1, l2)}
_CONSTRAINTS = {c.__name__: c for c in (NonNeg, UnitNorm, MaxNorm, MinMaxNorm)}
_CONSTRAINTS.update(non_neg=NonNeg, nonneg=NonNeg, unit_norm=UnitNorm, unitnorm=UnitNorm,
                    max_norm=MaxNorm, maxnorm=MaxNorm, min_max_norm=MinMaxNorm)


_KERAS_MODULES = {"initializer": "initializers", "regularizer": "regularizers",
                  "constraint": "constraints"}


def keras_on_torch():
    """The ``keras`` module when Keras 3 is usable on the torch backend, else None. Keras is
    imported only if it already is or if ``KERAS_BACKEND=torch`` (importing it otherwise would
    pick another backend, or fail, for the whole process)."""
    keras = sys.modules.get("keras")
    if keras is None and os.environ.get("KERAS_BACKEND") == "torch":
        try:
            import keras
        except ImportError:
            return None
    if keras is None or not hasattr(keras, "backend") or keras.backend.backend() != "torch":
        return None
    return keras


def is_keras3_object(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 initializer, regularizer or constraint."""
    keras = sys.modules.get("keras")
    major = str(getattr(keras, "__version__", "0")).split(".")[0]
    if keras is None or not major.isdigit() or int(major) < 3:  # Keras 2's objects are TF's
        return False
    return isinstance(obj, (keras.initializers.Initializer, keras.regularizers.Regularizer,
                            keras.constraints.Constraint))


def _from_keras(identifier, kind: str, arg: str, custom_objects: dict | None):
    """Keras 3's own object for a name or config this module does not know; None without Keras
    on the torch backend."""
    keras = keras_on_torch()
    if keras is None:
        return None
    try:
        with keras.saving.CustomObjectScope(custom_objects or {}):
            return getattr(keras, _KERAS_MODULES[kind]).get(identifier)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{arg}: Keras could not interpret {kind} {identifier!r}: {exc}") from None


def _get(identifier, table: dict, kind: str, arg: str, custom_objects: dict | None):
    """Keras's ``get``: None, a name, a ``{"class_name", "config"}`` dict, or a callable (Keras 3
    objects included, on the torch backend). Names and configs this module knows give its own
    objects (tf_keras 2's configs, torch's RNG); others are Keras 3's when it is available."""
    if identifier is None:
        return None
    if callable(identifier):
        if is_keras3_object(identifier) and keras_on_torch() is None:
            raise ValueError(f"{arg}: Keras 3 {kind}s compute with Keras's backend ops, which "
                             "must be torch here (set KERAS_BACKEND=torch before importing keras)")
        return identifier() if isinstance(identifier, type) else identifier
    lookup = {**table, **(custom_objects or {})}
    if isinstance(identifier, str):
        name, config = identifier, {}
    elif isinstance(identifier, dict) and "class_name" in identifier:
        name, config = identifier["class_name"], identifier.get("config") or {}
        if name == "function" and isinstance(config, str):  # a serialized plain function
            name, config = config, None
    else:
        raise TypeError(f"{arg}: could not interpret {kind} identifier {identifier!r}: expected "
                        f"a name, a {{'class_name', 'config'}} dict or a callable")
    if name not in lookup:
        keras_object = _from_keras(identifier, kind, arg, custom_objects)
        if keras_object is not None:
            return keras_object
        raise ValueError(f"{arg}: unknown {kind} {name!r}; known: "
                         f"{sorted(k for k in table if k[0].islower())} (or pass it in "
                         "custom_objects, or install keras and set KERAS_BACKEND=torch)")
    obj = lookup[name]
    if config is None:
        return obj
    if not isinstance(config, dict):
        raise TypeError(f"{arg}: the config of {kind} {name!r} must be a dict, got {config!r}")
    try:
        return obj(**config)
    except (TypeError, ValueError) as exc:
        # e.g. Keras 3's HeNormal config, which adds input_axes/output_axes to tf_keras's
        keras_object = _from_keras(identifier, kind, arg, custom_objects) if isinstance(
            exc, TypeError) else None
        if keras_object is not None:
            return keras_object
        raise type(exc)(f"{arg}: bad config for {kind} {name!r}: {exc}") from None


def get_initializer(identifier, arg: str = "initializer", custom_objects=None):
    """An initializer from a Keras name ("zeros", "random_normal", ...), a config dict or a
    callable ``f(shape, dtype=...)``."""
    if identifier is None:
        raise ValueError(f"{arg}: an initializer is required, got None")
    return _get(identifier, _INITIALIZERS, "initializer", arg, custom_objects)


def get_regularizer(identifier, arg: str = "regularizer", custom_objects=None):
    """A regularizer from "l1", "l2", "l1_l2", a config dict, a callable ``f(w) -> scalar``, or
    None."""
    return _get(identifier, _REGULARIZERS, "regularizer", arg, custom_objects)


def get_constraint(identifier, arg: str = "constraint", custom_objects=None):
    """A constraint from "non_neg", "unit_norm", "max_norm", "min_max_norm", a config dict, a
    callable ``f(w) -> w``, or None."""
    return _get(identifier, _CONSTRAINTS, "constraint", arg, custom_objects)


def serialize(obj) -> dict | None:
    """Keras's ``serialize_keras_object``: a JSON-friendly dict (None stays None). A plain
    function is saved by name (restore it with ``from_config(..., custom_objects=...)``)."""
    if obj is None:
        return None
    if is_keras3_object(obj):
        return sys.modules["keras"].saving.serialize_keras_object(obj)
    if hasattr(obj, "get_config"):
        module = getattr(obj, "module", type(obj).__module__)
        return {"module": module, "class_name": type(obj).__name__, "config": obj.get_config(),
                "registered_name": None if isinstance(obj, KerasObject) else type(obj).__name__}
    name = getattr(obj, "__name__", type(obj).__name__)
    return {"module": getattr(obj, "__module__", None), "class_name": "function", "config": name,
            "registered_name": name}
