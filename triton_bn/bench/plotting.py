"""Plots from result CSVs only (never reruns a benchmark): GB/s against size per provider, speedup
bars on the ResNet-50 set, the fraction of copy bandwidth, and the Keras-only features."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .results import as_float, read_rows, slug
from .summary import TARGETS, _latest, geomean

__all__ = ["make_plots"]

PROVIDER_STYLE = {"triton_bn": ("tab:red", "o"), "torch_eager": ("tab:blue", "s"),
                  "torch_compile": ("tab:green", "^")}
MODE_ORDER = ("forward", "backward", "forward_backward", "inference")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title_suffix(rows: list[dict]) -> str:
    r = rows[0]
    s = f"{r.get('gpu_name', '')}, torch {r.get('torch', '')}, triton {r.get('triton', '')}"
    if r.get("device") != "cuda":
        s += "\nCPU INTERPRETER - NOT GPU FIGURES"
    return s


def _maybe_log(ax, values) -> None:
    """Log y axis when speedups span more than 10x (e.g. the CPU interpreter's)."""
    v = [x for x in values if x]
    if v and max(max(v), 1.0) / min(min(v), 1.0) > 10:
        ax.set_yscale("log")


def _series(rows: list[dict], metric: str, mode: str, dtype: str) -> dict:
    """(provider, layout) -> sorted [(bytes, value)] for plain batch norm."""
    out = defaultdict(list)
    for r in rows:
        if (r.get("metric") == metric and r.get("mode") == mode and r.get("dtype") == dtype
                and r.get("feature") == "bn"):
            b, v = as_float(r.get("bytes")), as_float(r.get("value"))
            if b and v is not None:
                out[(r["provider"], r["layout"])].append((b, v))
    return {k: sorted(v) for k, v in out.items()}


def _size_plot(rows: list[dict], metric: str, ylabel: str, fname: str, outdir: Path,
               hline: float | None, hlabel: str) -> list[Path]:
    plt = _plt()
    paths = []
    dtypes = sorted({r["dtype"] for r in rows if r.get("metric") == metric and r.get("dtype")})
    for dtype in dtypes:
        modes = [m for m in MODE_ORDER if _series(rows, metric, m, dtype)]
        if not modes:
            continue
        ncol = min(2, len(modes))
        nrow = (len(modes) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4.2 * nrow), squeeze=False,
                                 layout="constrained")
        for ax, mode in zip(axes.flat, modes, strict=False):
            for (provider, layout), pts in sorted(_series(rows, metric, mode, dtype).items()):
                color, marker = PROVIDER_STYLE.get(provider, ("tab:gray", "x"))
                ls = "--" if layout == "channels_last" else "-" if layout == "nchw" else ":"
                ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], ls=ls, color=color,
                        marker=marker, ms=4, label=f"{provider} ({layout})")
            if hline is not None:
                ax.axhline(hline, color="k", lw=0.8, ls="-.", label=hlabel)
            ax.set_xscale("log")
            ax.set_xlabel("bytes moved per call (MB, minimal count)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}, {dtype}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(modes):]:
            ax.axis("off")
        fig.suptitle(f"{ylabel} vs size - {_title_suffix(rows)}", fontsize=9)
        p = outdir / f"{fname}_{dtype}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _speedup_bars(rows: list[dict], outdir: Path) -> list[Path]:
    plt = _plt()
    sp = [r for r in rows if r.get("metric") == "speedup" and r.get("feature") == "bn"
          and r.get("baseline") == "torch_eager"]
    if not sp:
        return []
    family = "resnet50" if any(r["family"] == "resnet50" for r in sp) else None
    if family:
        sp = [r for r in sp if r["family"] == family]
    modes = [m for m in ("forward_backward", "forward", "backward", "inference")
             if any(r["mode"] == m for r in sp)]
    mode = modes[0]
    sp = [r for r in sp if r["mode"] == mode]
    panels = sorted({(r["dtype"], r["layout"], r["shape"].split("x")[0] if family else "")
                     for r in sp})
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False,
                             layout="constrained")
    for ax, (dtype, layout, batch) in zip(axes.flat, panels, strict=False):
        sel = [r for r in sp if r["dtype"] == dtype and r["layout"] == layout
               and (not family or r["shape"].split("x")[0] == batch)]
        labels = list(dict.fromkeys(f"{r['case']}\n{r['shape']}" for r in sel))
        providers = [p for p in ("triton_bn", "torch_compile") if any(r["provider"] == p
                                                                     for r in sel)]
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            vals = {f"{r['case']}\n{r['shape']}": as_float(r["value"]) for r in sel
                    if r["provider"] == p}
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(labels))]
            g = geomean(vals.values())
            ax.bar(xs, [vals.get(lab) or 0 for lab in labels], width,
                   color=PROVIDER_STYLE[p][0], label=f"{p} (geomean {g:.2f}x)" if g else p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGETS["resnet_vs_eager"], color="tab:red", lw=0.8, ls="--",
                   label=f"target {TARGETS['resnet_vs_eager']}x")
        _maybe_log(ax, [as_float(r["value"]) for r in sel])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=6, rotation=0)
        ax.set_ylabel("speedup vs torch eager")
        where = f"batch {batch}, " if batch else ""
        ax.set_title(f"{family or 'all shapes'}: {mode}, {where}{dtype} {layout}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"speedup over PyTorch eager - {_title_suffix(rows)}", fontsize=9)
    p = outdir / f"speedup_{family or 'all'}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def _keras_bars(rows: list[dict], outdir: Path) -> list[Path]:
    plt = _plt()
    sp = [r for r in rows if r.get("metric") == "speedup" and r.get("feature") not in ("bn", "")
          and r.get("baseline") == "torch_eager"]
    if not sp:
        return []
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in sp)]
    feats = sorted({r["feature"] for r in sp})
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.8), squeeze=False,
                             layout="constrained")
    for ax, mode in zip(axes.flat, modes, strict=False):
        for i, p in enumerate(("triton_bn", "torch_compile")):
            vals = [geomean(as_float(r["value"]) for r in sp if r["mode"] == mode
                            and r["feature"] == f and r["provider"] == p) or 0 for f in feats]
            ax.bar([j + (i - 0.5) * 0.4 for j in range(len(feats))], vals, 0.4,
                   color=PROVIDER_STYLE[p][0], label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGETS["keras_vs_eager"], color="tab:red", lw=0.8, ls="--",
                   label=f"target {TARGETS['keras_vs_eager']}x")
        _maybe_log(ax, [as_float(r["value"]) for r in sp if r["mode"] == mode])
        ax.set_xticks(range(len(feats)))
        ax.set_xticklabels(feats)
        ax.set_title(mode, fontsize=9)
        ax.set_ylabel("geomean speedup vs eager composition")
        ax.legend(fontsize=7)
    fig.suptitle(f"Keras-only features - {_title_suffix(rows)}", fontsize=9)
    p = outdir / "keras_features.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def make_plots(csv_paths: Iterable[Path], outdir: Path) -> list[Path]:
    """Writes PNGs under ``outdir`` from the CSVs; one set per machine when they mix machines."""
    rows = _latest(read_rows([Path(p) for p in csv_paths]))
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    machines = defaultdict(list)
    for r in rows:
        machines[(r.get("device", ""), r.get("gpu_name", ""))].append(r)
    paths: list[Path] = []
    for (device, gpu), mrows in machines.items():
        if not any(r.get("metric") in ("ms", "speedup") for r in mrows):
            continue
        d = outdir if len(machines) == 1 else outdir / slug(f"{device}-{gpu}")
        d.mkdir(parents=True, exist_ok=True)
        copy = [as_float(r["value"]) for r in mrows if r.get("metric") == "copy_gbps"]
        copy_gbps = copy[-1] if copy else None
        paths += _size_plot(mrows, "gbps", "GB/s", "gbps_vs_size", d, copy_gbps,
                            "device copy bandwidth")
        paths += _speedup_bars(mrows, d)
        paths += _size_plot(mrows, "copy_fraction", "fraction of copy bandwidth",
                            "copy_fraction", d, TARGETS["copy_fraction"],
                            f"target {TARGETS['copy_fraction']:.0%}")
        paths += _keras_bars(mrows, d)
    from .model_plot import plot_models  # ``bench --model`` rows

    for d, mrows in ((outdir if len(machines) == 1 else outdir / slug(f"{device}-{gpu}"), mrows)
                     for (device, gpu), mrows in machines.items()):
        paths += plot_models(mrows, d)
    return paths
