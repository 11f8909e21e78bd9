"""The direct launch path (triton_bn/launch.py) hands the compiled kernel exactly the arguments
Triton's JIT would: every launch of a set of layer calls (training forward + backward on the split
and single-pass paths, inference; NCHW and channels_last; bf16 and fp32; with and without the fused
residual + ReLU; cumulative momentum, renorm, no affine; Keras ghost batches with renorm) is
recorded at the C launcher under the stand-in sm_90 driver of perf/, once through the JIT
(``set_direct_launch(False)``) and once through the direct path, and the two lists must be
equal; every keyed launch is also checked against its full signature, and the layers' planned launches
against what the full path launched for the same call. Runs in a fresh process:
this one imported Triton in interpreter mode, where launches always go through the JIT."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_direct_launch_passes_what_the_jit_passes():
    # the probe also checks every keyed launch's key against its full signature, and fails a
    # compile that leaves fused multiply-adds to Triton's default (launch.FP_FUSION)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore",
               TRITON_BN_VERIFY_LAUNCH_KEYS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "probes" / "direct_launch.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["entries_without"] == 0  # direct launch off: the JIT every time
    assert out["entries_with"] > 0  # the direct path was taken
    jit, direct = out["jit"], out["direct"]
    assert len(jit) == len(direct) > 0
    for i, (a, b) in enumerate(zip(jit, direct)):
        assert a == b, f"launch {i}: JIT passed {a}, direct passed {b}"
    # the layers' planned launches (ops.PlannedForward / PlannedBackward, the third pass) pass
    # what the full path passed the first time (the first pass) and while planning (the second)
    first, planning, planned = out["jit_passes"]
    assert len(first) == len(planning) == len(planned) > 0
    for i, (a, b, c) in enumerate(zip(first, planning, planned)):
        assert a == b == c, f"launch {i}: full path {a}, planning {b}, planned {c}"
