"""``triton-bn bench --model`` and the whole-model memory measurement on CPU: the smoke run writes
loss / images-per-second / peak rows and a plot, a variant whose losses differ from torch's is
refused before timing, and the fused model saves no more activations for backward than torch."""

import copy

import pytest
import torch
import torch.nn.functional as F

from triton_bn import convert_model, fuse
from triton_bn.bench import model_runner
from triton_bn.bench.models import build_model, fake_memory, saved_bytes
from triton_bn.bench.results import CPU_NOTE, read_rows
from triton_bn.cli import main

pytest.importorskip("transformers")


def test_bench_model_cpu_smoke(tmp_path, capsys):
    csv_path = tmp_path / "m.csv"
    status = main(["bench", "--model", "tiny_resnet", "--model-batch", "2", "--image-size", "16",
                   "--variants", "torch_bn,triton_bn_fused", "--csv", str(csv_path), "--plots",
                   str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "NOT GPU figures" in out and "eager mode only" in out
    rows = read_rows([csv_path])
    assert all(CPU_NOTE in r["note"] for r in rows)
    by = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    assert {k[0] for k in by} == {"torch_bn", "triton_bn_fused"} and {k[1] for k in by} == {"eager"}
    for v in ("torch_bn", "triton_bn_fused"):
        assert float(by[(v, "eager", "images_per_s")]["value"]) > 0
        assert float(by[(v, "eager", "peak_mb")]["value"]) > 0
        assert by[(v, "eager", "ms")]["shape"] == "2x3x16x16"
    losses = [float(by[(v, "eager", "loss")]["value"]) for v in ("torch_bn", "triton_bn_fused")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert "fused" in by[("triton_bn_fused", "eager", "ms")]["note"]
    assert list((tmp_path / "plots").glob("models_images_per_s-*.png"))


def test_bench_model_refuses_mismatched_losses(tmp_path, monkeypatch, capsys):
    """A variant that is not the same model (here: torch's, with one weight changed) is reported
    as an error and not timed; the run fails."""
    real = model_runner.make_variant

    def broken(model, variant):
        m, note = real(model, "torch_bn")
        if variant != "torch_bn":
            with torch.no_grad():
                next(m.parameters()).mul_(1.5)
        return m, note

    monkeypatch.setattr(model_runner, "make_variant", broken)
    csv_path = tmp_path / "m.csv"
    status = main(["bench", "--model", "tiny_resnet", "--model-batch", "2", "--image-size", "16",
                   "--variants", "torch_bn,triton_bn_converted", "--csv", str(csv_path),
                   "--no-plot"])
    assert status == 1
    rows = read_rows([csv_path])
    errors = [r for r in rows if r["metric"] == "error"]
    assert len(errors) == 1 and errors[0]["provider"] == "triton_bn_converted"
    assert "differ from torch_bn eager" in errors[0]["value"]
    assert not any(r["provider"] == "triton_bn_converted" and r["metric"] == "ms" for r in rows)
    assert "FAILED check" in capsys.readouterr().out


def test_bench_model_bad_name():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", "resnet51"])
    assert exc.value.code == 2


def _saved(model, x, y):
    """(bytes of the activation storages saved for backward, without the model's parameters and
    buffers, each once: those of tensors with more than one dimension, those of 1-D ones)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = (t.dim() > 1, s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return (sum(b for big, b in seen.values() if big), sum(b for big, b in seen.values() if not big))


def relu_channels(fused, report) -> int:
    """Channels of the fused BN + ReLU layers without an add: each keeps 8 bytes of ReLU cuts
    per channel beyond torch's statistics (ops.saves_cut)."""
    return sum(fused.get_submodule(s.name).num_features for s in report.fused
               if s.pattern == "relu")


def test_fused_resnet_saves_no_more_than_torch():
    """Saved for backward, each storage once: the fused model keeps no activation-sized tensor
    more than torch, and per channel the same 8 bytes (torch: mean and invstd; triton_bn: the
    mean's offset from x's pivot and rstd), plus 8 bytes of ReLU cuts per channel of a BN + ReLU
    layer. (The converted model and residual='saved', on the real ResNet-50 below; the converted
    layers one by one, test_saved_bytes.py.)"""
    base = build_model("tiny_resnet", num_classes=10, seed=0).train()
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    t_big, t_vec = _saved(copy.deepcopy(base), x, y)
    fused, report = fuse(copy.deepcopy(base), return_report=True)
    f_big, f_vec = _saved(fused, x, y)
    assert len(report.fused) >= 10
    assert f_big <= t_big
    assert relu_channels(fused, report) > 0
    assert f_vec <= t_vec + 8 * relu_channels(fused, report)
    # the helper counts what saved_bytes counts
    m = copy.deepcopy(base)
    assert saved_bytes(m, lambda: F.cross_entropy(m(x), y)).activations == t_big + t_vec
    # the default fuses every add, downsampling shortcuts included: a fused layer keeps its output
    # for the ReLU mask (as torch's ReLU does), not the shortcut (which nothing else keeps there)
    assert report.count("add+relu") > fuse(copy.deepcopy(base), residual="saved",
                                           return_report=True)[1].count("add+relu")


def test_resnet50_memory_fake_fused_not_above_torch():
    """The real ResNet-50 config (HF, 53 batch norms) under FakeTensorMode (shapes only, fast):
    the fused model (every add, the default) saves for backward what torch saves (a BN + add +
    ReLU layer keeps its output for the mask, as torch's ReLU does) plus the BN + ReLU layers'
    cuts, 8 bytes per channel (60,928 bytes of 28 MB), and its step's peak is torch's plus the
    cuts still saved then (the BN + add + ReLU backward frees dy before dx exists, as torch's
    ReLU backward does); so do the converted model (no fused ReLU: torch's to the byte) and
    residual='saved' (which fuses 12 of the 16 adds)."""
    base = build_model("resnet50", num_classes=10, seed=0).train()
    channels = sum(m.num_features for m in base.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert channels == 26560
    t_saved, t_peak, _ = fake_memory(copy.deepcopy(base), 4, 64)
    fused, report = fuse(copy.deepcopy(base), return_report=True)
    assert report.count("relu") == 33 and report.count("add+relu") == 16
    cuts = 8 * relu_channels(fused, report)
    assert cuts == 8 * 7616
    f_saved, f_peak, _ = fake_memory(fused, 4, 64)
    assert f_saved == t_saved + cuts
    assert t_peak <= f_peak <= t_peak + cuts
    c_saved, c_peak, _ = fake_memory(convert_model(copy.deepcopy(base)), 4, 64)
    assert (c_saved, c_peak) == (t_saved, t_peak)
    saved_only, report = fuse(copy.deepcopy(base), residual="saved", return_report=True)
    assert report.count("add+relu") == 12
    s_saved, s_peak, _ = fake_memory(saved_only, 4, 64)
    cuts = 8 * relu_channels(saved_only, report)
    assert s_saved == t_saved + cuts and t_peak <= s_peak <= t_peak + cuts
