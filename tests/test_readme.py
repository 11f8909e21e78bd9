"""The README's quickstart works as written, and CI runs the README's test command."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_python_block_runs():
    block = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    scope: dict = {}
    exec(compile(block, "README quickstart", "exec"), scope)
    x, y, z = scope["x"], scope["y"], scope["z"]
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    assert z.shape == x.permute(0, 2, 3, 1).shape


def test_ci_runs_the_readme_test_command():
    quickstart = README.split("## Features")[0]
    commands = re.findall(r"^(\S.*?)\s+# ", re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1),
                          re.M)
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.replace("python ", "python3 ") in ci or test_cmd in ci
    assert any(c.startswith("triton-bn") for c in commands)
