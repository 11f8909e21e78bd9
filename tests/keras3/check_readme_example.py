"""The README's Keras 3 example runs as written and trains triton_bn's layers."""

import re
from pathlib import Path

import keras

from triton_bn import keras3

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_keras3_readme_example_runs(tmp_path, monkeypatch):
    section = README.split("## Keras 3 (PyTorch backend)")[1].split("\n## ")[0]
    block = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README Keras 3 example", "exec"), scope)  # noqa: S102 (the README example)
    layers = [layer for layer in scope["model"].layers if isinstance(layer, keras3.BatchNormalization)]
    assert len(layers) == 2 and layers[1].virtual_batch_size == 4
    assert any(abs(m) > 0 for m in keras.ops.convert_to_numpy(layers[0].moving_mean))  # trained
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in scope["model"].layers]
