"""Run by .ci/run in a fresh environment holding only `pip install .` (no extras), from outside
the checkout: the installed package imports and one layer trains, against torch's batch_norm."""

import sys

import torch

import triton_bn

assert "site-packages" in triton_bn.__file__, triton_bn.__file__
assert "keras" not in sys.modules  # the Keras 3 layer is opt-in (triton_bn.keras3)
bn = triton_bn.BatchNormalization(momentum=0.5, epsilon=1e-5)
x = torch.randn(16, 3) * 2 + 1
y = bn(x, training=True)
torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5),
                           atol=1e-5, rtol=1e-5)
torch.testing.assert_close(bn.moving_mean, 0.5 * x.mean(0), atol=1e-6, rtol=1e-5)
print("plain install OK:", triton_bn.__version__, triton_bn.__file__)
