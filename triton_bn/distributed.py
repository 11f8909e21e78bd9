"""Synchronized batch norm over torch.distributed (NCCL on GPUs, gloo on CPUs).

Forward: each rank reduces its (mean, M2, count) per channel with the kernels
(``ops.local_moments``), one ``all_gather`` exchanges a fixed-size [3, S] tensor per rank (so ranks
may hold different batch sizes, zero included), and the finalize kernel merges the P ranks' moments
with Chan's formula in rank order on the device (identical on every rank), updates the running
statistics and normalizes. Backward: one ``all_reduce`` of the two channel sums (sum dy,
sum dy * (x - mean)); dweight/dbias stay local, as torch.nn.SyncBatchNorm's (DDP averages them).
No host synchronisation: the counts travel as float tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import ops
from .functional import normalize

__all__ = ["ProcessGroupSync", "sync_normalize", "world_size"]


def world_size(process_group: Any | None = None) -> int:
    """Processes in ``process_group`` (default: the world); 1 when torch.distributed is not
    initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class ProcessGroupSync:
    """The collectives ``BatchNormFunction`` calls when synchronizing over ``process_group``."""

    def __init__(self, process_group: Any | None = None) -> None:
        self.process_group = process_group

    def exchange(self, x: torch.Tensor, axes: tuple[int, ...], groups: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's (mean [P, S], M2 [P, S], count [P]) of ``x``, in rank order."""
        mean, m2, count = ops.local_moments(x, axes, groups)
        local = torch.stack([mean, m2, torch.full_like(mean, float(count))])  # [3, S]
        gathered = local.new_empty((world_size(self.process_group),) + tuple(local.shape))
        dist.all_gather(list(gathered.unbind(0)), local, group=self.process_group)
        return (gathered[:, 0].contiguous(), gathered[:, 1].contiguous(),
                gathered[:, 2, 0].contiguous())

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sums ``t`` over the ranks, in place."""
        dist.all_reduce(t, group=self.process_group)


def sync_normalize(x: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, *, process_group: Any | None = None,
                   **kwargs: Any) -> torch.Tensor:
    """``functional.normalize`` (same keyword arguments) with the batch statistics of every rank
    of ``process_group`` in training; plain ``normalize`` in inference or with a single process.

    Every rank must call it (with the same arguments but its own batch, which may be empty).
    Ghost batches (groups > 1) are synchronized per ghost batch: ghost batch g holds samples g,
    g + groups, ... of every rank, the same as over the concatenated batch when each rank's batch
    size is a multiple of groups.
    """
    if not kwargs.get("training", True) or world_size(process_group) < 2:
        return normalize(x, weight, bias, **kwargs)
    return _synchronized(x, weight, bias, process_group, kwargs)


@torch.compiler.disable
def _synchronized(x, weight, bias, process_group, kwargs) -> torch.Tensor:
    return normalize(x, weight, bias, sync=ProcessGroupSync(process_group), **kwargs)
