"""Keras's own BatchNormalization tests (keras/src/layers/normalization/batch_normalization_test.py,
shipped in the keras wheel of the version .ci/run pins) against triton_bn.keras3.BatchNormalization:
the only change is that ``keras.src.layers.BatchNormalization`` is the subclass while they run.
"""

import pytest
from keras.src import layers
from keras.src.layers.normalization import batch_normalization_test as suite

from triton_bn import keras3

# Keras's test case, collected here (pytest collects unittest.TestCase classes by reference)
BatchNormalizationTest = suite.BatchNormalizationTest

# Tests whose layer never runs the kernels: constructor/config/variable checks only, or training
# with a mask (Keras's own masked moments; the kernels take no mask).
NO_KERNEL = ("test_large_value_within_autocast_scope", "test_renorm_invalid_clipping_keys",
             "test_renorm_stddev_initializer", "test_serialization", "test_input_fully_masked",
             "test_masked_broadcast_normalization", "test_bachnorm_ignore_masked_values")


@pytest.fixture(autouse=True)
def _subclass(monkeypatch, request):
    """Swaps in the subclass and checks that the kernels ran for every test that computes."""
    monkeypatch.setattr(layers, "BatchNormalization", keras3.BatchNormalization)
    calls = []
    fused = keras3.BatchNormalization._fused

    def spy(self, x, training):
        calls.append(training)
        return fused(self, x, training)

    monkeypatch.setattr(keras3.BatchNormalization, "_fused", spy)
    yield
    if request.node.cls is BatchNormalizationTest and not request.node.name.startswith(NO_KERNEL):
        assert calls, f"{request.node.name} never reached triton_bn's kernels"


def test_the_suite_builds_the_subclass():
    assert suite.layers is layers
    assert type(layers.BatchNormalization()) is keras3.BatchNormalization
