"""Long-format result rows (one metric per row) and their CSV files under perf/results/.

Every row carries the run (id, date), the machine (device kind, GPU name), the software (torch,
triton, triton_bn versions) and the case (family, label, shape, layout, dtype, feature, mode,
provider); ``metric`` names what ``value`` holds. See perf/README.md for the schema.
"""

from __future__ import annotations

import csv
import datetime as _dt
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

__all__ = ["COLUMNS", "METRICS", "RunInfo", "run_info", "CsvWriter", "read_rows", "slug",
           "CPU_NOTE"]

COLUMNS = (
    "run_id", "date", "device", "gpu_name", "torch", "triton", "triton_bn",
    "family", "case", "shape", "layout", "dtype", "feature", "mode", "provider",
    "numel", "bytes", "count",
    "metric", "value", "p20", "p80", "unit", "baseline", "note",
)

# metric -> unit. ms: time per call (value = median). gbps: bytes_moved / time. copy_fraction:
# gbps over the copy bandwidth of the same run. speedup: baseline time / provider time (medians).
# rel_err: ||out - ref|| / ||ref|| against float64 (max over the outputs the mode produces).
# copy_gbps: the device-to-device copy itself (provider "copy").
METRICS = {"ms": "ms", "gbps": "GB/s", "copy_fraction": "fraction", "speedup": "x",
           "rel_err": "relative", "copy_gbps": "GB/s", "error": ""}

CPU_NOTE = "CPU interpreter: not GPU figures"


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    date: str
    device: str  # "cuda" or "cpu-interpreter"
    gpu_name: str
    torch: str
    triton: str
    triton_bn: str

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def run_info(cuda: bool) -> RunInfo:
    import triton

    import triton_bn

    now = _dt.datetime.now(_dt.timezone.utc)
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return RunInfo(run_id=now.strftime("%Y%m%dT%H%M%SZ"), date=now.isoformat(timespec="seconds"),
                   device="cuda" if cuda else "cpu-interpreter", gpu_name=name,
                   torch=torch.__version__, triton=triton.__version__,
                   triton_bn=triton_bn.__version__)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class CsvWriter:
    """Appends rows to a CSV as they come (flushed, so a run cut short keeps what it measured)."""

    def __init__(self, path: Path, info: RunInfo) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.info = info
        self.rows: list[dict] = []
        self._fh = open(self.path, "w", newline="")
        self._w = csv.DictWriter(self._fh, fieldnames=COLUMNS)
        self._w.writeheader()
        self._fh.flush()

    def add(self, *, metric: str, value, case=None, mode: str = "", provider: str = "",
            p20=None, p80=None, baseline: str = "", note: str = "") -> dict:
        info = self.info
        if not info.cuda:
            note = f"{note}; {CPU_NOTE}" if note else CPU_NOTE
        row = dict(run_id=info.run_id, date=info.date, device=info.device,
                   gpu_name=info.gpu_name, torch=info.torch, triton=info.triton,
                   triton_bn=info.triton_bn, mode=mode, provider=provider, metric=metric,
                   value=_fmt(value), p20=_fmt(p20), p80=_fmt(p80), unit=METRICS.get(metric, ""),
                   baseline=baseline, note=note)
        if case is not None:
            row.update(family=case.family, case=case.label, shape=case.shape_str,
                       layout=case.layout, dtype=case.dtype, feature=case.feature,
                       numel=case.numel,
                       bytes=case.bytes_moved(mode) if mode else case.nbytes, count=case.count)
        else:
            row.update(family="", case="", shape="", layout="", dtype="", feature="", numel="",
                       bytes="", count="")
        self._w.writerow(row)
        self._fh.flush()
        self.rows.append(row)
        return row

    def close(self) -> None:
        self._fh.close()


def read_rows(paths: Iterable[Path]) -> list[dict]:
    """Rows of result CSVs (as strings); raises ValueError for a CSV without the schema's columns."""
    rows: list[dict] = []
    for p in paths:
        with open(p, newline="") as fh:
            r = csv.DictReader(fh)
            missing = [c for c in ("metric", "value", "provider", "mode", "case")
                       if c not in (r.fieldnames or [])]
            if missing:
                raise ValueError(f"{p}: not a triton-bn result CSV (missing {', '.join(missing)})")
            rows.extend(r)
    return rows


def as_float(v: Optional[str]) -> Optional[float]:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None
