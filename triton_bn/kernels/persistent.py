"""Persistent training forward and backward: x (and dy) read once at sizes one program cannot
hold (see triton_bn/persistent.py). OPT-IN and NOT YET RUN ON A GPU: TRITON_BN_PERSISTENT=1.

bn_persistent_forward_kernel, one launch of co-resident programs (a cooperative launch):
    1. each program loads its share of x, ONE [BLOCK_A, BLOCK_B] tile, into registers and
       writes the tile's (sum, M2) of x - pivot per statistic channel to its fixed slot
       PartSum/PartM2[part, s] (the split path's bn_stats_kernel does the same per part);
    2. grid_barrier: every program waits until every program has written its slots;
    3. every program merges all parts of its channels in the same fixed order (merge_parts:
       deterministic, no float atomics, the same result in every program), derives the
       coefficients with channel_affine_and_update and normalizes the tile still in registers;
       y is written once. Only the part-0 program of a channel writes Offset/Rstd and updates
       the running statistics (exactly one writer per channel).
Bytes moved: x read once, y written once (2 per element, against 3 on the split path).
bn_persistent_backward_kernel does the same with x and dy (sums of g, g * (x - m) and x - m
through the barrier; 3 bytes per element moved against 5).

Every program reads the state channel_affine_and_update reads; the part-0 program also writes
it. Renorm reads the running / renorm statistics that part 0 updates, so renorm (and ghost
batches, whose group statistics this kernel does not merge) take the split path: the planner
never sends them here.

PHASE: 0 the whole kernel (GPU only: the barrier spins until every program has arrived, which
needs all programs resident at once). Triton's CPU interpreter runs programs one after another,
so a spinning barrier would never return there; the same code then runs as two launches:
PHASE 1 up to the barrier (partials written), PHASE 2 after it (x loaded again, merge, y).
"""

import triton
import triton.language as tl

from .backward import (
    INPUT_GRAD_FLAGS,
    PARAM_GRAD_FLAGS,
    SAVED_FLAGS,
    channel_grad_terms,
    load_x_and_gated_dy,
    saved_channel_terms,
    store_param_grads,
    store_part_sums,
    store_tile_grads,
    sum_parts,
)
from .common import (
    chan_merge,
    fold_mean_error,
    given,
    load_pivot,
    mean_and_error,
    mean_from_sum,
    normalized,
    program_ranges,
    sqrt_rn,
    store_cut,
    tile_indices,
    tile_moments,
    tile_offsets,
)
from .forward import channel_affine_and_update, merge_parts, store_output

INT32_SIGN = tl.constexpr(2147483648)  # 2**31: the counter's top bit


@triton.jit
def grid_barrier(Bar, pid, n_programs, SPIN: tl.constexpr):
    """Waits until all n_programs programs of the grid have called it (all must be resident).

    The counter-flip scheme of CUDA's cooperative groups (grid.sync): program 0 adds
    2**31 - (n_programs - 1), every other program adds 1. Together they add exactly 2**31
    (mod 2**32), so the counter's top bit flips once per barrier and its low 31 bits come back
    to what they were: the counter resets itself, repeated calls and CUDA-graph replays find it
    ready, and int32 wrap-around is harmless. A program is released when the top bit differs
    from the value it saw on arrival (old ^ now < 0). The arrival is a release (the program's
    partial statistics, stored by all its threads before the block barrier, become visible
    with it); the polls are acquires, followed by a block barrier, so every thread of the
    program sees the other programs' partials afterwards. SPIN=False arrives without waiting
    (a test of the counter arithmetic in the interpreter, where programs run one at a time).
    """
    tl.debug_barrier()  # all threads' stores of this program are done
    # in 64 bits, truncated: 2**31 itself (one program) becomes -2**31, the same bits
    inc = tl.where(pid == 0, INT32_SIGN - (n_programs.to(tl.int64) - 1), 1).to(tl.int32)
    old = tl.atomic_add(Bar, inc, sem="release", scope="gpu")
    if SPIN:
        now = tl.atomic_add(Bar, 0, sem="acquire", scope="gpu")
        while (old ^ now) >= 0:
            now = tl.atomic_add(Bar, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()  # no thread reads partials before the poll succeeded


@triton.jit
def program_tile(sizes, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr, BLOCK_A: tl.constexpr,
                 BLOCK_B: tl.constexpr):
    """A persistent program's share of the tensor, exactly one tile: (part, number of parts, b
    range, fixed channel, the tile's indices and mask; see program_ranges, tile_indices)."""
    R1, K, _, A, B, a_chunk, b_chunk, n_channel_tiles, n_b_parts = sizes
    part, a_begin, a_end, b_begin, b_end, s_fixed = program_ranges(
        tl.program_id(0), n_channel_tiles, n_b_parts, A, B, a_chunk, b_chunk, BLOCK_B,
        CHANNELS_FAST, INT64, 1)
    n_parts = tl.num_programs(0) // n_channel_tiles
    a, b, b_mask, mask = tile_indices(a_begin, b_begin, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
    return part, n_parts, b_begin, b_end, s_fixed, a, b, b_mask, mask


@triton.heuristics(given(HAS_RESIDUAL="Residual", HAS_WEIGHT="Weight", HAS_BIAS="Bias",
    HAS_ADJUST="AdjScale", SAVE_PRE_AFFINE="PreScale", HAS_CUT="Cut"))
@triton.jit
def bn_persistent_forward_kernel(
    X, Y, Residual,                # activation in, output, optional residual added before the act.
    PartSum, PartM2,               # [n_parts, K] fixed slots: each part's sum of x - pivot and M2
    Bar,                           # [1] int32 barrier counter (self-resetting, see grid_barrier)
    Offset, Rstd,                  # [K] out: batch mean - centre (x's pivot), 1/std
    Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
    RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd,
    sizes,                         # see common.SIZE_FIELDS (S == K: no ghost batches)
    B_count,
    Hyper,                         # [6] see forward.HYPER_FIELDS
    Cut,                           # [2K] out (HAS_CUT): the fused ReLU's cuts (common.relu_cut)
    stride_x, stride_y, stride_z,  # each (r0, r1, g, k)
    CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, HAS_CUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADJUST: tl.constexpr,
    RENORM: tl.constexpr, UPDATE_RUNNING: tl.constexpr, UNBIASED: tl.constexpr,
    CUMULATIVE: tl.constexpr, SAVE_PRE_AFFINE: tl.constexpr,
    COUNT_BATCH: tl.constexpr,     # NumBatches is counted after the launch (persistent.forward)
    PHASE: tl.constexpr,           # 0: whole kernel with the barrier; 1 / 2: before / after it
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """No ghost batches (G == 1, S == K) and no renorm (RENORM == 0); a_chunk == BLOCK_A and,
    reduction fast, b_chunk == BLOCK_B: a program's share is exactly one tile."""
    ACC = Offset.dtype.element_ty
    pid = tl.program_id(0)
    R1, K, _, A, B, a_chunk, b_chunk, n_channel_tiles, n_b_parts = sizes
    part, n_parts, b_begin, b_end, s_fixed, a, b, b_mask, mask = program_tile(
        sizes, CHANNELS_FAST, INT64, BLOCK_A, BLOCK_B)
    # the pivot is each channel's first element, the same in every part (see load_pivot)
    b_first = b_begin + tl.arange(0, BLOCK_B)
    pivot = load_pivot(X, b_first, b_first < b_end, s_fixed, K, stride_x, ACC, False,
                       CHANNELS_FAST)
    x_offs = tile_offsets(a, b, s_fixed, R1, K, stride_x, False, CHANNELS_FAST, False, 1)
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC)  # kept in registers
    if CHANNELS_FAST:
        c = b_first
        c_mask = b_first < b_end
    else:
        c = s_fixed + tl.arange(0, 1)  # merge_parts works on channel vectors
        c_mask = c < K

    if PHASE != 2:  # 1. this part's statistics to its fixed slots
        total, m2, n_tile = tile_moments(x, pivot, mask)
        if CHANNELS_FAST:
            tl.store(PartSum + part * K + c, total, mask=c_mask)
            tl.store(PartM2 + part * K + c, m2, mask=c_mask)
        else:  # the part's b range is part of the part index (program_ranges)
            total, m2, n_tile = tl.reduce((total, m2, n_tile), 0, chan_merge)
            tl.store(PartSum + part * K + s_fixed, total)
            tl.store(PartM2 + part * K + s_fixed, m2)
    if PHASE == 0:  # 2. wait for every part
        grid_barrier(Bar, pid, tl.num_programs(0), True)
    if PHASE != 1:  # 3. merge in a fixed order, normalize the tile still in registers
        if CHANNELS_FAST:
            total, m2, n = merge_parts(PartSum, PartM2, PartSum, c, c_mask, K, n_parts, n_b_parts,
                                       A, a_chunk, B_count, b_chunk, ACC, False, BLOCK_B, BLOCK_P)
        else:
            total, m2, n = merge_parts(PartSum, PartM2, PartSum, c, c_mask, K, n_parts, n_b_parts,
                                       A, a_chunk, B_count, b_chunk, ACC, False, 1, BLOCK_P)
        offset = total / tl.maximum(n, 1.0)
        var = m2 / tl.maximum(n, 1.0)
        rstd = 1.0 / sqrt_rn(var + tl.load(Hyper))
        if CHANNELS_FAST:
            centre = tl.reshape(pivot, [BLOCK_B])
        else:
            centre = pivot + tl.zeros([1], ACC)
        mean = mean_from_sum(centre, total, n)
        if part == 0:  # the one program per channel that writes the per-channel outputs
            multiplier, shift = channel_affine_and_update(
                c, c_mask, mean, var, n, Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
                RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd, Hyper,
                HAS_WEIGHT, HAS_BIAS, HAS_ADJUST, RENORM, UPDATE_RUNNING, UNBIASED, CUMULATIVE,
                SAVE_PRE_AFFINE, COUNT_BATCH)
        else:
            multiplier, shift = channel_affine_and_update(
                c, c_mask, mean, var, n, Weight, Bias, AdjScale, AdjBias, PreScale, PreShift,
                RunMean, RunVar, NumBatches, RenormMean, RenormStd, MovingStd, Hyper,
                HAS_WEIGHT, HAS_BIAS, HAS_ADJUST, RENORM, False, UNBIASED, CUMULATIVE, False,
                COUNT_BATCH)
        scale = rstd * multiplier
        m, mean_error = mean_and_error(centre, offset)  # the rounded mean, and its error
        shift = fold_mean_error(shift, mean_error, scale)  # y = (x - m) * scale + shift
        if part == 0:
            tl.store(Offset + c, offset, mask=c_mask)
            tl.store(Rstd + c, rstd, mask=c_mask)
            if HAS_CUT:
                store_cut(Cut, c, c_mask, K, scale, shift)
        if CHANNELS_FAST:
            m = m[None, :]
            scale = scale[None, :]
            shift = shift[None, :]
        else:
            m = tl.sum(m, 0)  # the one channel's values as scalars
            scale = tl.sum(scale, 0)
            shift = tl.sum(shift, 0)
        store_output(Y, Residual, normalized(x, m, scale, shift), a, b, s_fixed, mask, R1, K,
                     stride_y, stride_z, HAS_RESIDUAL, RELU, CHANNELS_FAST)


@triton.heuristics({**SAVED_FLAGS, **PARAM_GRAD_FLAGS, **INPUT_GRAD_FLAGS})
@triton.jit
def bn_persistent_backward_kernel(
    X, DY, Y, DX, DResidual,       # Y: the forward's output (HAS_RESIDUAL: the ReLU mask, not y <= 0)
    Parts,                         # [3, n_parts, K] fixed slots: each part's sums of g, g * (x - m), x - m
    Bar,                           # [1] int32 barrier counter (see grid_barrier)
    Centre,                        # [K] the forward's centres (HAS_CENTRE), else x's pivots
    Offset, Rstd,                  # [K] fp32 forward statistics: mean - centre (HAS_OFFSET), 1/std
    Weight, Bias, PreScale, PreShift,  # [K] gamma, beta (RELU only), pre-gamma affine (HAS_PRE_AFFINE)
    DWeight, DBias,                # [K] out
    sizes,                         # see common.SIZE_FIELDS (S == K: no ghost batches)
    n,
    stride_x, stride_dy, stride_y, stride_dx, stride_dz,  # each (r0, r1, g, k)
    CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    HAS_CENTRE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr,
    PHASE: tl.constexpr,           # as in bn_persistent_forward_kernel
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Training backward (G == 1), x and dy read once: each program holds its tile of x and g
    (dy gated by the fused ReLU), writes its channel sums of g and g * (x - mean) to its fixed
    slots, waits at the grid barrier, adds every part's sums in a fixed order and writes dx (and
    the residual's gradient) from the tiles in registers; the part-0 program of a channel writes
    dgamma and dbeta. The maths is bn_fused_backward_kernel's (see backward.py)."""
    ACC = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    R1, K, _, A, B, a_chunk, b_chunk, n_channel_tiles, n_b_parts = sizes
    part, n_parts, b_begin, b_end, s_fixed, a, b, b_mask, mask = program_tile(
        sizes, CHANNELS_FAST, INT64, BLOCK_A, BLOCK_B)
    if CHANNELS_FAST:
        c = b_begin + tl.arange(0, BLOCK_B)
        c_mask = c < b_end
        cs = c
    else:
        c = s_fixed + tl.arange(0, 1)  # the channel as a vector (sum_parts), and as a scalar
        c_mask = c < K
        cs = s_fixed
    mean, scale, shift = saved_channel_terms(  # the sums are about the mean
        X, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, cs, c_mask, K, stride_x, ACC,
        HAS_CENTRE, HAS_OFFSET, HAS_WEIGHT, HAS_BIAS, HAS_PRE_AFFINE, False, CHANNELS_FAST)
    x, g = load_x_and_gated_dy(
        X, DY, Y, a, b, s_fixed, mask, mean, scale, shift, R1, K,
        stride_x, stride_dy, stride_y, ACC, False, CHANNELS_FAST, HAS_RESIDUAL, RELU,
        False, "", 1)
    xm = tl.where(mask, x - mean, 0.0)
    # the sums' rows: x - m only where m has an error (see backward.py's docstring)

    if PHASE != 2:  # 1. this part's sums to its fixed slots
        store_part_sums(Parts, part, n_parts, K, g, g * xm, xm, b_begin, b_end, s_fixed, HAS_OFFSET,
                        CHANNELS_FAST, BLOCK_B)
    if PHASE == 0:  # 2. wait for every part
        grid_barrier(Bar, pid, tl.num_programs(0), True)
    if PHASE != 1:  # 3. add the parts in a fixed order; dx from the tiles in registers
        plane = tl.cast(n_parts, tl.int64) * K
        if CHANNELS_FAST:
            sum_dy, sum_dy_xm, sum_xm = sum_parts(Parts, c, c_mask, K, n_parts, plane, HAS_OFFSET,
                                                  ACC, BLOCK_B, BLOCK_P)
        else:
            sum_dy, sum_dy_xm, sum_xm = sum_parts(Parts, c, c_mask, K, n_parts, plane, HAS_OFFSET,
                                                  ACC, 1, BLOCK_P)
        rstd = tl.load(Rstd + c, mask=c_mask, other=0.0).to(ACC)
        multiplier = tl.full(rstd.shape, 1.0, ACC)  # Scale / rstd, as channel_coefficients
        if HAS_PRE_AFFINE:
            multiplier = tl.load(PreScale + c, mask=c_mask, other=0.0).to(ACC)
        if HAS_WEIGHT:
            multiplier = multiplier * tl.load(Weight + c, mask=c_mask, other=0.0).to(ACC)
        scale_c = rstd * multiplier
        sum_dy_xhat, coef_b, coef_c = channel_grad_terms(sum_dy, sum_dy_xm, sum_xm, rstd, scale_c,
                                                         n, True)
        if part == 0:  # one writer per channel
            store_param_grads(c, c_mask, sum_dy, sum_dy_xhat, PreScale, PreShift, DWeight, DBias,
                              HAS_PRE_AFFINE, WRITE_DW, WRITE_DB)
        if CHANNELS_FAST:
            coef_b = coef_b[None, :]
            coef_c = coef_c[None, :]
        else:
            coef_b = tl.sum(coef_b, 0)
            coef_c = tl.sum(coef_c, 0)
        store_tile_grads(DX, DResidual, a, b, s_fixed, mask, R1, K, stride_dx, stride_dz, g, xm,
                         scale, coef_b, coef_c, CHANNELS_FAST, True, WRITE_DX, WRITE_DRESIDUAL)
