"""The kernels compile for an NVIDIA Hopper GPU (sm_90), checked without a GPU.

The rest of the suite runs the kernels in Triton's CPU interpreter, which accepts code that the GPU
compiler rejects. This test runs ``perf/compile_check.py --cover`` in a fresh process (this one has
imported triton in interpreter mode): the real launch code of ``triton_bn.ops`` runs over many
scenarios with a compile-only Triton driver, and a covering subset of the specializations it launches
(every constexpr value, dtype, orientation and warp count of every kernel at least once) is compiled
to a cubin with Triton's bundled ptxas. ``python perf/compile_check.py`` compiles all of them.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "perf" / "compile_check.py"
NO_TOOLCHAIN = 2  # compile_check's exit status when the NVIDIA toolchain cannot run here


def _kernel_names() -> set:
    """Every ``*_kernel`` defined in triton_bn/kernels/{forward,backward}.py (read, not imported)."""
    names = set()
    for mod in ("forward", "backward"):
        tree = ast.parse((ROOT / "triton_bn" / "kernels" / f"{mod}.py").read_text())
        names |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")}
    return names


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")
    out_json = tmp_path / "compile.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--cover", "--no-sweep", "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode == NO_TOOLCHAIN:
        pytest.skip(output.strip().splitlines()[-1] if output.strip() else "no NVIDIA toolchain")
    assert out_json.exists(), f"compile_check produced no results (exit {proc.returncode}):\n{output[-6000:]}"
    results = json.loads(out_json.read_text())
    failed = [f"{r['kernel']} [{r['flags']}] ({r['scenario']}): {r['error']}" for r in results if not r["ok"]]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n".join(failed)
    assert proc.returncode == 0, output[-6000:]
    missing = _kernel_names() - {r["kernel"] for r in results}
    assert not missing, f"kernels that no scenario of compile_check launches: {sorted(missing)}"
