"""triton_bn: batch normalization on hand-written Triton kernels.

The complete tf.keras BatchNormalization layer (renorm, ghost batches, adjustment), drop-ins for
torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm, on fused Triton kernels (per-tile two-pass moments of
shifted data, merged with Chan's formula; single pass when a channel fits on chip).
"""

import os as _os

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        # No GPU: run the kernels in Triton's CPU interpreter. Process-wide, before triton is
        # imported: Triton decides interpreter or compiler when each function is decorated, and its
        # own modules must agree with ours (tl.sum's combine functions are @jit, gluon asserts
        # it); setting it only while our kernels import, then restoring it, broke both (tried).
        # Never on a machine with a GPU, nor when the user has set TRITON_INTERPRET.
        _os.environ["TRITON_INTERPRET"] = "1"

from .convert import convert_model  # noqa: E402
from .functional import BatchNormFunction, Renorm, RunningStats, batch_norm, normalize  # noqa: E402
from .fuse import FuseReport, fuse  # noqa: E402
from .keras import BatchNormalization  # noqa: E402
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BatchNormalization", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
           "convert_model", "fuse", "FuseReport", "batch_norm", "normalize", "RunningStats",
           "Renorm", "BatchNormFunction", "__version__"]
