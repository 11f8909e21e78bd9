"""Plot of ``bench --model`` rows (read from the CSV, never rerun): training images/s per variant,
grouped by execution mode, one panel per model case."""

from __future__ import annotations

from pathlib import Path

from .plotting import _maybe_log, _plt, _title_suffix
from .results import as_float, slug

__all__ = ["plot_models"]

VARIANT_COLOR = {"torch_bn": "tab:blue", "triton_bn_converted": "tab:orange",
                 "triton_bn_fused": "tab:red"}


def plot_models(rows: list[dict], outdir: Path) -> list[Path]:
    """Writes models_images_per_s.png under ``outdir`` (nothing when no row has images/s)."""
    ips = [r for r in rows if r.get("metric") == "images_per_s" and r.get("feature") == "train_step"]
    if not ips:
        return []
    plt = _plt()
    cases = sorted({(r["case"], r["shape"], r["dtype"], r["layout"]) for r in ips})
    fig, axes = plt.subplots(1, len(cases), figsize=(6.0 * len(cases), 4.2), squeeze=False,
                             layout="constrained")
    for ax, (case, shape, dtype, layout) in zip(axes.flat, cases, strict=True):
        sel = [r for r in ips if (r["case"], r["shape"], r["dtype"], r["layout"]) ==
               (case, shape, dtype, layout)]
        modes = [m for m in ("eager", "cuda_graph", "compile") if any(r["mode"] == m for r in sel)]
        variants = [v for v in VARIANT_COLOR if any(r["provider"] == v for r in sel)]
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            vals = [next((as_float(r["value"]) for r in sel if r["provider"] == v and r["mode"] == m),
                         0.0) or 0.0 for m in modes]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(modes))]
            bars = ax.bar(xs, vals, width, color=VARIANT_COLOR[v], label=v)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        _maybe_log(ax, [as_float(r["value"]) for r in sel])  # the interpreter's spread
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel("training images/s (higher is better)")
        ax.set_title(f"{case}, batch {shape}, {dtype}, {layout}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"Whole-model training steps\n{_title_suffix(ips)}", fontsize=9)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"models_images_per_s-{slug(ips[0].get('gpu_name', ''))}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
