"""The end-of-run summary: a table of the main mode and each performance target, met or not.

Works on result rows (from the run in memory or read back from CSVs), so ``triton-bn plot
--summary`` prints the same text for old results.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

from .results import CPU_NOTE, as_float
from .shapes import DTYPES

__all__ = ["summarize", "TARGETS", "geomean", "evaluate_targets"]

BIG_TENSOR_BYTES = 256 * 2**20  # "tensors over 256 MB": x alone over 256 MiB
TARGETS = dict(resnet_vs_eager=1.3, resnet_vs_compile=1.1, copy_fraction=0.8, keras_vs_eager=3.0)
RESNET_COMBOS = (("bf16", "channels_last"), ("fp32", "nchw"))


def geomean(values: Iterable[float]) -> Optional[float]:
    v = [x for x in values if x is not None and x > 0 and math.isfinite(x)]
    if not v:
        return None
    return math.exp(sum(math.log(x) for x in v) / len(v))


def _latest(rows: list[dict]) -> list[dict]:
    """One row per (machine, case, mode, provider, metric, baseline): the latest run's."""
    best: dict = {}
    for r in rows:
        k = (r.get("gpu_name"), r.get("family"), r.get("case"), r.get("shape"), r.get("layout"),
             r.get("dtype"), r.get("feature"), r.get("mode"), r.get("provider"), r.get("metric"),
             r.get("baseline"))
        if k not in best or (r.get("date") or "") >= (best[k].get("date") or ""):
            best[k] = r
    return list(best.values())


def _status(value: Optional[float], target: float, meaningful: bool) -> str:
    if value is None:
        return "NOT MEASURED"
    verdict = "MET" if value >= target else "NOT MET"
    return verdict if meaningful else f"{verdict} (CPU interpreter: not meaningful)"


def _x_bytes(r: dict) -> Optional[int]:
    n = as_float(r.get("numel"))
    d = DTYPES.get(r.get("dtype", ""))
    if n is None or d is None:
        return None
    import torch

    return int(n) * torch.empty((), dtype=d).element_size()


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each target as {name, value, target, status, detail}."""
    rows = _latest(rows)
    meaningful = any(r.get("device") == "cuda" for r in rows)
    speed = defaultdict(list)  # (family, dtype, layout, mode, provider, baseline, feature) -> list
    for r in rows:
        if r.get("metric") == "speedup":
            v = as_float(r.get("value"))
            speed[(r["family"], r["dtype"], r["layout"], r["mode"], r["provider"], r["baseline"],
                   r["feature"])].append((v, r))
    out = []
    for dtype, layout in RESNET_COMBOS:
        for base, key in (("torch_eager", "resnet_vs_eager"), ("torch_compile",
                                                                "resnet_vs_compile")):
            vals = speed.get(("resnet50", dtype, layout, "forward_backward", "triton_bn", base,
                              "bn"), [])
            g = geomean(v for v, _ in vals)
            by_batch = defaultdict(list)
            for v, r in vals:
                by_batch[r["shape"].split("x")[0]].append(v)
            detail = ", ".join(f"batch {b}: {geomean(vs):.2f}x" for b, vs in sorted(
                by_batch.items(), key=lambda kv: int(kv[0])) if geomean(vs)) or ""
            out.append(dict(name=f"ResNet-50 training fwd+bwd, {dtype} {layout}: geomean speedup "
                                 f"over {base} >= {TARGETS[key]}x",
                            value=g, target=TARGETS[key], unit="x",
                            status=_status(g, TARGETS[key], meaningful),
                            detail=f"{len(vals)} shapes" + (f"; {detail}" if detail else "")))
    # copy bandwidth on big tensors: every mode of triton_bn
    fr = defaultdict(list)
    for r in rows:
        if (r.get("metric") == "copy_fraction" and r.get("provider") == "triton_bn"
                and r.get("feature") == "bn"):
            nb = _x_bytes(r)
            if nb is not None and nb > BIG_TENSOR_BYTES:
                fr[r["mode"]].append((as_float(r["value"]), f"{r['shape']} {r['dtype']}"))
    worst = min((v for vals in fr.values() for v, _ in vals), default=None)
    detail = "; ".join(f"{m}: min {min(v for v, _ in vals):.0%} ({len(vals)} cases)"
                       for m, vals in sorted(fr.items()))
    out.append(dict(name=f"triton_bn >= {TARGETS['copy_fraction']:.0%} of copy bandwidth on "
                         "tensors over 256 MiB (every mode; worst case)",
                    value=worst, target=TARGETS["copy_fraction"], unit="fraction",
                    status=_status(worst, TARGETS["copy_fraction"], meaningful), detail=detail))
    # Keras-only features vs their eager composition
    for feat in ("renorm", "ghost", "adjust"):
        vals = [v for k, vs in speed.items() if k[6] == feat and k[3] == "forward_backward"
                and k[4] == "triton_bn" and k[5] == "torch_eager" for v, _ in vs]
        g = geomean(vals)
        out.append(dict(name=f"Keras {feat}: training fwd+bwd geomean speedup over the eager "
                             f"PyTorch composition >= {TARGETS['keras_vs_eager']}x",
                        value=g, target=TARGETS["keras_vs_eager"], unit="x",
                        status=_status(g, TARGETS["keras_vs_eager"], meaningful),
                        detail=f"{len(vals)} shapes"))
    return out


def _table(rows: list[dict], mode: str) -> list[str]:
    cell = {}
    cases = []
    for r in rows:
        if r.get("mode") != mode or not r.get("case"):
            continue
        ck = (r["family"], r["case"], r["shape"], r["dtype"], r["layout"], r["feature"])
        if ck not in cell:
            cell[ck] = {}
            cases.append(ck)
        m, p = r["metric"], r["provider"]
        if m == "ms":
            cell[ck][p] = as_float(r["value"])
        elif m == "speedup":
            cell[ck][f"x_{p}_{r['baseline']}"] = as_float(r["value"])
        elif m in ("gbps", "copy_fraction") and p == "triton_bn":
            cell[ck][m] = as_float(r["value"])
        elif m in ("error", "rel_err") and (m == "error" or "FAILED" in (r.get("note") or "")):
            cell[ck][f"bad_{p}"] = True

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    head = (f"{'family':8s} {'case':22s} {'shape':>18s} {'dtype':5s} {'layout':13s} {'feat':6s} "
            f"{'triton ms':>9s} {'eager ms':>9s} {'compile':>9s} {'vs eager':>8s} {'vs comp':>8s}"
            f" {'GB/s':>8s} {'of copy':>7s}")
    lines = [head, "-" * len(head)]
    for ck in cases:
        c = cell[ck]
        flag = " !" if any(k.startswith("bad_") for k in c) else ""
        lines.append(
            f"{ck[0][:8]:8s} {ck[1][:22]:22s} {ck[2]:>18s} {ck[3]:5s} {ck[4]:13s} {ck[5]:6s} "
            f"{f(c.get('triton_bn'), '9.4g')} {f(c.get('torch_eager'), '9.4g')} "
            f"{f(c.get('torch_compile'), '9.4g')} "
            f"{f(c.get('x_triton_bn_torch_eager'), '7.3g')}x "
            f"{f(c.get('x_triton_bn_torch_compile'), '7.3g')}x"
            f" {f(c.get('gbps'), '8.4g')} {f(c.get('copy_fraction'), '7.0%')}{flag}")
    return lines


def summarize(rows: list[dict]) -> str:
    """Human-readable summary of result rows: machine, copy bandwidth, the main-mode table,
    per-family geomeans and the targets."""
    rows = _latest(rows)
    lines = []
    machines = sorted({(r.get("device"), r.get("gpu_name"), r.get("torch"), r.get("triton"))
                       for r in rows if r.get("device")})
    for dev, gpu, tv, trv in machines:
        lines.append(f"machine: {gpu} [{dev}]  torch {tv}  triton {trv}")
    if any(r.get("device") != "cuda" for r in rows if r.get("device")):
        lines.append(f"NOTE: {CPU_NOTE}. Timings come from Triton's CPU interpreter and PyTorch's "
                     "CPU kernels; the targets below are only meaningful on a GPU.")
    for r in rows:
        if r.get("metric") == "copy_gbps":
            lines.append(f"copy bandwidth: {as_float(r['value']):.1f} GB/s (read + write)")
    modes = [m for m in ("forward_backward", "forward", "backward", "inference")
             if any(r.get("mode") == m for r in rows)]
    if modes:
        lines.append("")
        lines.append(f"mode {modes[0]} (ms = median; speedups of triton_bn; '!' = a failed check "
                     "or an error):")
        lines.extend(_table(rows, modes[0]))
    # per family geomeans for every mode
    geo = defaultdict(list)
    for r in rows:
        if r.get("metric") == "speedup" and r.get("provider") == "triton_bn":
            geo[(r["family"], r["feature"], r["dtype"], r["layout"], r["mode"],
                 r["baseline"])].append(as_float(r["value"]))
    if geo:
        lines.append("")
        lines.append("geomean speedup of triton_bn per family / dtype / layout / mode:")
        for k in sorted(geo):
            g = geomean(geo[k])
            if g is not None:
                lines.append(f"  {k[0]:8s} {k[1]:6s} {k[2]:5s} {k[3]:13s} {k[4]:16s} vs "
                             f"{k[5]:13s} {g:6.3g}x  ({len(geo[k])} shapes)")
    fails = [r for r in rows if "FAILED" in (r.get("note") or "")]
    errors = [r for r in rows if r.get("metric") == "error" and r.get("provider")]
    lines.append("")
    lines.append(f"checks against the float64 reference: {len(fails)} failed; errors: "
                 f"{len(errors)}")
    for r in (fails + errors)[:10]:
        lines.append(f"  {r['provider']} {r['family']} {r['shape']} {r['dtype']} {r['layout']} "
                     f"{r['feature']} {r['mode']}: {r.get('note', '')}")
    lines.append("")
    lines.append("targets:")
    for t in evaluate_targets(rows):
        v = t["value"]
        vs = "-" if v is None else (f"{v:.0%}" if t["unit"] == "fraction" else f"{v:.3g}x")
        lines.append(f"  [{t['status']}] {t['name']}: {vs}" + (f" ({t['detail']})"
                                                              if t["detail"] else ""))
    return "\n".join(lines)
