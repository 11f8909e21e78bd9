"""Memory of a training step with torch's batch norm + ReLU, triton_bn converted, and fused.

For each variant of one model (same weights, same batch): the bytes autograd saves for backward
in one forward (``saved_tensors_hooks``, each storage once; without the model's own parameters
and buffers) and the peak memory of a training step (forward, backward, SGD with momentum; the
second step, so that gradients and momentum buffers exist).

Two ways to run:

* default (``--fake``): under ``FakeTensorMode`` (shapes, dtypes and storages without data), so a
  real ResNet-50 at 224x224 takes seconds on a CPU. Peak memory is
  ``torch.distributed._tools.mem_tracker.MemTracker``'s count of what the dispatched operators
  allocate and free (no allocator caching). triton_bn's layers run through their custom operators'
  fake implementations, as under torch.compile; the eager path's small split-reduction workspace
  is not seen.
* ``--real``: runs the step (on a GPU: CUDA allocator statistics; on a CPU the kernels run in
  Triton's interpreter, so only for small models and inputs: profiler allocation events).

    python perf/fuse_memory.py --model resnet50 --batch 32 --size 224

Results (perf/README.md has the tables and their reading): on that ResNet-50 a triton_bn layer
saves 8 bytes per batch-norm channel, as torch's (20 before issue #15's memory work); converted
saves and peaks exactly as torch; fused saves 12.8 MB less and peaks 12.8 MB below torch (the BN +
add + ReLU backward is two autograd nodes, so dy is freed before dx exists).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: import this repository's triton_bn
    sys.path.insert(0, str(ROOT))

import triton_bn  # noqa: E402  (after the sys.path line above)
from triton_bn.bench.models import (  # noqa: E402
    build_model,
    fake_memory,
    model_source,
    peak_bytes,
    saved_bytes,
    train_step,
)

VARIANTS = {
    "torch BN + ReLU (eager)": lambda m: (m, "-"),
    "triton_bn convert_model": lambda m: (triton_bn.convert_model(m), "-"),
    "triton_bn fuse (residual='saved')": lambda m: _fuse(m, "saved"),
    "triton_bn fuse (default, residual='all')": lambda m: _fuse(m, "all"),
}


def _fuse(model, residual):
    model, report = triton_bn.fuse(model, residual=residual, return_report=True)
    return model, f"{report.count('relu')} BN+ReLU, {report.count('add+relu')} BN+add+ReLU"


def measure_real(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> tuple[int, int]:
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    saved = saved_bytes(model, lambda: F.cross_entropy(model(x), y))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.zero_grad(set_to_none=True)
    train_step(model, opt, x, y)
    return saved.activations, peak_bytes(lambda: train_step(model, opt, x, y), device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="image height and width")
    p.add_argument("--real", action="store_true", help="run the steps (see the docstring)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    how = ("real, " + (torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter")
           if args.real else "FakeTensorMode + MemTracker (shapes only)")
    print(f"{args.model} ({model_source(args.model)}), batch {args.batch}, {args.size}x{args.size},"
          f" fp32, training step with SGD momentum; {how}; torch {torch.__version__}\n")
    cols = "| variant | fused | saved for backward (MiB) | peak of a step (MiB) |"
    extra = " activations / temporaries at the peak (MiB) |" if not args.real else ""
    print(cols + extra)
    print("|---" * (cols.count("|") - 1 + (1 if extra else 0)) + "|")
    base = build_model(args.model, num_classes=10, seed=args.seed).train()
    ref = None
    for name, make in VARIANTS.items():
        model, note = make(copy.deepcopy(base))
        if args.real:
            saved, peak = measure_real(model, args.batch, args.size, device)
            tail = ""
        else:
            saved, peak, by = fake_memory(model, args.batch, args.size)
            tail = f" {by['act'] / 2**20:.1f} / {by['temp'] / 2**20:.1f} |"
        ref = ref or (saved, peak)
        print(f"| {name} | {note} | {saved / 2**20:.2f} ({saved - ref[0]:+,} B) | "
              f"{peak / 2**20:.2f} ({peak - ref[1]:+,} B) |{tail}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
