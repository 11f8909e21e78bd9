"""Whole models for the training-step benchmark and the memory measurement: builders (torchvision,
timm, else Hugging Face ``transformers`` configs; random weights, never a download), the three
batch-norm variants (torch's layers, ``convert_model``, ``fuse``), one training step (forward,
cross-entropy, backward, SGD), the bytes saved for backward and the peak memory of a step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "VARIANTS",
    "SavedBytes",
    "build_model",
    "fake_memory",
    "make_variant",
    "model_source",
    "peak_bytes",
    "saved_bytes",
    "train_step",
]

MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_b0", "regnet",
          "densenet121", "tiny_resnet")
VARIANTS = ("torch_bn", "triton_bn_converted", "triton_bn_fused")


class _Logits(nn.Module):
    """A Hugging Face image classifier called as ``model(x) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _hf(name: str, num_classes: int) -> nn.Module:
    import transformers as tr

    if name in ("resnet18", "resnet34", "resnet50", "tiny_resnet"):
        if name == "resnet50":
            cfg = tr.ResNetConfig(num_labels=num_classes)  # the defaults are ResNet-50
        elif name == "tiny_resnet":  # a CPU-interpreter size: every block kind, 8-32 channels
            cfg = tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1],
                                  layer_type="bottleneck", num_labels=num_classes)
        else:
            cfg = tr.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                  depths=[2, 2, 2, 2] if name == "resnet18" else [3, 4, 6, 3],
                                  layer_type="basic", num_labels=num_classes)
        return _Logits(tr.ResNetForImageClassification(cfg))
    if name == "mobilenet_v2":
        return _Logits(tr.MobileNetV2ForImageClassification(tr.MobileNetV2Config(num_labels=num_classes)))
    if name == "efficientnet_b0":
        return _Logits(tr.EfficientNetForImageClassification(
            tr.EfficientNetConfig(num_labels=num_classes)))
    if name == "regnet":
        return _Logits(tr.RegNetForImageClassification(tr.RegNetConfig(num_labels=num_classes)))
    raise ValueError(f"model {name!r} has no transformers equivalent; install torchvision")


def _torchvision(name: str, num_classes: int) -> nn.Module | None:
    if name in ("tiny_resnet", "regnet"):
        return None
    try:
        import torchvision.models as tvm
    except Exception:  # noqa: BLE001 - a wheel that does not match torch fails in odd ways
        return None
    return getattr(tvm, name)(weights=None, num_classes=num_classes)


def model_source(name: str) -> str:
    """Which library ``build_model`` takes ``name`` from: "torchvision" or "transformers"."""
    return "torchvision" if _torchvision_ok() and name not in ("tiny_resnet", "regnet") \
        else "transformers"


def _torchvision_ok() -> bool:
    try:
        import torchvision.models  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def build_model(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A randomly initialised image classifier ``model(x) -> logits``: torchvision's when it
    imports, else the Hugging Face ``transformers`` class built from a config (no download)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    torch.manual_seed(seed)
    model = _torchvision(name, num_classes)
    if model is None:
        model = _hf(name, num_classes)
    return model


def make_variant(model: nn.Module, variant: str) -> tuple[nn.Module, str]:
    """A deep copy of ``model`` with torch's batch norms ("torch_bn"), converted
    ("triton_bn_converted") or fused ("triton_bn_fused"); returns it and a one-line note."""
    from triton_bn import convert_model, fuse

    m = copy.deepcopy(model)
    if variant == "torch_bn":
        return m, ""
    if variant == "triton_bn_converted":
        return convert_model(m), ""
    if variant == "triton_bn_fused":
        m, report = fuse(m, return_report=True)
        return m, (f"fused {len(report.fused)} BN ({report.count('add+relu')} with add), "
                   f"{len(report.unfused)} unfused")
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward (autocast to ``amp_dtype`` if given), cross-entropy, backward, optimizer step,
    gradients set to None. Returns the loss (detached, no host sync)."""
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass(frozen=True)
class SavedBytes:
    """Bytes of the storages autograd saves for backward in one forward (each storage once):
    ``total``, and ``activations`` (without the model's parameters and buffers)."""

    total: int
    activations: int
    tensors: int


def saved_bytes(model: nn.Module, fn: Callable[[], torch.Tensor]) -> SavedBytes:
    """Runs ``fn`` (a forward returning a loss) under ``saved_tensors_hooks`` and counts the
    storages saved for backward; then runs backward so that nothing is left pending."""
    own = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    count = [0]

    def pack(t: torch.Tensor):
        count[0] += 1
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    total = sum(seen.values())
    return SavedBytes(total, total - sum(v for k, v in seen.items() if k in own), count[0])


def _storage_key(t: torch.Tensor) -> int:
    """Identifies a tensor's storage (views share it); works for fake tensors too, whose storages
    all have data pointer 0."""
    return t.untyped_storage()._cdata


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it: CUDA's allocator
    statistics on a GPU, the profiler's allocation events on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _to_fake(model: nn.Module, mode) -> nn.Module:
    """Replaces parameters and buffers by fake tensors (shared tensors stay shared)."""
    memo: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
                m._parameters[name] = memo[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None:
                memo.setdefault(id(b), mode.from_tensor(b))
                m._buffers[name] = memo[id(b)]
    return model


def fake_memory(model: nn.Module, batch: int, size: int) -> tuple[int, int, dict]:
    """Memory of a training step of ``model`` on a random batch under ``FakeTensorMode`` (shapes
    and storages without data: a ResNet-50 at 224x224 takes seconds on a CPU): (activation bytes
    saved for backward, peak bytes of the second step, that peak by category) as
    ``torch.distributed._tools.mem_tracker.MemTracker`` counts the operators' allocations.
    ``model``'s parameters and buffers are replaced by fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = FakeTensorMode()
    model = _to_fake(model, mode)
    with mode:
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        saved = saved_bytes(model, lambda: F.cross_entropy(model(x), y))
        for p in model.parameters():
            p.grad = None
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            train_step(model, opt, x, y)
        tracker.reset_mod_stats()
        with tracker:
            train_step(model, opt, x, y)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by = {str(k).split(".")[-1].lower(): v for k, v in snap.items()}
    return saved.activations, by.pop("total"), by
