"""The triton-bn command line and bench tooling: a quick bench writes the CSV schema, plot writes
PNGs from CSVs alone, the summary judges targets, tune writes a cache plan_tiles honours, and
perf/gpu_check.py exits cleanly without CUDA. Runs in Triton's CPU interpreter (< 1 min)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_bn import tuning
from triton_bn.bench.providers import KerasBatchNorm, keras_batch_norm_torch, make_init, reference
from triton_bn.bench.results import COLUMNS, CsvWriter, RunInfo, read_rows
from triton_bn.bench.shapes import RESNET50_LAYERS, Case, build_cases, parse_shape
from triton_bn.bench.summary import evaluate_targets, summarize
from triton_bn.cli import main
from triton_bn.ops import prepare

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env=None, timeout=120):
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- shapes and byte counts
def test_resnet50_has_53_bn_layers_in_12_shapes():
    assert sum(n for *_, n in RESNET50_LAYERS) == 53
    assert len({(c, hw) for _, c, hw, _ in RESNET50_LAYERS}) == 12
    cases = build_cases(["resnet50"], batches=[32, 256],
                        combos=[("bf16", "channels_last"), ("fp32", "nchw")])
    assert len(cases) == 12 * 2 * 2
    assert {c.shape[0] for c in cases} == {32, 256}


def test_sets_and_byte_counts():
    cases = build_cases(["bn1d", "smallc", "manyc"], dtypes=["fp32", "bf16"],
                        layouts=["nchw", "channels_last"])
    shapes = {(c.shape, c.layout, c.dtype) for c in cases}
    assert ((4096, 1024), "nc", "fp32") in shapes and ((30_000_000, 3), "nc", "bf16") in shapes
    assert ((64, 4096, 7, 7), "channels_last", "bf16") in shapes
    assert len(cases) == 2 + 2 + 4  # rank-2 shapes run once per dtype
    c = Case("x", "x", (2, 3, 4, 5), "nchw", "bf16")
    assert c.nbytes == 120 * 2
    assert c.bytes_moved("forward") == c.bytes_moved("inference") == 2 * 240
    assert c.bytes_moved("backward") == 3 * 240 and c.bytes_moved("forward_backward") == 5 * 240
    assert parse_shape("32x64x56x56") == (32, 64, 56, 56)
    with pytest.raises(ValueError):
        parse_shape("32xfoo")
    keras = build_cases(["keras"], combos=[("bf16", "channels_last")])
    assert {c.feature for c in keras} == {"renorm", "ghost", "adjust"}
    assert all("inference" not in c.modes for c in keras)
    assert {c.groups for c in keras if c.feature == "ghost"} == {4}


@pytest.mark.parametrize("feature", ["renorm", "ghost", "adjust"])
def test_keras_eager_composition_matches_reference(feature):
    """The plain-PyTorch composition the Keras features are compared with is itself correct."""
    case = Case("tiny", feature, (8, 3, 4, 4), "channels_last", "fp32", feature=feature,
                groups=2 if feature == "ghost" else 1)
    dev = torch.device("cpu")
    x, dy = case.make_input(dev), case.make_input(dev)
    init = make_init(case, dev)
    ref = reference(case, init, x, dy, training=True)
    m = KerasBatchNorm(3, feature, "torch", case.groups)
    for name, value in vars(init).items():
        getattr(m, name).data.copy_(value)
    xi = x.clone().requires_grad_(True)
    y = m(xi)
    y.backward(dy)
    torch.testing.assert_close(y.double(), ref["y"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xi.grad.double(), ref["dx"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.weight.grad.double(), ref["dweight"], atol=1e-4, rtol=1e-5)
    assert callable(keras_batch_norm_torch)


@pytest.mark.parametrize("feature", ["bn", "renorm", "ghost", "adjust"])
def test_reference_stays_on_the_input_device(feature):
    """On a GPU the oracle runs where the inputs are (simulated with the meta device)."""
    case = Case("tiny", feature, (8, 3, 4, 4), "nchw", "fp32", feature=feature,
                groups=2 if feature == "ghost" else 1)
    meta = torch.device("meta")
    init = make_init(case, torch.device("cpu"))
    init = type(init)(**{k: v.to(meta) for k, v in vars(init).items()})
    x, dy = torch.empty(case.shape, device=meta), torch.empty(case.shape, device=meta)
    for training in (True, False):
        out = reference(case, init, x, dy if training else None, training)
        assert all(t.device == meta for t in out.values())


# ---------------------------------------------------------------- bench, plot, summary
@pytest.mark.slow
def test_bench_quick_writes_csv_summary_and_plots(tmp_path):
    out, plots = tmp_path / "results", tmp_path / "plots"
    r = _run(["-m", "triton_bn", "bench", "--quick", "--out", str(out), "--plots", str(plots),
              "--no-progress"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not GPU figures" in r.stdout
    assert "targets:" in r.stdout
    csvs = list(out.glob("bench-cpu-interpreter-*.csv"))
    assert len(csvs) == 1
    with open(csvs[0], newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert {r["device"] for r in rows} == {"cpu-interpreter"}
    assert all("not GPU figures" in r["note"] for r in rows)
    assert {"triton_bn", "torch_eager", "copy"} <= {r["provider"] for r in rows}
    assert {"ms", "gbps", "copy_fraction", "speedup", "rel_err", "copy_gbps"} <= {
        r["metric"] for r in rows}
    assert {"forward", "backward", "forward_backward", "inference"} <= {r["mode"] for r in rows}
    assert "ghost" in {r["feature"] for r in rows}
    ms = [r for r in rows if r["metric"] == "ms"]
    assert ms and all(float(r["value"]) > 0 and r["torch"] and r["triton"] and r["date"]
                      for r in ms)
    assert not [r for r in rows if "FAILED" in r["note"] or r["metric"] == "error"]
    fwd = next(r for r in ms if r["mode"] == "forward" and r["feature"] == "bn")
    assert int(fwd["bytes"]) == 2 * int(fwd["numel"]) * 4
    assert (out / (csvs[0].stem + "-summary.txt")).is_file()
    assert sorted(p.name for p in plots.glob("*.png"))


def _synthetic_csv(path: Path, eager_factor: float, keras_factor: float, frac: float) -> None:
    info = RunInfo("r", "2026-01-01T00:00:00+00:00", "cuda", "Fake GPU", "2.11", "3.6", "0.1")
    w = CsvWriter(path, info)
    w.add(metric="copy_gbps", value=3000.0, provider="copy")
    cases = build_cases(["resnet50", "keras", "smallc"], batches=[32],
                        combos=[("bf16", "channels_last"), ("fp32", "nchw")],
                        modes=["forward", "forward_backward"])
    for c in cases:
        for m in c.modes:
            base = 1.0
            t = {"triton_bn": base, "torch_compile": base * 1.2,
                 "torch_eager": base * (eager_factor if c.feature == "bn" else keras_factor)}
            for p, ms in t.items():
                w.add(metric="ms", value=ms, p20=ms, p80=ms, case=c, mode=m, provider=p)
                w.add(metric="gbps", value=c.bytes_moved(m) / ms / 1e6, case=c, mode=m,
                      provider=p)
                w.add(metric="copy_fraction", value=frac, case=c, mode=m, provider=p)
            for p in ("triton_bn", "torch_compile"):
                w.add(metric="speedup", value=t["torch_eager"] / t[p], case=c, mode=m,
                      provider=p, baseline="torch_eager")
            w.add(metric="speedup", value=1.2, case=c, mode=m, provider="triton_bn",
                  baseline="torch_compile")
    w.close()


@pytest.mark.slow
def test_plot_reads_csv_only(tmp_path):
    csv_path = tmp_path / "r.csv"
    _synthetic_csv(csv_path, 1.5, 4.0, 0.85)
    assert main(["plot", str(csv_path), "--out", str(tmp_path / "plots"), "--summary"]) == 0
    names = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"speedup_resnet50.png", "keras_features.png", "gbps_vs_size_bf16.png",
            "copy_fraction_fp32.png"} <= names
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["plot", str(bad), "--out", str(tmp_path / "p2")]) == 2


@pytest.mark.parametrize("eager,keras,frac,met", [(1.5, 4.0, 0.85, True),
                                                  (1.2, 2.0, 0.5, False)])
def test_summary_judges_targets(tmp_path, eager, keras, frac, met):
    csv_path = tmp_path / "r.csv"
    _synthetic_csv(csv_path, eager, keras, frac)
    rows = read_rows([csv_path])
    targets = evaluate_targets(rows)
    resnet = [t for t in targets if t["name"].startswith("ResNet-50")]
    keras_t = [t for t in targets if t["name"].startswith("Keras")]
    assert len(resnet) == 4 and len(keras_t) == 3
    want = "MET" if met else "NOT MET"
    assert all(t["status"] == want for t in resnet if "torch_eager" in t["name"])
    assert all(t["status"] == "MET" for t in resnet if "torch_compile" in t["name"])  # 1.2x
    assert all(t["status"] == want for t in keras_t)
    copy_t = next(t for t in targets if "copy bandwidth" in t["name"])
    assert copy_t["status"] == ("MET" if frac >= 0.8 else "NOT MET")  # smallc fp32: 360 MB
    text = summarize(rows)
    assert "targets:" in text and "Fake GPU" in text


# ---------------------------------------------------------------- tune and the cache
def _geometry(shape, layout="nchw"):
    x = torch.empty(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return prepare(x.shape, [x, x], (1,), 1).geometry


def test_plan_tiles_honours_a_cache_entry(tmp_path, monkeypatch):
    geo = _geometry((4, 8, 6, 6))
    dev = torch.device("cpu")
    default = tuning.plan_tiles(geo, "forward", dev, torch.float32)
    assert default.fused  # small enough for the single-pass kernel
    cache = tmp_path / "tune.json"
    key = tuning.cache_key("forward", geo, torch.float32, dev)
    cache.write_text(json.dumps({key: {"fused": False, "tile": 64, "num_warps": 2,
                                       "target_programs": 3}}))
    monkeypatch.setenv("TRITON_BN_TUNE_CACHE", str(cache))
    tuning.load_cache.cache_clear()
    try:
        plan = tuning.plan_tiles(geo, "forward", dev, torch.float32)
        assert not plan.fused and plan.num_warps == 2
        assert plan.BLOCK_A * plan.BLOCK_B <= 64
        # other kinds and dtypes keep the heuristic
        assert tuning.plan_tiles(geo, "forward", dev, torch.bfloat16).fused
        assert tuning.plan_tiles(geo, "backward", dev, torch.float32).fused
    finally:
        tuning.load_cache.cache_clear()


def test_target_programs_from_cache_sets_the_split(tmp_path, monkeypatch):
    geo = _geometry((64, 2, 16, 16))  # 2 channels, 16384 elements each
    dev = torch.device("cpu")
    key = tuning.cache_key("forward", geo, torch.float32, dev)
    cache = tmp_path / "tune.json"
    monkeypatch.setenv("TRITON_BN_TUNE_CACHE", str(cache))
    plans = {}
    for programs in (2, 16):
        cache.write_text(json.dumps({key: {"fused": False, "tile": 1024, "num_warps": 4,
                                           "target_programs": programs}}))
        tuning.load_cache.cache_clear()
        plans[programs] = tuning.plan_tiles(geo, "forward", dev, torch.float32)
    tuning.load_cache.cache_clear()
    assert plans[2].grid[0] == 2 and plans[16].grid[0] == 16


@pytest.mark.slow
def test_tune_writes_cache_that_plan_tiles_loads(tmp_path, monkeypatch):
    cache = tmp_path / "tune.json"
    r = _run(["-m", "triton_bn", "tune", "--shape", "4x4x6x6", "--dtypes", "fp32", "--layouts",
              "channels_last", "--no-progress", "--cpu-reps", "2"],
             env={"TRITON_BN_TUNE_CACHE": str(cache)})
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(cache.read_text())
    geo = _geometry((4, 4, 6, 6), "channels_last")
    for kind in ("forward", "backward"):
        entry = data[f"cpu-interpreter|{kind}|R0=1|R1=144|G=1|K=4|cf=1|torch.float32"]  # names the device
        assert entry["candidates"] and all("plan" in c for c in entry["candidates"])
        timed = [c for c in entry["candidates"] if "ms" in c]
        assert entry["ms"] == min(c["ms"] for c in timed)
        assert entry["device_kind"] == "cpu-interpreter" and entry["torch"] and entry["date"]
        monkeypatch.setenv("TRITON_BN_TUNE_CACHE", str(cache))
        tuning.load_cache.cache_clear()
        try:
            plan = tuning.plan_tiles(geo, kind, torch.device("cpu"), torch.float32)
            chosen = next(c for c in timed if c["ms"] == entry["ms"])
            assert plan.fused == chosen["plan"]["fused"]
            assert plan.grid[0] == chosen["plan"]["programs"]
            assert (plan.BLOCK_A, plan.BLOCK_B) == (chosen["plan"]["BLOCK_A"],
                                                    chosen["plan"]["BLOCK_B"])
        finally:
            tuning.load_cache.cache_clear()


# ---------------------------------------------------------------- CLI odds and ends
def test_cli_help_and_bad_arguments(capsys):
    assert main([]) == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--shapes", "nope"])
    with pytest.raises(SystemExit):
        main(["bench", "--modes", "sideways"])


@pytest.mark.slow
def test_gpu_check_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: perf/gpu_check.py runs for real there")
    r = _run(["perf/gpu_check.py"])
    assert r.returncode == 0 and "CUDA is not available" in r.stdout
    out = tmp_path / "table.txt"
    r = _run(["perf/gpu_check.py", "--cpu-smoke", "--out", str(out)], timeout=400)  # ~1 min
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    assert "ALL CHECKS PASSED" in text
    # section 4 ran in its child process and took the persistent path (two launches, interpreter)
    assert "persistent 4x3x5x7 fp32 nchw: ok (fwd persistent (" in text
    # section 5: the split path's arrival counters and the in-kernel num_batches_tracked
    assert "4 split-path training steps bitwise equal: ok" in text
    assert "num_batches_tracked counted by the kernel (5 calls, momentum=None vs torch): ok" in text
