"""What the compile check launches: ``scenarios`` (the real launch code of ``triton_bn.ops`` over
dtypes, layouts, paths and features) and ``tile_sweep`` (the tiles and warps a tuned GPU run may
pick). Each item is (label, knobs for ``tuning.override``, callable, context or None); the knobs
are planner inputs, so every swept value gets its own plan and kernel specialization."""

from __future__ import annotations

import contextlib

# The GPU knobs of tuning.knobs() for a CUDA device (target_programs: 4 x the 132 SMs of an H100).
GPU_KNOBS = {"tile": 4096, "fused_forward_max": 16384, "fused_backward_max": 8192,
             "max_block_channels": 128, "max_block_inner": 1024, "target_programs": 4 * 132,
             "narrow_tile": 2048}
CPU_KNOBS: dict = {}  # the interpreter's defaults (tuning.knobs on a CPU device)


def scenarios(quick: bool, resnet50: bool = False):
    """(label, knobs, callable, context) items; each callable runs launch code of triton_bn.ops.
    With ``resnet50`` only the r50: scenarios (``add_resnet50``), else every other one."""
    import torch

    from triton_bn import ops

    def state(K, pdt, *, weight=True, bias=True, running=True, cumulative=False, renorm=0,
              adjust=False):
        def t():
            return torch.empty(K, dtype=pdt)
        d = {"weight": t() if weight else None, "bias": t() if bias else None,
             "running_mean": t() if running else None, "running_var": t() if running else None}
        if cumulative:
            d["num_batches_tracked"] = torch.ones((), dtype=torch.int64)
        if renorm == ops.RENORM_KERAS:
            d.update(renorm_mean=t(), renorm_stddev=t(), moving_stddev=t())
        if adjust:
            d.update(adj_scale=t(), adj_bias=t())
        return d

    def make_x(shape, dtype, layout):
        if layout == "nhwc":
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            return torch.empty(shape, dtype=dtype, memory_format=fmt)
        return torch.empty(shape, dtype=dtype)

    def step(shape, dtype, layout, *, pdt=None, training=True, backward=True, groups=1,
             residual=False, relu=False, need_dres=False, need_dx=True, need_dw=True,
             need_db=True, sync=False, renorm=0, adjust=False, weight=True, bias=True,
             running=True, cumulative=False, unbiased=True, axes=(1,)):
        """One forward (and backward) through ops, as functional.BatchNormFunction does it."""
        pdt = pdt or dtype
        x = make_x(shape, dtype, layout)
        K = 1
        for a in axes:
            K *= shape[a]
        st = state(K, pdt, weight=weight, bias=bias, running=running, cumulative=cumulative,
                   renorm=renorm, adjust=adjust)
        z = torch.empty_like(x) if residual else None
        kw = {"axes": axes, "groups": groups, "training": training, "relu": relu, "renorm": renorm,
              "cumulative": cumulative, "unbiased": unbiased, "rmin": 0.8 if renorm else None,
              "rmax": 1.25 if renorm else None, "dmax": 0.5 if renorm else None}
        gm = None
        global_count = None
        if sync and training:
            mean, m2, count = ops.local_moments(x, axes, groups)
            gm = (torch.stack([mean, mean]), torch.stack([m2, m2]),
                  torch.full((2,), float(count), dtype=mean.dtype))
            global_count = gm[2].sum().reshape(1)
        r = ops.bn_forward(x, residual=z, global_moments=gm, **st, **kw)
        if not backward:
            return
        dy = torch.empty_like(x)
        y_mask = r.y if z is not None and relu else None  # the ReLU mask after a residual: y > 0
        ops.bn_backward(dy, x, st.get("weight"), st.get("bias"), y_mask, r.centre, r.offset, r.rstd,
                        r.pre_scale, r.pre_shift, r.cut, axes=axes,
                        groups=groups, training=training, relu=relu, need_dx=need_dx,
                        need_dweight=need_dw and weight, need_dbias=need_db and bias,
                        need_dresidual=need_dres,
                        all_reduce=(lambda t: None) if sync and training else None,
                        global_count=global_count)

    @contextlib.contextmanager
    def force_int64():
        old = ops._needs_int64
        ops._needs_int64 = lambda *t: True
        try:
            yield
        finally:
            ops._needs_int64 = old

    # shapes: the (fused, split) plans they get under the GPU knobs are noted
    NCHW_SMALL = (4, 8, 7, 7)        # fused fwd 4x64, fused bwd
    NCHW_MID = (16, 8, 32, 32)       # fused fwd 16x1024 (8 warps); split bwd 4x1024
    NCHW_BIG = (64, 4, 56, 56)       # split 4x1024
    NHWC_SMALL = (8, 16, 4, 4)       # fused 128x16
    NHWC_MID = (16, 64, 8, 8)        # fused fwd 1024x16; split bwd 64x64
    NHWC_WIDE = (32, 256, 8, 8)      # split 32x128
    NC = (256, 64)                   # fused fwd 256x64 / bwd 128x64 (GPU knobs)
    NC_SMALLC = (100000, 3)          # split 512x4 (GPU knobs), 1024x4 (interpreter)

    out = []

    def add(label, knobs, fn, ctx=None):
        out.append((label, knobs, fn, ctx))

    if resnet50:
        add_resnet50(add, step, quick)
        return out, step

    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    dname = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float64: "fp64"}

    def lay(layout):
        return "nchw" if layout == "nc" else layout

    # 1. the plain training / inference step: every dtype x layout x (single pass, split)
    kn_sets = [("gpu", GPU_KNOBS)] if quick else [("gpu", GPU_KNOBS), ("cpu", CPU_KNOBS)]
    if quick:
        core = [(dt, sh) for dt in (torch.float32, torch.bfloat16, torch.float64)
                for sh in (("nchw", NCHW_MID), ("nhwc", NHWC_MID))] + [(torch.float16, ("nc", NC))]
    else:
        core = [(dt, sh) for dt in dtypes
                for sh in (("nchw", NCHW_SMALL), ("nchw", NCHW_MID), ("nchw", NCHW_BIG),
                           ("nhwc", NHWC_SMALL), ("nhwc", NHWC_MID), ("nhwc", NHWC_WIDE), ("nc", NC),
                           ("nc", NC_SMALLC))]
    for kname, kn in kn_sets:
        for dt, (layout, shape) in core:
            tag = f"{kname}:{dname[dt]}:{layout}{'x'.join(map(str, shape))}"
            mem = lay(layout)
            for fused in (True, False):
                add(f"{tag}:train:{'fused' if fused else 'split'}", {**kn, "force_fused": fused},
                    lambda s=shape, d=dt, m=mem: step(s, d, m))
            add(f"{tag}:eval", kn, lambda s=shape, d=dt, m=mem: step(s, d, m, training=False))

    # 2. features (GPU knobs), single pass and split
    features = {
        "keras_renorm+adjust+res+relu": {"renorm": ops.RENORM_KERAS, "adjust": True, "residual": True,
                                         "relu": True, "need_dres": True, "unbiased": False},
        "torch_renorm+cumulative": {"renorm": ops.RENORM_TORCH, "cumulative": True},
        "no_affine+no_running+relu": {"weight": False, "bias": False, "running": False, "relu": True},
        "residual_noact+dres_only": {"residual": True, "need_dres": True, "need_dx": False},
        "res+relu+dres_only": {"residual": True, "relu": True, "need_dres": True, "need_dx": False,
                               "need_dw": False},
        "weight_only+params_fp32": {"bias": False, "pdt": torch.float32},
    }
    feat_shapes = [("nchw", NCHW_MID), ("nhwc", NHWC_MID), ("nc", NC)]
    if quick:
        feat_cases = [(torch.float32, ("nchw", NCHW_MID), "keras_renorm+adjust+res+relu"),
                      (torch.bfloat16, ("nhwc", NHWC_MID), "keras_renorm+adjust+res+relu"),
                      (torch.float32, ("nhwc", NHWC_MID), "torch_renorm+cumulative"),
                      (torch.float16, ("nchw", NCHW_MID), "no_affine+no_running+relu")]
    else:
        feat_cases = [(dt, sh, f) for dt in dtypes for sh in feat_shapes for f in features]
    for dt, (layout, shape), fname in feat_cases:
        mem = lay(layout)
        for fused in (True, False):
            add(f"gpu:{dname[dt]}:{layout}:{fname}:{'fused' if fused else 'split'}",
                {**GPU_KNOBS, "force_fused": fused},
                lambda s=shape, d=dt, m=mem, f=features[fname]: step(s, d, m, **f))

    # 3. inference with residual + ReLU; ghost batches and sync BN (split path only)
    group_cases = ([(torch.float32, ("nchw", NCHW_MID)), (torch.bfloat16, ("nhwc", NHWC_MID))]
                   if quick else [(dt, sh) for dt in dtypes for sh in feat_shapes])
    for dt, (layout, shape) in group_cases:
        tag = f"gpu:{dname[dt]}:{layout}"
        mem = lay(layout)
        add(f"{tag}:eval+res+relu+nobias", GPU_KNOBS,
            lambda s=shape, d=dt, m=mem: step(s, d, m, training=False, residual=True, relu=True,
                                            bias=False, need_dres=True))
        add(f"{tag}:ghost4", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, groups=4))
        add(f"{tag}:ghost4+keras_renorm+adjust", GPU_KNOBS,
            lambda s=shape, d=dt, m=mem: step(s, d, m, groups=4, renorm=ops.RENORM_KERAS, adjust=True))
        add(f"{tag}:sync", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, sync=True))
        if not quick:
            add(f"{tag}:sync+ghost2+relu", GPU_KNOBS,
                lambda s=shape, d=dt, m=mem: step(s, d, m, sync=True, groups=2, relu=True))

    # 4. int64 indexing (forced: tensors over 2**31 elements cannot be allocated here)
    i64_cases = ([(torch.float32, ("nchw", NCHW_MID)), (torch.float32, ("nhwc", NHWC_MID))] if quick
                 else [(dt, sh) for dt in (torch.float32, torch.bfloat16, torch.float64)
                       for sh in feat_shapes])
    for dt, (layout, shape) in i64_cases:
        tag = f"gpu:{dname[dt]}:{layout}:int64"
        mem = lay(layout)
        for fused in (True, False):
            add(f"{tag}:{'fused' if fused else 'split'}", {**GPU_KNOBS, "force_fused": fused},
                lambda s=shape, d=dt, m=mem: step(s, d, m, residual=True, relu=True, need_dres=True),
                force_int64)
        add(f"{tag}:eval", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, training=False),
            force_int64)
        add(f"{tag}:ghost2", GPU_KNOBS, lambda s=shape, d=dt, m=mem: step(s, d, m, groups=2),
            force_int64)

    # 5. degenerate tiles (extents of 1), empty inputs, copies, 5-D, mixed parameter dtypes
    edges = [((1, 1), "nchw"), ((7, 1), "nchw"), ((1, 5), "nchw"), ((3, 5, 1, 1), "nchw"),
             ((1, 4, 3, 3), "nchw"), ((2, 3, 1, 1000), "nchw"), ((1, 3, 5, 5), "nhwc"),
             ((0, 4, 3, 3), "nchw")]
    if quick:
        edges = [((1, 1), "nchw"), ((1, 5), "nchw"), ((7, 1), "nchw")]
    for dt in ((torch.float32,) if quick else (torch.float32, torch.bfloat16)):
        for shape, layout in edges:
            tag = f"gpu:{dname[dt]}:edge{'x'.join(map(str, shape))}:{layout}"
            for fused in (True, False):
                add(f"{tag}:{'fused' if fused else 'split'}", {**GPU_KNOBS, "force_fused": fused},
                    lambda s=shape, d=dt, m=layout: step(s, d, m))
            add(f"{tag}:eval", GPU_KNOBS, lambda s=shape, d=dt, m=layout: step(s, d, m, training=False))
            if not quick and shape[0] % 2 == 0 and shape[0] > 0:
                add(f"{tag}:ghost2", GPU_KNOBS, lambda s=shape, d=dt, m=layout: step(s, d, m, groups=2))
    if not quick:
        add("gpu:fp32:ghost8_one_sample_each", GPU_KNOBS,
            lambda: step((8, 3), torch.float32, "nchw", groups=8))
        add("gpu:fp32:multi_axis(1,3)", GPU_KNOBS,
            lambda: step((4, 6, 5, 7), torch.float32, "nchw", axes=(1, 3)))
        add("gpu:bf16:ndhwc", GPU_KNOBS, lambda: step((4, 16, 4, 4, 4), torch.bfloat16, "nhwc"))
        add("gpu:fp16:x_fp16_params_fp64", GPU_KNOBS,
            lambda: step(NCHW_MID, torch.float16, "nchw", pdt=torch.float64))
        add("gpu:fp64:x_fp64_params_fp16", GPU_KNOBS,
            lambda: step(NHWC_MID, torch.float64, "nhwc", pdt=torch.float16))

        # 6. the memory-bound layouts whose vectorized (16-byte) loads / stores matter
        #    (--scenario vec: --ptx-stats): ResNet-50's first stage NCHW fp32 and channels_last bf16
        #    (split path), a late stage NCHW (single pass; 49-element rows cannot be 16-byte
        #    aligned) and the small-C rank-2 case
        vec_cases = [(torch.float32, "nchw", (32, 64, 56, 56), (False,)),
                     (torch.bfloat16, "nhwc", (32, 64, 56, 56), (False,)),
                     (torch.float32, "nchw", (32, 2048, 7, 7), (True,)),
                     (torch.float32, "nchw", (65536, 3), (False,))]
        for dt, layout, shape, fused_modes in vec_cases:
            tag = f"vec:{dname[dt]}:{layout if len(shape) > 2 else 'nc'}{'x'.join(map(str, shape))}"
            for fused in fused_modes:
                add(f"{tag}:train:{'fused' if fused else 'split'}", {**GPU_KNOBS, "force_fused": fused},
                    lambda s=shape, d=dt, m=layout: step(s, d, m))
            add(f"{tag}:eval", GPU_KNOBS, lambda s=shape, d=dt, m=layout: step(s, d, m, training=False))
            add(f"{tag}:res+relu", GPU_KNOBS,
                lambda s=shape, d=dt, m=layout: step(s, d, m, residual=True, relu=True, need_dres=True))

    # 7. the opt-in persistent forward and backward (TRITON_BN_PERSISTENT=1): their PHASE 0
    #    kernels (the grid barrier included), the capacity check stubbed (it needs a GPU)
    @contextlib.contextmanager
    def persistent_on():
        import os

        from triton_bn import persistent
        old_env, old_cap = os.environ.get(persistent.ENV), persistent.capacity
        os.environ[persistent.ENV] = "1"
        persistent.capacity = lambda compiled, device: 1 << 30
        try:
            yield
        finally:
            persistent.capacity = old_cap
            if old_env is None:
                os.environ.pop(persistent.ENV, None)
            else:
                os.environ[persistent.ENV] = old_env

    pers_cases = [(torch.float32, "nchw", (32, 64, 56, 56), {}),
                  (torch.bfloat16, "nhwc", (32, 64, 56, 56), {}),
                  (torch.float32, "nhwc", (32, 256, 14, 14),
                   {"residual": True, "relu": True, "adjust": True, "unbiased": False,
                    "need_dres": True}),
                  (torch.float64, "nchw", (16, 8, 32, 32), {"cumulative": True}),
                  (torch.float16, "nchw", (65536, 3), {"weight": False, "bias": False,
                                                       "running": False, "relu": True}),
                  (torch.float32, "nchw", (32, 128, 28, 28),
                   {"renorm": ops.RENORM_TORCH, "residual": True, "need_dres": True,
                    "need_dx": False})]
    if quick:
        pers_cases = pers_cases[:2]
    for dt, layout, shape, feat in pers_cases:
        tag = f"persistent:{dname[dt]}:{layout if len(shape) > 2 else 'nc'}{'x'.join(map(str, shape))}"
        add(f"{tag}:{'+'.join(feat) or 'plain'}", {**GPU_KNOBS, "force_fused": False},
            lambda s=shape, d=dt, m=layout, f=feat: step(s, d, m, **f), persistent_on)
        if not quick and not feat:
            add(f"{tag}:int64", {**GPU_KNOBS, "force_fused": False},
                lambda s=shape, d=dt, m=layout: step(s, d, m),
                lambda: _both(persistent_on(), force_int64()))
    return out, step


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


# ResNet-50's batch sizes in the r50: scenarios (the compile report of ``--resnet50``)
RESNET50_BATCHES = (32, 64, 128)
# plans (kind, Geometry, TilePlan) that the launch code of each r50: scenario asked for, by label
# (filled while the scenarios run; the report reads the split reductions' finalize from them)
PLANS: dict = {}


@contextlib.contextmanager
def log_plans(label: str):
    """Records every ``tuning.plan_tiles`` result of the launch code under ``label`` in PLANS."""
    from triton_bn import tuning

    real = tuning.plan_tiles
    log = PLANS.setdefault(label, [])

    def logged(geo, kind, *args, **kwargs):
        plan = real(geo, kind, *args, **kwargs)
        log.append((kind, geo, plan))
        return plan

    tuning.plan_tiles = logged
    try:
        yield
    finally:
        tuning.plan_tiles = real


def add_resnet50(add, step, quick: bool) -> None:
    """The r50: scenarios: every BatchNorm shape of torchvision's ResNet-50 at batch 32, 64 and 128,
    bf16 channels_last and fp32 NCHW, as a training step (forward + backward, plain, and with the
    fused ReLU / residual + ReLU that ``triton_bn.fuse`` gives its layers) and as inference, under
    the GPU knobs. Labels: r50:<dtype>:<layout>:b<batch>:<C>x<HW>:<mode>. ``quick`` keeps batch 32,
    the first stage's 64 x 56 x 56 (split path in both combinations) and its 256 x 56 x 56 bn3's
    training step with the residual + ReLU."""
    import torch

    from triton_bn.bench.shapes import RESNET50_LAYERS

    combos = ((torch.bfloat16, "bf16", "nhwc"), (torch.float32, "fp32", "nchw"))
    layers = [(label, c, hw) for label, c, hw, _ in RESNET50_LAYERS]
    batches = RESNET50_BATCHES
    if quick:
        layers = layers[1:3]
        batches = batches[:1]
    for dt, dn, layout in combos:
        for batch in batches:
            for label, c, hw in layers:
                shape = (batch, c, hw, hw)
                tag = f"r50:{dn}:{layout}:b{batch}:{c}x{hw}"
                # the layer's fused epilogue in a fuse()d model: bn1/bn2 -> ReLU, bn3 -> add -> ReLU
                fused = ({"relu": True} if "bn1" in label else
                         {"residual": True, "relu": True} if "bn3" in label else {})
                modes = [("train", {}), ("eval", {"training": False})]
                if fused:
                    name = "train+res+relu" if fused.get("residual") else "train+relu"
                    modes.insert(1, (name, fused))
                for mode, kw in modes:
                    if quick and fused.get("residual") and mode != "train+res+relu":
                        continue
                    lbl = f"{tag}:{mode}"
                    add(lbl, GPU_KNOBS, lambda s=shape, d=dt, m=layout, k=kw: step(s, d, m, **k),
                        lambda lbl=lbl: log_plans(lbl))


def tile_sweep(step):
    """The main element kernels over the tile sizes and warps a tuned GPU run can pick (the tuner's
    candidates: split tile 2048 / 4096 / 8192 x 4 / 8 warps) plus 1024 and 16384, and the single-pass
    kernels up to twice the default limits. (label, knobs, callable, context) like scenarios(): the
    swept values are ``tuning.override`` knobs, i.e. planner inputs in the plans' memo key."""
    import torch
    out = []
    for dt, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float64, "fp64")):
        for tile, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 4), (8192, 8),
                            (16384, 4), (16384, 8)):
            for layout, shape in (("nchw", (64, 4, 56, 56)), ("nhwc", (32, 256, 8, 8))):
                # what a tuned entry {"fused": false, "tile": ..., "num_warps": ...} sets
                out.append((f"sweep:{dn}:{layout}:split_tile{tile}_w{warps}",
                            dict(GPU_KNOBS, force_fused=False, tile=tile, num_warps=warps),
                            lambda s=shape, d=dt, lay=layout: step(s, d, lay), None))
        for fmax in (4096, 8192, 16384, 32768):
            # shapes whose single-pass tile is exactly fmax elements: [fmax/1024, 1024] (NCHW,
            # 32 x 32 images) and [fmax/64, 64] (NHWC, 64 channels, 4 x 4 images)
            for layout, shape in (("nchw", (fmax // 1024, 4, 32, 32)),
                                  ("nhwc", (fmax // 1024, 64, 4, 4))):
                out.append((f"sweep:{dn}:{layout}:fused_max{fmax}",
                            dict(GPU_KNOBS, force_fused=True, fused_forward_max=fmax,
                                 fused_backward_max=fmax),
                            lambda s=shape, d=dt, lay=layout: step(s, d, lay), None))
    return out


