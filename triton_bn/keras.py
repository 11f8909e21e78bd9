"""tf.keras (Keras 2, tf-keras 2.21) ``BatchNormalization`` as a ``torch.nn.Module``.

Same constructor, defaults, weights (names, shapes, ``get_weights()`` order), config and errors as
tf_keras; every statistic runs in the fused Triton kernels through ``functional.normalize``
(renorm r/d clipping, strided ghost batches and adjustment included). The Keras objects the
constructor takes by name (initializers, regularizers, constraints) come from ``keras_objects``;
plain callables and Keras 3's own objects work too. numpy is needed only by ``get_weights`` /
``set_weights``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .distributed import sync_normalize
from .functional import Renorm, RunningStats, normalize
from .keras_objects import get_constraint, get_initializer, get_regularizer, serialize
from .layout import normalize_axes

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BatchNormalization",
    "get_constraint",
    "get_initializer",
    "get_regularizer",
    "serialize",
]


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
# Keras dtype policy name -> (compute dtype, parameter dtype); fp16/bf16 layers keep fp32 weights.
_POLICIES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "float16": (torch.float16, torch.float32),
    "bfloat16": (torch.bfloat16, torch.float32),
    "mixed_float16": (torch.float16, torch.float32),
    "mixed_bfloat16": (torch.bfloat16, torch.float32),
}
_CLIP_KEYS = ["rmax", "rmin", "dmax"]
_OBJECT_ARGS = {f"{w}_{kind}": get for kind, get in (("initializer", get_initializer),
                                                      ("regularizer", get_regularizer),
                                                      ("constraint", get_constraint))
                for w in ("beta", "gamma", "moving_mean", "moving_variance")
                if kind == "initializer" or w in ("beta", "gamma")}
_NAME_UIDS: dict[str, int] = {}


def _policy_name(dtype) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if isinstance(dtype, dict):  # a serialized mixed-precision Policy
        dtype = (dtype.get("config") or {}).get("name")
    if dtype not in _POLICIES:
        raise ValueError(f"dtype must be one of {sorted(_POLICIES)} or a torch float dtype, "
                         f"got {dtype!r}")
    return dtype


def _unique_name(base: str) -> str:
    n = _NAME_UIDS.get(base, 0)
    _NAME_UIDS[base] = n + 1
    return base if n == 0 else f"{base}_{n}"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """A weight as the kernels take it: a [K] view (same storage, so in-place updates land)."""
    return None if t is None else t.view(-1)


def _as_array(w: Any) -> Any:
    """A numpy array from an array-like (numpy is imported only here and in get_weights)."""
    import numpy

    return numpy.asarray(w)


def _layer_error(name: str, detail: str) -> ValueError:
    return ValueError(f'Input 0 of layer "{name}" is incompatible with the layer: {detail}')


class BatchNormalization(nn.Module):
    """tf.keras ``BatchNormalization`` (Keras 2): same arguments, defaults, weights and maths.

    ``layer(x, training=None)``: training=True normalizes with the batch statistics and updates
    the moving statistics in place (Keras momentum: ``moving = moving * momentum + batch *
    (1 - momentum)``); training=False uses the moving statistics. **training=None follows
    ``module.training`` (the PyTorch convention, so a fresh module trains; Keras would infer).**
    ``trainable=False`` forces inference and freezes gamma/beta. The weights are created on the
    first call, or by ``build(input_shape)``. ``dtype`` is the Keras compute dtype ("float16",
    "bfloat16": half-precision input/output, float32 weights); the input is cast to it.
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        trainable: bool = True,
        virtual_batch_size: int | None = None,
        adjustment: Callable | None = None,
        name: str | None = None,
        synchronized: bool = False,
        *,
        dtype: Any = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        if not (type(axis) is int or axis and isinstance(axis, list)
                and all(type(a) is int for a in axis)):
            raise TypeError("Expected an int or a list/tuple of ints for the argument 'axis', "
                            f"but received: {axis!r}")
        if not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        if virtual_batch_size is not None and (type(virtual_batch_size) is not int
                                               or virtual_batch_size <= 0):
            raise ValueError("`virtual_batch_size` must be a positive integer that divides the "
                             f"true batch size of the input tensor. Received: "
                             f"virtual_batch_size={virtual_batch_size!r}")
        if virtual_batch_size is not None and adjustment is not None:
            raise ValueError("When using `virtual_batch_size`, adjustment cannot be specified")
        if adjustment is not None and not callable(adjustment):
            raise TypeError(f"adjustment must be a callable f(input_shape) -> (scale, bias), got "
                            f"{adjustment!r}")
        self.axis = axis
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer = get_initializer(beta_initializer, "beta_initializer")
        self.gamma_initializer = get_initializer(gamma_initializer, "gamma_initializer")
        self.moving_mean_initializer = get_initializer(moving_mean_initializer,
                                                       "moving_mean_initializer")
        self.moving_variance_initializer = get_initializer(moving_variance_initializer,
                                                           "moving_variance_initializer")
        self.beta_regularizer = get_regularizer(beta_regularizer, "beta_regularizer")
        self.gamma_regularizer = get_regularizer(gamma_regularizer, "gamma_regularizer")
        self.beta_constraint = get_constraint(beta_constraint, "beta_constraint")
        self.gamma_constraint = get_constraint(gamma_constraint, "gamma_constraint")
        self.renorm = bool(renorm)
        self.renorm_clipping: dict = {}
        self.renorm_momentum = float(renorm_momentum)
        if self.renorm:
            clipping = dict(renorm_clipping or {})
            if set(clipping) - set(_CLIP_KEYS):
                raise ValueError("Received invalid keys for `renorm_clipping` argument: "
                                 f"{clipping}. Supported values: {_CLIP_KEYS}.")
            rmin, rmax = clipping.get("rmin"), clipping.get("rmax")
            if rmin is not None and rmax is not None and rmin > rmax:
                raise ValueError(f"renorm_clipping: rmin={rmin} must not exceed rmax={rmax}")
            self.renorm_clipping = clipping
        self.virtual_batch_size = virtual_batch_size
        self.adjustment = adjustment
        self.synchronized = bool(synchronized)
        self.dtype_policy = _policy_name(dtype)
        self.compute_dtype, self.param_dtype = _POLICIES[self.dtype_policy]
        self.device = torch.device(device) if device is not None else None
        self.name = name if name is not None else _unique_name("batch_normalization")
        if synchronized and fused:
            raise ValueError("`fused=True` is not supported when `synchronized=True`.")
        if fused:
            self._raise_if_fused_cannot_be_used()
        elif fused is None and (self.synchronized or not self._fused_can_be_used()):
            fused = False
        self.fused = fused
        self._trainable = bool(trainable)
        self.built = False
        self._keras_axis: list[int] | None = None  # Keras's resolved axis, set by build
        self.input_rank: int | None = None
        self._axes: tuple[int, ...] = ()  # sorted positive channel axes of the input
        self._channels: dict[int, int] = {}
        for pname in ("gamma", "beta"):
            self.register_parameter(pname, None)
        for bname in ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
                      "renorm_stddev"):
            self.register_buffer(bname, None)  # None (left out of state_dict) until build

    # -- Keras's fused-path rules: only the moving variance (unbiased there) depends on them --
    def _raise_if_fused_cannot_be_used(self) -> None:
        if self.renorm:
            raise ValueError("Passing both `fused=True` and `renorm=True` is not supported")
        axis = [self.axis] if isinstance(self.axis, int) else self.axis
        if len(axis) > 1 or axis[0] not in (-4, -3, -1, 1, 3, 4):
            raise ValueError("Passing `fused=True` is only supported when axis is 1 or 3 for "
                             "input rank = 4 or 1 or 4 for input rank = 5. Got axis "
                             f"{axis}")
        if self.virtual_batch_size is not None:
            raise ValueError("Passing `fused=True` is not supported when `virtual_batch_size` is "
                             "specified.")
        if self.adjustment is not None:
            raise ValueError("Passing `fused=True` is not supported when `adjustment` is "
                             "specified.")
        if self.compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError("Passing `fused=True` is only supported when the compute dtype "
                             f"is float16, bfloat16, or float32. Got dtype: {self.dtype_policy}")

    def _fused_can_be_used(self) -> bool:
        try:
            self._raise_if_fused_cannot_be_used()
        except ValueError:
            return False
        return True

    def _state_names(self) -> list[str]:
        extra = ["moving_stddev", "renorm_mean", "renorm_stddev"] if self.renorm else []
        return ["moving_mean", "moving_variance"] + extra

    @property
    def trainable(self) -> bool:
        """False: inference whatever ``training`` says, and gamma/beta frozen."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        for p in (self.gamma, self.beta):
            if p is not None:
                p.requires_grad_(self._trainable)

    # -- build --------------------------------------------------------------------------------
    def _plan(self, input_shape: Sequence[int | None]) -> dict:
        """Checks ``input_shape`` (as Keras's build does) and returns what build would set;
        changes nothing."""
        shape = tuple(None if d is None else int(d) for d in input_shape)
        rank = len(shape)
        if rank < 2:
            raise ValueError("input_shape must have rank >= 2 (a batch dimension and channels), "
                             f"got {shape}")
        axes = normalize_axes(self.axis, rank)
        keras_axis = [a % rank for a in ([self.axis] if isinstance(self.axis, int) else self.axis)]
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError("When using `virtual_batch_size`, the batch dimension must be 0 and "
                             f"thus axis cannot include 0. Received axis={keras_axis}")
        fused = self.fused
        if fused in (None, True):
            if fused and rank not in (4, 5):
                raise ValueError("Batch normalization layers with `fused=True` only support 4D "
                                 f"or 5D input tensors. Received tensor with shape: {shape}")
            fused = rank in (4, 5)
        if fused and keras_axis not in ([1], [rank - 1]):
            if rank == 4:
                raise ValueError("Unsupported axis. The use of `fused=True` is only possible "
                                 "with `axis=1` or `axis=3` for 4D input tensors. Received: "
                                 f"axis={tuple(keras_axis)}")
            fused = False
        channels = {a: shape[a] for a in keras_axis}
        if any(c is None for c in channels.values()):
            raise ValueError("Axis value(s) must be known (not None): input_shape="
                             f"{shape}, axis={keras_axis}")
        if len(channels) == 1 and self.virtual_batch_size is None:
            param_shape = (shape[axes[0]],)
        else:
            param_shape = tuple(shape[d] if d in axes else 1 for d in range(rank))
            if self.virtual_batch_size is not None:
                param_shape = param_shape[:1] + (1,) + param_shape[1:]
        return {"rank": rank, "axes": axes, "keras_axis": keras_axis, "channels": channels,
                "param_shape": param_shape, "fused": fused}

    def build(self, input_shape: Sequence[int | None],
              device: torch.device | str | None = None) -> None:
        """Creates the weights for inputs of ``input_shape`` (None allowed outside the channel
        axes), on ``device`` (default: the constructor's ``device``, else CPU)."""
        if self.built:
            return
        plan = self._plan(input_shape)
        device = self.device or (torch.device(device) if device is not None else None)
        with torch.inference_mode(False):  # a first call under inference_mode builds normal tensors
            self._create_weights(plan, device)

    def _create_weights(self, plan: dict, device: torch.device | None) -> None:
        pshape = plan["param_shape"]

        def make(init, sqrt=False):
            value = torch.as_tensor(init(pshape, dtype=self.param_dtype))
            value = value.to(dtype=self.param_dtype, device=device).reshape(pshape).contiguous()
            return value.sqrt() if sqrt else value

        if self.scale:
            self.gamma = nn.Parameter(make(self.gamma_initializer), self._trainable)
        if self.center:
            self.beta = nn.Parameter(make(self.beta_initializer), self._trainable)
        self.moving_mean = make(self.moving_mean_initializer)
        self.moving_variance = make(self.moving_variance_initializer)
        if self.renorm:
            # as Keras: the stddevs start at sqrt(moving_variance_initializer(...)), each drawn anew
            self.moving_stddev = make(self.moving_variance_initializer, sqrt=True)
            self.renorm_mean = make(self.moving_mean_initializer)
            self.renorm_stddev = make(self.moving_variance_initializer, sqrt=True)
        self.input_rank, self._axes = plan["rank"], plan["axes"]
        self._keras_axis, self._channels = plan["keras_axis"], plan["channels"]
        self.fused = plan["fused"]
        self.built = True

    def _check_input(self, shape: Sequence[int]) -> None:
        """Keras's InputSpec: same rank and channel sizes as at build."""
        if len(shape) != self.input_rank:
            raise _layer_error(self.name, f"expected ndim={self.input_rank}, found "
                               f"ndim={len(shape)}. Full shape received: {tuple(shape)}")
        for a, c in self._channels.items():
            if shape[a] != c:
                raise _layer_error(self.name, f"expected axis {a} of input shape to have value "
                                   f"{c}, but received input with shape {tuple(shape)}")

    # -- call -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, training: bool | None = None) -> torch.Tensor:
        """Normalizes ``x`` (any rank); see the class docstring for ``training``."""
        x = torch.as_tensor(x)
        training = self.training if training is None else bool(training)
        training = training and self._trainable
        plan = None
        if self.built:
            self._check_input(x.shape)
        else:
            plan = self._plan(x.shape)
            if self.device is not None and not _same_device(self.device, x.device):
                raise ValueError(f"input is on {x.device} but the layer's device is {self.device}")
        batch = x.shape[0]
        vbs = self.virtual_batch_size
        if vbs is not None and batch % vbs:
            raise ValueError(f"virtual_batch_size={vbs} must divide the batch size, got a batch "
                             f"of {batch} (input shape {tuple(x.shape)})")
        adjustment = self._adjustment(x.shape, x.device, plan) if training else None
        if plan is not None:
            self.build(x.shape, device=x.device)
        x = x.to(self.compute_dtype)
        groups = batch // vbs if vbs is not None and training and batch > 0 else 1
        running = RunningStats(_flat(self.moving_mean), _flat(self.moving_variance),
                               momentum=self.momentum, convention="keras",
                               unbiased=bool(self.fused),  # Keras's fused path: unbiased
                               moving_stddev=_flat(self.moving_stddev))
        renorm = None
        if self.renorm:
            clip = self.renorm_clipping
            renorm = Renorm(style="keras", rmin=clip.get("rmin"), rmax=clip.get("rmax"),
                            dmax=clip.get("dmax"), momentum=self.renorm_momentum,
                            mean=_flat(self.renorm_mean), stddev=_flat(self.renorm_stddev))
        return self._normalize(x, _flat(self.gamma), _flat(self.beta), axis=self._axes,
                               training=training, eps=self.epsilon, running=running,
                               groups=groups, renorm=renorm, adjustment=adjustment)

    def _normalize(self, x: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """The one statistics call: across every process of the default group when
        ``synchronized`` (torch.distributed; with ghost batches every process needs the same batch
        size), else this process's batch."""
        if self.synchronized:
            return sync_normalize(x, weight, bias, **kwargs)
        return normalize(x, weight, bias, **kwargs)

    def _adjustment(self, shape, device, plan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Calls ``adjustment(input_shape)`` and broadcasts (scale, bias) to [K] float32."""
        if self.adjustment is None:
            return None
        pshape = plan["param_shape"] if plan is not None else tuple(self.moving_mean.shape)
        out = []
        for name, t in zip(("scale", "bias"), self.adjustment(torch.Size(shape))):
            t = torch.as_tensor(t, dtype=torch.float32, device=device).detach()
            try:
                out.append(t.broadcast_to(pshape).reshape(-1).contiguous())
            except RuntimeError:
                raise ValueError(f"adjustment returned a {name} of shape {tuple(t.shape)}, not "
                                 f"broadcastable to the weights' shape {pshape}") from None
        return out[0], out[1]

    # -- Keras extras -------------------------------------------------------------------------
    @property
    def weights(self) -> list[torch.Tensor]:
        """Keras's ``layer.weights`` order: gamma, beta, moving statistics (then renorm state)."""
        if not self.built:
            return []
        names = ["gamma", "beta"] + self._state_names()
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def get_weights(self) -> list[np.ndarray]:
        """The weights as numpy arrays, in Keras's order (loads into a tf_keras layer)."""
        return [w.detach().cpu().numpy().copy() for w in self.weights]

    @torch.no_grad()
    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets the weights from arrays in Keras's order (e.g. a tf_keras layer's
        ``get_weights()``). Checks every shape before changing anything."""
        own = self.weights
        if not self.built or len(weights) != len(own):
            raise ValueError(f'You called `set_weights(weights)` on layer "{self.name}" with a '
                             f"weight list of length {len(weights)}, but the layer was expecting "
                             f"{len(own)} weights." + ("" if self.built else " Build it first."))
        values = [w if isinstance(w, torch.Tensor) else torch.as_tensor(_as_array(w))
                  for w in weights]
        for w, v in zip(own, values):
            if tuple(v.shape) != tuple(w.shape):
                raise ValueError(f'Layer "{self.name}" weight shape {tuple(w.shape)} is not '
                                 f"compatible with provided weight shape {tuple(v.shape)}.")
        for w, v in zip(own, values):
            w.copy_(v)

    @property
    def losses(self) -> list[torch.Tensor]:
        """The regularization losses (scalar tensors, differentiable) to add to the loss."""
        pairs = ((self.gamma_regularizer, self.gamma), (self.beta_regularizer, self.beta))
        return [reg(p) for reg, p in pairs if reg is not None and p is not None]

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Projects gamma/beta with their constraints (call after each optimizer step, as Keras's
        optimizer does)."""
        pairs = ((self.gamma_constraint, self.gamma), (self.beta_constraint, self.beta))
        for constraint, p in pairs:
            if constraint is not None and p is not None:
                p.copy_(constraint(p.detach()))

    def get_config(self) -> dict:
        """Keras's config (JSON-serializable). ``adjustment`` is left out with a warning, as
        Keras does; so are ``fused`` and the device; ``synchronized`` is saved only when True."""
        axis = self._keras_axis if self.built else self.axis
        dtype = self.dtype_policy
        if dtype.startswith("mixed_"):
            dtype = {"module": "keras.mixed_precision", "class_name": "Policy",
                     "config": {"name": dtype}, "registered_name": None}
        config = {
            "name": self.name, "trainable": self._trainable, "dtype": dtype,
            "axis": list(axis) if isinstance(axis, list) else axis, "momentum": self.momentum,
            "epsilon": self.epsilon, "center": self.center, "scale": self.scale,
        }
        for key in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
                    "beta_constraint", "gamma_constraint"):
            config[key] = serialize(getattr(self, key))
        if self.renorm:
            config.update(renorm=True, renorm_clipping=dict(self.renorm_clipping),
                          renorm_momentum=self.renorm_momentum)
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        if self.synchronized:
            config["synchronized"] = True
        if self.adjustment is not None:
            warnings.warn("The `adjustment` function of this `BatchNormalization` layer cannot "
                          "be serialized and has been omitted from the layer config. It will not "
                          "be included when re-creating the layer from the saved config.",
                          stacklevel=2)
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: dict | None = None,
                    **kwargs: Any) -> BatchNormalization:
        """A new (unbuilt) layer from ``get_config()`` (or a tf_keras layer's config);
        ``custom_objects`` maps the names of custom initializers/regularizers/constraints."""
        config = {**config, **kwargs}
        for key, get in _OBJECT_ARGS.items():
            if key in config:
                config[key] = get(config[key], key, custom_objects)
        return cls(**config)

    def extra_repr(self) -> str:
        parts = [f"axis={self._keras_axis if self.built else self.axis}",
                 f"momentum={self.momentum}", f"epsilon={self.epsilon}"]
        parts += [f"{k}=False" for k in ("center", "scale") if not getattr(self, k)]
        if self.renorm:
            parts.append(f"renorm=True, renorm_clipping={self.renorm_clipping}, "
                         f"renorm_momentum={self.renorm_momentum}")
        if self.virtual_batch_size is not None:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        if self.adjustment is not None:
            parts.append("adjustment=<fn>")
        if not self._trainable:
            parts.append("trainable=False")
        if self.synchronized:
            parts.append("synchronized=True")
        if self.dtype_policy != "float32":
            parts.append(f"dtype={self.dtype_policy!r}")
        parts.append(f"built={self.built}" if not self.built else
                     f"weights_shape={tuple(self.moving_mean.shape)}")
        return ", ".join(parts)
