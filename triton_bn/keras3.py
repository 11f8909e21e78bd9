"""Keras 3 ``BatchNormalization`` on the fused Triton kernels (``KERAS_BACKEND=torch``).

A subclass of ``keras.layers.BatchNormalization`` whose training and inference go through
``functional.normalize`` (or ``distributed.sync_normalize``): one fused kernel pass per call, renorm
with clipping, synchronized statistics over ``torch.distributed``, plus Keras 2's
``virtual_batch_size`` (strided ghost batches) and ``adjustment``. Everything else is Keras's own:
the weights (names, shapes, dtypes), initializers, regularizers (``layer.losses``), constraints,
``get_config`` / ``from_config``, ``.keras`` saving, ``fit`` and dtype policies.

Moving statistics: the kernels update the variables' torch tensors in place (no host sync). Inside
a Keras ``StatelessScope`` (``model.stateless_call`` and friends) they update copies of the scope's
values instead, which are then ``assign``-ed, so the layer honours Keras's stateless semantics.

Only the torch backend: on another backend the constructor raises ValueError (use
``keras.layers.BatchNormalization`` there). Masked training (``mask=...``) runs Keras's own masked
moments, since the kernels have no mask; so do inputs of rank 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

try:
    import keras
except ImportError as exc:  # pragma: no cover - exercised only without keras
    raise ImportError("triton_bn.keras3 needs Keras 3 (pip install 'triton_bn[keras]') and "
                      "KERAS_BACKEND=torch set before keras is imported") from exc
import torch
from keras.src.backend.common.stateless_scope import in_stateless_scope

from .distributed import sync_normalize
from .functional import Renorm, RunningStats, normalize

__all__ = ["BatchNormalization"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@keras.saving.register_keras_serializable(package="triton_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by triton_bn's fused kernels.

    Same arguments, weights and behaviour as Keras's layer, and in addition:

    - ``synchronized=True``: batch statistics over every process of torch.distributed's default
      group (each process calls the layer on its own batch; a single process is unaffected).
    - ``virtual_batch_size=V`` (Keras 2): in training, the batch (a multiple of V) is split into
      B / V ghost batches, ghost batch g holding samples g, g + B/V, ..., each normalized with its
      own statistics; the moving statistics take the mean of the ghost batches' statistics.
      Unlike Keras 2 the weights keep shape (C,).
    - ``adjustment=f`` (Keras 2): in training, ``(scale, bias) = f(input_shape)`` (each
      broadcastable to the input, one value per channel) compose as ``(x_hat * scale + bias) *
      gamma + beta``. Not serializable: left out of ``get_config`` with a warning, as Keras 2.
    """

    def __init__(
        self,
        axis: int = -1,
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
        synchronized: bool = False,
        virtual_batch_size: int | None = None,
        adjustment: Callable | None = None,
        **kwargs: Any,
    ):
        backend = keras.backend.backend()
        if backend != "torch":
            raise ValueError("triton_bn.keras3.BatchNormalization runs only on Keras's torch "
                             f"backend (KERAS_BACKEND=torch), got backend {backend!r}; use "
                             "keras.layers.BatchNormalization on other backends")
        if virtual_batch_size is not None and (type(virtual_batch_size) is not int
                                               or virtual_batch_size <= 0):
            raise ValueError("`virtual_batch_size` must be a positive integer that divides the "
                             "true batch size of the input tensor. Received: "
                             f"virtual_batch_size={virtual_batch_size!r}")
        if virtual_batch_size is not None and adjustment is not None:
            raise ValueError("When using `virtual_batch_size`, adjustment cannot be specified")
        if adjustment is not None and not callable(adjustment):
            raise TypeError("`adjustment` must be a callable f(input_shape) -> (scale, bias), "
                            f"got {adjustment!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], got {momentum!r}")
        if not 0.0 <= float(renorm_momentum) <= 1.0:
            raise ValueError(f"`renorm_momentum` must be in [0, 1], got {renorm_momentum!r}")
        if float(epsilon) < 0:
            raise ValueError(f"`epsilon` must be non-negative, got {epsilon!r}")
        # Keras's own layer accepts synchronized=True only on TensorFlow: it is this layer's job.
        super().__init__(axis=axis, momentum=momentum, epsilon=epsilon, center=center,
                         scale=scale, beta_initializer=beta_initializer,
                         gamma_initializer=gamma_initializer,
                         moving_mean_initializer=moving_mean_initializer,
                         moving_variance_initializer=moving_variance_initializer,
                         beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
                         beta_constraint=beta_constraint, gamma_constraint=gamma_constraint,
                         renorm=renorm, renorm_clipping=renorm_clipping,
                         renorm_momentum=renorm_momentum, synchronized=False, **kwargs)
        self.synchronized = bool(synchronized)
        self.virtual_batch_size = virtual_batch_size
        self.adjustment = adjustment

    def call(self, inputs, training=None, mask=None):
        training = bool(training) and self.trainable
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError("The mask provided should be one dimension less than the inputs. "
                             f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}")
        keras_path = (training and mask is not None) or len(inputs.shape) < 2
        if keras_path:
            extras = [name for name, on in (("virtual_batch_size", self.virtual_batch_size),
                                            ("adjustment", self.adjustment),
                                            ("synchronized", self.synchronized)) if on]
            if extras and training:  # (they act in training only)
                raise ValueError(f"{', '.join(extras)} cannot be combined with a mask in training "
                                 "or with inputs of rank < 2 (the kernels take no mask); got "
                                 f"inputs.shape={tuple(inputs.shape)}")
            return super().call(inputs, training=training, mask=mask)
        x = inputs if inputs.dtype in _FLOAT_DTYPES else inputs.to(torch.float32)
        out = self._fused(x, training)
        return keras.ops.cast(out, self.compute_dtype)

    def _fused(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """One ``normalize`` call; the moving statistics update in place (see the module doc)."""
        axis = self.axis % x.dim()
        groups = 1
        if training and self.virtual_batch_size is not None:
            if axis == 0:
                raise ValueError("When using `virtual_batch_size`, the batch dimension must be 0 "
                                 f"and thus axis cannot be 0. Received axis={self.axis}")
            batch = x.shape[0]
            if batch % self.virtual_batch_size:
                raise ValueError(f"virtual_batch_size={self.virtual_batch_size} must divide the "
                                 f"batch size, got a batch of {batch} (input shape "
                                 f"{tuple(x.shape)})")
            groups = max(batch // self.virtual_batch_size, 1)
        adjustment = self._adjustment(x, axis) if training else None
        names = ["moving_mean", "moving_variance"]
        if training and self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        variables = [getattr(self, n) for n in names]
        stateless = training and in_stateless_scope()
        state = [v.value.detach().clone() if stateless else v.value for v in variables]
        running = RunningStats(state[0], state[1], momentum=self.momentum, convention="keras",
                               unbiased=False, moving_stddev=state[2] if len(state) > 2 else None)
        renorm = None
        if training and self.renorm:
            clip = self.renorm_clipping or {}
            renorm = Renorm(style="keras", rmin=clip.get("rmin"), rmax=clip.get("rmax"),
                            dmax=clip.get("dmax"), momentum=self.renorm_momentum, mean=state[3],
                            stddev=state[4])
        gamma = self.gamma.value if self.scale else None
        beta = self.beta.value if self.center else None
        fn = sync_normalize if self.synchronized else normalize
        out = fn(x, gamma, beta, axis=axis, training=training, eps=self.epsilon, running=running,
                 groups=groups, renorm=renorm, adjustment=adjustment)
        if stateless:
            for v, t in zip(variables, state):
                v.assign(t)
        return out

    def _adjustment(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``adjustment(input_shape)`` as two [C] float32 tensors."""
        if self.adjustment is None:
            return None
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
        out = []
        for name, t in zip(("scale", "bias"), self.adjustment(tuple(x.shape))):
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device).detach()
            try:
                out.append(t.broadcast_to(shape).reshape(-1).contiguous())
            except RuntimeError:
                raise ValueError(f"adjustment returned a {name} of shape {tuple(t.shape)}, not "
                                 f"broadcastable to {tuple(shape)} (one value per channel of an "
                                 f"input of shape {tuple(x.shape)})") from None
        return out[0], out[1]

    def get_config(self) -> dict:
        """Keras's config plus ``virtual_batch_size``; ``adjustment`` is left out with a warning."""
        config = super().get_config()
        config["virtual_batch_size"] = self.virtual_batch_size
        if self.adjustment is not None:
            warnings.warn("The `adjustment` function of this `BatchNormalization` layer cannot be "
                          "serialized and has been omitted from the layer config. It will not be "
                          "included when re-creating the layer from the saved config.",
                          stacklevel=2)
        return config
