"""Probe for tests/test_launch.py (run in a fresh process): every kernel launch of a set of layer calls,
as the C launcher would receive it, once through Triton's JIT (``launch.set_direct_launch(False)``) and once
through ``triton_bn.launch``'s direct path, under the stand-in sm_90 driver of perf/ with placeholder
kernels. Prints one JSON object: both launch lists and how many launches took the direct path."""

import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "perf"))
import host_overhead as ho  # noqa: E402

ho._load("drv", ho.HERE / "compile_check" / "driver.py").setup_environment(tempfile.mkdtemp())
# every launch asks for fused multiply-adds (launch.FP_FUSION): a compile that leaves them to
# Triton's default, which 3.9 warns that 3.10 turns off, is an error here (3.6 does not warn)
warnings.filterwarnings("error", message="TRITON_DEFAULT_FP_FUSION")
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import triton_bn  # noqa: E402
from triton_bn import launch, modules, tuning  # noqa: E402

RECORD: list = []


class Recorder(ho._StubLauncher):
    def __call__(self, *args):
        super().__call__(*args)
        grid, tail = args[:3], args[9:]  # (grid x3, stream, function, metadata, meta, hooks x2)
        RECORD.append([self.name, list(grid)] + [
            ["tensor", str(a.dtype), list(a.shape), list(a.stride())] if isinstance(a, torch.Tensor)
            else repr(a) for a in tail])


ho._StubLauncher = Recorder
ho.Launches(90, compile_kernels=False)
knobs = ho._load("sc", ho.HERE / "compile_check" / "scenarios.py").GPU_KNOBS


def calls():
    for fmt in (torch.channels_last, torch.contiguous_format):
        for dtype in (torch.bfloat16, torch.float32):
            for fused in (False, True):
                for relu, res in ((False, False), (True, False), (True, True)):
                    m = triton_bn.BatchNorm2d(16, activation="relu" if relu else None)
                    x = torch.empty((2, 16, 8, 8), dtype=dtype, memory_format=fmt).requires_grad_()
                    z = torch.empty_like(x) if res else None
                    with tuning.override(**knobs, force_fused=fused):
                        y = m(x, z)
                        torch.autograd.grad(y, (x, m.weight), torch.empty_like(y))
                        m.eval()
                        with torch.no_grad():
                            m(x, z)


    for extra in ({"momentum": None, "renorm": True}, {"affine": False}):
        m = triton_bn.BatchNorm2d(16, **extra)
        x = torch.empty((2, 16, 8, 8), dtype=torch.float16).requires_grad_()
        with tuning.override(**knobs, force_fused=False):
            y = m(x)
            torch.autograd.grad(y, (x,), torch.empty_like(y))
    from triton_bn.keras import BatchNormalization
    k = BatchNormalization(axis=1, virtual_batch_size=2, renorm=True, adjustment=None)
    x = torch.empty((4, 16, 3, 3)).requires_grad_()
    with tuning.override(**knobs, force_fused=False):
        y = k(x, training=True)
        torch.autograd.grad(y, (x,), torch.empty_like(y))


def run(direct: bool) -> list:
    """The launches of three passes over calls(): the first takes the full path (no layer plan
    yet), the second plans (ops.call_memo), the third runs the layers' planned launches."""
    launch.set_direct_launch(direct)
    launch.clear_cache()
    modules._PLANS.clear()
    passes = []
    for _ in range(3):
        RECORD.clear()
        calls()
        passes.append(list(RECORD))
    return passes


launch.set_direct_launch(False)
calls()  # fills the JIT's cache (a placeholder kernel's first call launches nothing)
jit = run(False)
entries_before = len(launch._ENTRIES)
direct = run(True)
print(json.dumps({"jit": sum(jit, []), "direct": sum(direct, []), "jit_passes": jit,
                  "entries_without": entries_before, "entries_with": len(launch._ENTRIES)}))
