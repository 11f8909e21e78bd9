"""Phase 1: run the launch code under a ``jit_cache_hook`` that records the specialization of every
launch (signature, divisibility attributes, constexprs, num_warps) and skips it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from .driver import activate
from .scenarios import scenarios, tile_sweep

SHORT = {"CHANNELS_FAST": "CF", "HAS_GROUPS": "GROUPS", "HAS_RESIDUAL": "RES", "HAS_WEIGHT": "W",
         "HAS_BIAS": "B", "HAS_ADJUST": "ADJ", "UPDATE_RUNNING": "UPD", "UNBIASED": "UNB",
         "CUMULATIVE": "CUM", "SAVE_PRE_AFFINE": "PREAFF", "FROM_RUNNING": "RUNNING",
         "HAS_COUNTS": "COUNTS", "HAS_PIVOT": "PIVOT",
         "TRAINING": "TRAIN", "HAS_PRE_AFFINE": "PREAFF", "WRITE_DW": "DW", "WRITE_DB": "DB",
         "WRITE_DX": "DX", "ROWS_FLAT": "FLAT", "WRITE_DRESIDUAL": "DRES", "N_FROM_PTR": "NPTR"}
DT = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "fp64": "f64", "i64": "i64", "i32": "i32"}


@dataclass
class Spec:
    kernel: str
    fn_key: str  # "module:qualname" of its JITFunction (driver.jit_function)
    data: str  # JITFunction specialization data (JSON), for JITFunction.preload
    flags: str
    scenario: str
    arch: int
    tile_sweep: bool = False
    features: frozenset = frozenset()
    scenarios: list = field(default_factory=list)  # every scenario that launched it, in order
    blocks: tuple = ()  # the BLOCK_* constexprs, in signature order
    num_warps: int | None = None

    def summary(self) -> dict:
        """What --list --json writes for it."""
        return {"kernel": self.kernel, "flags": self.flags, "scenario": self.scenario,
                "scenarios": self.scenarios, "arch": self.arch, "tile_sweep": self.tile_sweep,
                "blocks": list(self.blocks), "num_warps": self.num_warps}


class Recorder:
    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.specs: dict[tuple, Spec] = {}
        self.scenario = ""
        self.tile_sweep = False
        self.scenario_errors: list[tuple[str, str]] = []

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        data = compile["specialization_data"]
        ident = (fn.name, str(key))
        if ident in self.specs:
            self.specs[ident].scenarios.append(self.scenario)
        else:
            jf = fn.jit_function
            parsed = json.loads(data)
            blocks = tuple(v for n, v in constexprs(jf, parsed).items() if n.startswith("BLOCK_"))
            self.specs[ident] = Spec(fn.name, f"{jf.fn.__module__}:{jf.fn.__qualname__}", data,
                                     describe(jf, parsed), self.scenario, self.arch,
                                     self.tile_sweep, features(fn.name, jf, parsed),
                                     [self.scenario], blocks,
                                     parsed["options"].get("num_warps"))
        return True  # do not compile or launch now

    def run(self, label: str, fn: Callable[[], object], tile_sweep: bool = False) -> None:
        self.scenario, self.tile_sweep = label, tile_sweep
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a scenario that the launch code itself rejects
            self.scenario_errors.append((label, f"{type(e).__name__}: {e}"))


def constexprs(jf, data: dict) -> dict:
    """name -> value of the constexpr arguments of one specialization (not the ints specialized
    as == 1, such as unit strides)."""
    return {jf.arg_names[k[0]]: v for k, v in zip(data["constant_keys"], data["constant_vals"])
            if jf.params[k[0]].is_constexpr}


def describe(jf, data: dict) -> str:
    """Compact flags of one specialization: constexprs, pointer dtypes, num_warps."""
    names = jf.arg_names
    consts = constexprs(jf, data)
    parts = []
    blocks = [f"{consts.pop(n)}" for n in ("BLOCK_A", "BLOCK_B", "BLOCK_C") if n in consts]
    for n, v in consts.items():
        if n == "ALIGN":
            if v > 1:
                parts.append(f"ALIGN={v}")
        elif n == "RENORM":
            if v:
                parts.append({1: "RENORM=keras", 2: "RENORM=torch"}.get(v, f"RENORM={v}"))
        elif isinstance(v, bool) or v in (0, 1):
            if v:
                parts.append(SHORT.get(n, n))
        else:
            parts.append(f"{SHORT.get(n, n)}={v}")
    sig = data["signature"]
    first_ptr = next((sig[n] for n in names if str(sig.get(n, "")).startswith("*")), "?")
    acc_ptr = next((sig[n] for n in ("Mean", "PartMean", "Scale", "Parts") if n in sig
                    and str(sig[n]).startswith("*")), "?")
    dt = f"{DT.get(first_ptr[1:], first_ptr[1:])}/{DT.get(acc_ptr[1:], acc_ptr[1:])}"
    head = f"{dt} {'x'.join(blocks)} w{data['options'].get('num_warps', '?')}"
    return head + (" " + " ".join(parts) if parts else "")


def features(kernel: str, jf, data: dict) -> frozenset:
    """What a specialization exercises, for --cover: each constexpr value (per kernel), the pointer
    dtypes, the orientation x dtype, the warps, and whether a tile dimension is 1."""
    out = {(kernel,)}
    consts = constexprs(jf, data)
    blocks = [v for n, v in consts.items() if n.startswith("BLOCK_")]
    for n, v in consts.items():
        if not n.startswith("BLOCK_"):
            out.add((kernel, n, v))
    dts = tuple(sorted({v for v in data["signature"].values() if str(v).startswith("*")}))
    out.add((kernel, "dtypes", dts))
    out.add((kernel, "orientation", consts.get("CHANNELS_FAST"), dts))
    out.add((kernel, "warps", data["options"].get("num_warps")))
    out.add((kernel, "unit tile dim", 1 in blocks))
    return frozenset(out)


def cover(specs: list[Spec]) -> list[Spec]:
    """A small subset of specs with every feature of the whole set (greedy set cover)."""
    todo = set().union(*(s.features for s in specs)) if specs else set()
    chosen = []
    while todo:
        best = max(specs, key=lambda s: len(s.features & todo))
        chosen.append(best)
        todo -= best.features
    return chosen



def collect(arch: int, quick: bool, sweep: bool, only: str = "", resnet50: bool = False) -> Recorder:
    """Runs the scenarios (and the tile sweep) whose label contains ``only`` for sm_``arch``;
    with ``resnet50`` the r50: scenarios instead (scenarios.add_resnet50)."""
    from triton import knobs

    from triton_bn import tuning

    activate(arch)
    rec = Recorder(arch)
    knobs.runtime.jit_cache_hook = rec.hook
    try:
        items, step = scenarios(quick, resnet50)
        for label, kn, fn, ctx in items:
            if only not in label:
                continue
            with tuning.override(**kn), (ctx() if ctx else contextlib.nullcontext()):
                rec.run(label, fn)
        if sweep:
            for label, kn, fn, ctx in tile_sweep(step):
                if only not in label:
                    continue
                with tuning.override(**kn), (ctx() if ctx else contextlib.nullcontext()):
                    rec.run(label, fn, tile_sweep=True)
    finally:
        knobs.runtime.jit_cache_hook = None
    return rec


