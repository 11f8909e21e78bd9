"""Memory of a training step with torch's batch norm + ReLU, triton_bn converted, and fused.

For each variant of one model (same seed, same random batch): the bytes autograd saves for
backward in one forward (``saved_tensors_hooks``, each storage once; all of them, and without
the model's own parameters and buffers), and the peak memory of one training step (forward,
backward, SGD) above what was allocated before it (CUDA allocator on a GPU, profiler allocation
events on the CPU). Writes a Markdown table (perf/README.md has the committed one).

    python perf/fuse_memory.py --model resnet50 --batch 2 --size 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: import this repository's triton_bn
    sys.path.insert(0, str(ROOT))

import triton_bn
from triton_bn.bench.models import (
    build_model,
    model_source,
    peak_bytes,
    saved_bytes,
    train_step,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base = build_model(args.model, num_classes=10, seed=args.seed).to(device).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    variants = {
        "torch BN + ReLU (eager)": lambda m: (m, ""),
        "triton_bn convert_model": lambda m: (triton_bn.convert_model(m), ""),
        "triton_bn fuse (residual='saved', default)": lambda m: _fuse(m, "saved"),
        "triton_bn fuse (residual='all')": lambda m: _fuse(m, "all"),
    }
    where = f"{torch.cuda.get_device_name()}" if cuda else "CPU (Triton interpreter)"
    print(f"{args.model} ({model_source(args.model)}), batch {args.batch}, "
          f"{args.size}x{args.size}, fp32, {where}, torch {torch.__version__}\n")
    print("| variant | fused | saved for backward (MB) | of which activations (MB) | "
          "saved tensors | peak of a step (MB) |")
    print("|---|---|---|---|---|---|")
    for name, make in variants.items():
        t0 = time.perf_counter()
        model, note = make(copy.deepcopy(base))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sb = saved_bytes(model, lambda m=model: F.cross_entropy(m(x), y))
        opt.zero_grad(set_to_none=True)
        peak = peak_bytes(lambda m=model, o=opt: train_step(m, o, x, y), device)
        print(f"| {name} | {note} | {sb.total / 2**20:.3f} | {sb.activations / 2**20:.3f} | "
              f"{sb.tensors} | {peak / 2**20:.3f} |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


def _fuse(model, residual):
    model, report = triton_bn.fuse(model, residual=residual, return_report=True)
    return model, f"{report.count('relu')} BN+ReLU, {report.count('add+relu')} BN+add+ReLU"


if __name__ == "__main__":
    raise SystemExit(main())
