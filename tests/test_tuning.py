"""triton_bn/tuning.py: the tune cache is validated and keyed by GPU, and what a sweep forces
(tile, warps, programs, single pass or split) is a planner input the plan memoization sees."""

import json

import pytest
import torch

from triton_bn import tuning
from triton_bn.ops import prepare

CPU = torch.device("cpu")


def _geometry(shape):
    x = torch.empty(shape)
    return prepare(x.shape, [x, x], (1,), 1).geometry


GEO = _geometry((64, 2, 16, 16))  # 2 channels of 16384 elements: the split path has room


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A tune-cache file the planner reads; the in-process copy is dropped around the test."""
    path = tmp_path / "tune.json"
    monkeypatch.setenv("TRITON_BN_TUNE_CACHE", str(path))
    tuning.load_cache.cache_clear()
    yield path
    tuning.load_cache.cache_clear()


def _write(path, entries):
    path.write_text(json.dumps(entries))
    tuning.load_cache.cache_clear()


GOOD = {"fused": False, "tile": 1024, "num_warps": 8, "target_programs": 4}


@pytest.mark.parametrize("field,value,expected", [
    ("num_warps", 3, "num_warps must be one of 1, 2, 4, 8, 16, 32, got 3"),
    ("num_warps", 64, "num_warps must be one of"),
    ("num_warps", 4.0, "num_warps must be one of"),
    ("tile", 1000, "tile must be a power of two from 16 to 65536, got 1000"),
    ("tile", 1 << 20, "tile must be a power of two"),
    ("tile", 8, "tile must be a power of two"),
    ("target_programs", 0, "target_programs must be a positive integer, got 0"),
    ("target_programs", "4", "target_programs must be a positive integer"),
    ("target_programs", True, "target_programs must be a positive integer"),
    ("fused", "no", "fused must be true or false, got 'no'"),
])
def test_invalid_cache_entry_names_file_key_and_field(cache, field, value, expected):
    key = tuning.cache_key("forward", GEO, torch.float32, CPU)
    _write(cache, {key: dict(GOOD, **{field: value})})
    with pytest.raises(ValueError, match="tune cache") as info:
        tuning.plan_tiles(GEO, "forward", CPU, torch.float32)
    msg = str(info.value)
    assert str(cache) in msg and repr(key) in msg and expected in msg
    # the same file with a valid value plans as the entry says
    _write(cache, {key: GOOD})
    plan = tuning.plan_tiles(GEO, "forward", CPU, torch.float32)
    assert not plan.fused and plan.num_warps == 8 and plan.grid[0] == 4


def test_cache_that_is_not_an_object_of_objects_is_rejected(cache):
    key = tuning.cache_key("forward", GEO, torch.float32, CPU)
    for content, expected in ((json.dumps({key: [1, 2]}), "an entry must be a JSON object"),
                              (json.dumps([GOOD]), "expected a JSON object"),
                              ("{not json", "not valid JSON")):
        cache.write_text(content)
        tuning.load_cache.cache_clear()
        with pytest.raises(ValueError, match=expected) as info:
            tuning.plan_tiles(GEO, "backward", CPU, torch.float32)
        assert str(cache) in str(info.value)


def test_missing_cache_file_means_the_heuristic(cache):
    assert not cache.exists()
    with tuning.override():  # the same plan as with no cache at all
        want = tuning.plan_tiles(GEO, "forward", CPU, torch.float32)
    assert tuning.plan_tiles(GEO, "forward", CPU, torch.float32) == want


def test_cache_keys_name_the_device_and_another_cards_entry_is_not_applied(cache, monkeypatch):
    key = tuning.cache_key("forward", GEO, torch.float32, CPU)
    assert key.startswith("cpu-interpreter|forward|")
    default = tuning.plan_tiles(GEO, "forward", CPU, torch.float32)
    other = key.replace("cpu-interpreter|", "NVIDIA H100 80GB HBM3|")
    _write(cache, {other: dict(GOOD, num_warps=2, target_programs=3)})
    assert tuning.plan_tiles(GEO, "forward", CPU, torch.float32) == default
    _write(cache, {other: dict(GOOD, num_warps=2, target_programs=3), key: GOOD})
    assert tuning.plan_tiles(GEO, "forward", CPU, torch.float32).num_warps == 8
    # on a (pretended) GPU the key is the card's name
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_cuda_name", lambda index: f"Fake GPU {index}")
    assert tuning.device_name(torch.device("cuda", 1)) == "Fake GPU 1"
    assert tuning.cache_key("backward", GEO, torch.float16, torch.device("cuda", 1)).startswith(
        "Fake GPU 1|backward|")


def test_cache_keys_without_a_device_are_rejected_and_dropped_by_the_tuner(cache, tmp_path):
    legacy = f"forward|R0={GEO.R0}|R1={GEO.R1}|G=1|K=2|cf=0|torch.float32"
    _write(cache, {legacy: GOOD})
    with pytest.raises(ValueError, match="names no GPU") as info:
        tuning.plan_tiles(GEO, "forward", CPU, torch.float32)
    assert str(cache) in str(info.value) and legacy in str(info.value)
    # rerunning the tuner rewrites such a file without the old keys
    from triton_bn.bench.results import run_info
    from triton_bn.bench.tune import write_cache
    key = tuning.cache_key("forward", GEO, torch.float32, CPU)
    write_cache(cache, {key: GOOD}, run_info(False))
    assert set(json.loads(cache.read_text())) == {key}
    assert tuning.plan_tiles(GEO, "forward", CPU, torch.float32).num_warps == 8


def test_override_and_use_entries_validate_what_they_force():
    with pytest.raises(ValueError, match=r"override\(num_warps=...\): num_warps must be one of"):
        with tuning.override(num_warps=3):
            pass
    with pytest.raises(TypeError, match="unknown knob 'warps'"):
        with tuning.override(warps=4):
            pass
    key = tuning.cache_key("forward", GEO, torch.float32, CPU)
    with pytest.raises(ValueError, match=f"use_entries, key {key!r}: tile must be a power of two"):
        with tuning.use_entries({key: {"tile": 3000}}):
            pass
    assert tuning.current_policy() == tuning.Policy()  # nothing was left in force


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_swept_tile_and_warps_reach_the_memoized_plan(kind):
    """What a sweep or a tuned entry forces is part of the plan's memo key: every (tile, warps)
    gives its own plan, in any order, and the same plan again when repeated."""
    seen = {}
    for _ in range(2):
        for tile in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                with tuning.override(force_fused=False, tile=tile, num_warps=warps):
                    p = tuning.plan_tiles(GEO, kind, CPU, torch.float32)
                assert not p.fused and p.num_warps == warps
                assert p.BLOCK_A * p.BLOCK_B == tile
                assert seen.setdefault((tile, warps), p) == p
    key = tuning.cache_key(kind, GEO, torch.float32, CPU)
    for programs in (2, 8):  # an entry forced by the tuner is a planner input too
        with tuning.use_entries({key: {"fused": False, "tile": 2048, "target_programs": programs}}):
            p = tuning.plan_tiles(GEO, kind, CPU, torch.float32)
        assert p.grid[0] == programs and p.BLOCK_A * p.BLOCK_B == 2048
    # an explicit policy gives the same plan as the policy in force
    with tuning.override(force_fused=False, tile=2048, num_warps=8):
        policy = tuning.current_policy()
    assert tuning.plan_tiles(GEO, kind, CPU, torch.float32, policy=policy) == seen[(2048, 8)]


@pytest.mark.parametrize("path", ["fused", "split"])
def test_forced_channels_fast_plans_nchw_by_channel_tiles_with_the_same_results(path):
    """The CPU smoke's ``channels_fast`` knob (never on by default) addresses NCHW data in the
    channels-fast orientation: far fewer programs, and the same outputs and gradients as torch."""
    torch.manual_seed(0)
    x = torch.randn(3, 40, 5, 7, dtype=torch.float64) * 2 + 3
    assert not prepare(x.shape, [x], (1,), 1).geometry.channels_fast  # the layout's choice
    bn = torch.nn.BatchNorm2d(40).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    z = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    y_ref = torch.relu(bn(xr) + z)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    from triton_bn import normalize

    forced = {"force_fused": path == "fused", "channels_fast": True}
    with tuning.override(**forced):
        geo = prepare(x.shape, [x], (1,), 1).geometry
        assert geo.channels_fast
        plan = tuning.plan_tiles(geo, "forward", CPU, x.dtype)
        assert plan.fused == (path == "fused") and plan.grid[0] < 40
        xt = x.clone().requires_grad_()
        w = bn.weight.detach().clone().requires_grad_()
        y = normalize(xt, w, bn.bias.detach(), residual=z, activation="relu")
        y.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
    assert not prepare(x.shape, [x], (1,), 1).geometry.channels_fast  # only while forced
