"""Shared test setup: Triton's interpreter on CPU machines, seeds and per-dtype tolerances."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
# the suite plans with the heuristics, not with this user's tune cache (tests of the cache set their own)
os.environ["TRITON_BN_TUNE_CACHE"] = os.path.join(os.path.dirname(__file__), "no-such-dir", "tune.json")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Absolute/relative tolerances against the float64 reference, per input dtype. Half precision
# loses ~3 decimal digits at the input and output; statistics are fp32 throughout.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


def grad_tol(dtype: torch.dtype, n: int) -> dict:
    """Tolerance for a gradient reduced over n elements (dgamma, dbeta): grows with sqrt(n)."""
    base = TOL[dtype]
    scale = max(1.0, n ** 0.5 / 4)
    return dict(atol=base["atol"] * scale, rtol=base["rtol"] * scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _no_compile_caches(monkeypatch):
    """torch.compile afresh in every test: inductor's and AOTAutograd's on-disk caches (in /tmp,
    shared by every checkout on the machine) do not key on a custom operator's fake
    implementation, so a graph cached by another version of triton_bn would be replayed with that
    version's output shapes."""
    import torch._functorch.config
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
