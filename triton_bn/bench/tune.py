"""``triton-bn tune``: times every candidate launch configuration of the reduction kernels per
shape and writes the fastest to the JSON cache that ``tuning.plan_tiles`` reads
(``tuning.cache_path()``: env TRITON_BN_TUNE_CACHE, else ~/.cache/triton_bn/tune.json).

An entry is keyed by ``tuning.cache_key(kind, geometry, dtype, device)`` (the key names the GPU,
so a cache tuned on one card is not applied on another); plan_tiles reads its
``tuning.CACHE_FIELDS`` (fused, tile, num_warps, target_programs), validated when the file is
loaded; the rest records the run: the timing of every candidate, the device and the versions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

import triton_bn
from triton_bn import tuning
from triton_bn.ops import prepare

from .progress import progress_bar
from .results import RunInfo
from .runner import CHECK_TOL, rel_err
from .shapes import Case
from .timing import TimerConfig, bench_fn

__all__ = ["candidates", "tune_case", "run_tune", "write_cache"]

def candidates(cuda: bool, sm_count: int = 1) -> list[dict]:
    """The search space: the single-pass kernel (where it fits) and split configurations."""
    out: list[dict] = [{"fused": True}]
    if cuda:
        for tile in (2048, 4096, 8192):
            for warps in (4, 8):
                for per_sm in (2, 4, 8):
                    out.append({"fused": False, "tile": tile, "num_warps": warps,
                                "target_programs": per_sm * sm_count})
    else:  # the interpreter: warps do nothing, fewer larger tiles are faster
        for tile in (1024, 4096):
            for programs in (1, 4):
                out.append({"fused": False, "tile": tile, "num_warps": 4,
                            "target_programs": programs})
    return out


def _geometry(x: torch.Tensor):
    return prepare(x.shape, [x, x], (1,), 1).geometry


def tune_case(case: Case, kind: str, device: torch.device, timer: TimerConfig,
              sm_count: int, bar=None, seed: int = 0) -> Optional[tuple[str, dict]]:
    """(cache key, entry) for one case and kernel kind, or None if nothing valid ran."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    x = case.make_input(device, gen).requires_grad_(True)
    dy = case.make_input(device, gen)
    C = case.channels
    w = torch.rand(C, device=device, generator=gen).add_(0.5).requires_grad_(True)
    b = torch.rand(C, device=device, generator=gen).sub_(0.5).requires_grad_(True)
    rm = torch.zeros(C, device=device)
    rv = torch.ones(C, device=device)
    geo = _geometry(x)
    key = tuning.cache_key(kind, geo, case.torch_dtype, device)

    def forward():
        return triton_bn.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    # the heuristic's result is the yardstick every candidate must reproduce
    y0 = forward()
    y0.backward(dy)
    want = (y0.detach() if kind == "forward" else x.grad.detach()).clone()
    x.grad = None
    tol = CHECK_TOL[case.dtype]
    seen_plans: dict = {}
    results = []
    for cand in candidates(device.type == "cuda", sm_count):
        with tuning.use_entries({key: cand}):
            plan = tuning.plan_tiles(geo, kind, device, case.torch_dtype)
            if cand.get("fused") and not plan.fused:
                if bar is not None:
                    bar.update(1)
                continue  # the single-pass kernel does not fit this shape
            if plan in seen_plans:  # same launch as an earlier candidate
                if bar is not None:
                    bar.update(1)
                continue
            seen_plans[plan] = cand
            rec = dict(cand)
            try:
                if kind == "forward":
                    got = forward().detach()
                    fn, g2n = forward, None
                else:
                    y = forward()
                    y.backward(dy, retain_graph=True)
                    got = x.grad.detach().clone()

                    def fn(y=y):
                        y.backward(dy, retain_graph=True)
                    g2n = [x, w, b]
                err = rel_err(got, want.to(torch.float64))
                rec["rel_err"] = err
                if err > tol:
                    rec["rejected"] = f"differs from the heuristic's result (rel_err {err:.3g})"
                else:
                    t = bench_fn(fn, timer, g2n)
                    rec.update(ms=t.median, p20=t.p20, p80=t.p80)
            except Exception as exc:  # noqa: BLE001 - a candidate that fails is recorded, not fatal
                rec["rejected"] = f"{type(exc).__name__}: {exc}"[:200]
            x.grad = None
            rec["plan"] = {"fused": plan.fused, "BLOCK_A": plan.BLOCK_A, "BLOCK_B": plan.BLOCK_B,
                           "programs": plan.grid[0], "num_warps": plan.num_warps}
            results.append(rec)
        if bar is not None:
            bar.update(1)
    valid = [r for r in results if "ms" in r]
    if not valid:
        return None
    best = min(valid, key=lambda r: r["ms"])
    entry = {k: best[k] for k in tuning.CACHE_FIELDS if k in best}
    entry.update(ms=best["ms"], shape=list(case.shape), layout=case.layout, dtype=case.dtype,
                 candidates=results)
    return key, entry


def write_cache(path: Path, entries: dict, info: RunInfo) -> None:
    """Merges entries into the JSON cache at ``path`` (atomically) and drops the in-process copy.
    Keys of an older triton_bn (without a GPU name, which ``tuning.load_cache`` rejects) are
    dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data = {k: v for k, v in data.items() if not tuning.is_legacy_key(k)}
    for key, entry in entries.items():
        entry = dict(entry, device=info.gpu_name, device_kind=info.device, torch=info.torch,
                     triton=info.triton, triton_bn=info.triton_bn, date=info.date)
        data[key] = entry
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    tuning.load_cache.cache_clear()


def run_tune(cases: list[Case], kinds: tuple[str, ...], cache: Path, device: torch.device,
             timer: TimerConfig, info: RunInfo, max_minutes: float, progress: bool = True
             ) -> dict:
    """Tunes every case x kind within the time budget; writes the cache after each case (so a
    run cut short keeps what it found); returns {key: entry}."""
    sm = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 1
    per = len(candidates(device.type == "cuda", sm))
    bar = progress_bar(total=len(cases) * len(kinds) * per, enabled=progress, desc="tune")
    deadline = time.perf_counter() + max_minutes * 60
    found: dict = {}
    for i, case in enumerate(cases):
        if time.perf_counter() > deadline:
            bar.write(f"time budget of {max_minutes:g} min reached: {len(cases) - i} cases not "
                      "tuned")
            break
        bar.set_description(f"tune {case.shape_str} {case.dtype} {case.layout}"[:48])
        new = {}
        for kind in kinds:
            res = tune_case(case, kind, device, timer, sm, bar, seed=i)
            if res is None:
                bar.write(f"{case.key} {kind}: no candidate ran")
                continue
            key, entry = res
            new[key] = entry
            n_ok = sum(1 for c in entry["candidates"] if "ms" in c)
            chosen = {k: entry[k] for k in tuning.CACHE_FIELDS if k in entry}
            bar.write(f"{case.shape_str:>18s} {case.dtype:4s} {case.layout:13s} {kind:8s} "
                      f"best {entry['ms']:.4g} ms of {n_ok} candidates: {chosen}")
        if new:
            write_cache(cache, new, info)
            found.update(new)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return found
