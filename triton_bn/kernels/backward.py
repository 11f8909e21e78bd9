"""Backward kernels: channel sums of dy and dy*(x - mean), their finalize, dx, and a single pass.

With x_hat = (x - mean) * rstd and y = act(x_hat * M + T [+ residual]) (M = gamma * a * r,
Scale = rstd * M), the gradients are
    dbeta  = sum(g),     dgamma = sum(g * (x_hat * a * r + a * d + b_adj)),  g = dy masked by act'
    training:  dx = Scale * (g - sum(g) / n - x_hat * sum(g * x_hat) / n)     (per ghost group)
    inference: dx = Scale * g
so dx = Scale * g + CoefB * (x - mean) + CoefC with two per-channel coefficients. The ReLU mask is
torch's, zero where y <= 0, never stored: recomputed from x without a residual (common.relu_keep), and with
one (HAS_RESIDUAL) read from the forward's output y, which the kernels take in the residual's
place (argument Y): the same bytes, one compare per element, and x - m and the residual alone
would not give it.

The forward's centre c is x's pivot and o = mean - c its offset (see forward.py); every kernel
subtracts m = fl(c + o), the mean rounded once (``batch_mean``, common.mean_and_error).
dgamma needs sum(g * (x - mu)) with the exact batch mean mu, and it is sensitive to the mean's
error: d/dmu = -sum(g), large when g has a mean of its own. The fp32 offset o carries an error of
about eps * |o|, and |o| (the pivot's distance from the mean) is about one standard deviation, so
the reductions do not sum about c (sum(g * (x - c)) = sum(g * (x - mu)) + (mu - c) * sum(g)
would then cancel most of its digits) nor take m as exact: they sum g, g * (x - m) and x - m,
and with r = sum(x - m) / n = mu - m (a small, centred sum, exact to far below eps * |o|)
    sum(g * (x - mu)) = sum(g * (x - m)) - r * sum(g).
On an H200 the sums about c made fp32 dgamma 5-8x less accurate than PyTorch's at 100k values
per channel. The dx kernels subtract m too (x - m is exact near m) and fold r into the constant:
    dx = Scale * g + CoefB * (x - m) + (CoefC - CoefB * r),
and CoefC as stored is the latter bracket. The ReLU mask is the forward's, recomputed from the
same x - m: one subtraction per element serves the mask, the sums and dx. The reduction's
channels-fast tiles and the dx kernel's whole ones read it from per-channel cuts instead, which
the training forward saves (common.relu_cut: not (s * (x - m) <= t), one compare on the s * (x - m) their sums
and dx take anyway).

The forward leaves only o (or, without a pivot, the centre: inference, sync BN) and rstd per
statistic channel, and with renorm or adjustment the pre-gamma affine a * r, a * d + b_adj per
parameter channel. Each kernel's per-channel prologue reloads c (x's pivot, ``load_centre``)
and recomputes Scale and the shift of the ReLU mask (without a residual) from them and gamma, beta
(``channel_coefficients``) exactly as the forward computed them.
"""

import triton
import triton.language as tl

from .common import (
    arrive_in_group,
    batch_mean,
    channel_block,
    every_cut_exact,
    finalize_tile,
    flat_row_offsets,
    given,
    last_tile,
    last_to_arrive,
    load_centre,
    load_channel_values,
    load_tile,
    program_ranges,
    relu_keep,
    rows_aligned,
    rows_flat,
    same_strides,
    saved_channel_terms,
    tile_indices,
    tile_offsets,
    tile_pointers,
    widen,
)

# the backward kernels' flags: which of the forward's saved tensors there are (common.given)...
SAVED_FLAGS = given(HAS_RESIDUAL="Y", HAS_CENTRE="Centre", HAS_OFFSET="Offset",
                    HAS_WEIGHT="Weight", HAS_BIAS="Bias", HAS_PRE_AFFINE="PreScale")
# ... and which gradients are asked for
PARAM_GRAD_FLAGS = given(WRITE_DW="DWeight", WRITE_DB="DBias")
INPUT_GRAD_FLAGS = given(WRITE_DX="DX", WRITE_DRESIDUAL="DResidual")


# The reduction's loads keep L2's default priority. An ``evict_last`` hint made ptxas rebuild a
# cache-policy register on every tile (6 uniform instructions a tile, 0.19 per bf16 element; the
# reductions' loop is issue-bound, perf/README) for a benefit nothing here measured: every line
# of the pass gets the same priority, so it changes which of the pass's own lines stay for dx no
# more than L2's replacement does, and what keeps them is dx's walk backwards over the same
# partition (its loads evict-first), not the hint.
REDUCE_EVICT = tl.constexpr("")


def grad_parts_shape(n_parts: int, S: int) -> tuple:
    """The reductions' partial sums (split and persistent): rows g, g * (x - m), x - m, then
    part, then statistic channel."""
    return (3, n_parts, S)


@triton.jit
def load_x_dy_keep(x_ptrs, dy_ptrs, y_ptrs, mask, mean, scale, shift, ACC: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, EVICT: tl.constexpr):
    """x, dy (0 where masked off) of a tile in the accumulation dtype, and where the fused ReLU
    passed the gradient (relu_keep: not y <= 0, read from the forward's output at y_ptrs with a
    residual, else recomputed from x; all true without RELU).
    Callers gate with tl.where(keep, acc + term, acc), which the compiler turns into predicated
    adds: no select per element."""
    x = widen(load_tile(x_ptrs, mask, EVICT), ACC)
    dy = widen(load_tile(dy_ptrs, mask, EVICT), ACC)
    keep = relu_keep(x, mean, scale, shift, y_ptrs, mask, HAS_RESIDUAL, RELU, EVICT)
    return x, dy, keep


@triton.jit
def load_x_and_gated_dy(X, DY, Y, a, b, s_fixed, mask, mean, scale, shift, R1, K,
                        stride_x, stride_dy, stride_y,
                        ACC: tl.constexpr, HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                        ROWS_FLAT: tl.constexpr, EVICT: tl.constexpr, ALIGN: tl.constexpr):
    """x and g (the gradient reaching the normalization: dy, zero where the fused ReLU was off,
    relu_keep) of the tile a x b, in the accumulation dtype; g is 0 where masked off."""
    x_offs = tile_offsets(a, b, s_fixed, R1, K, stride_x, HAS_GROUPS, CHANNELS_FAST, ROWS_FLAT,
                          ALIGN)
    dy_offs = tile_offsets(a, b, s_fixed, R1, K, stride_dy, HAS_GROUPS, CHANNELS_FAST, ROWS_FLAT,
                           ALIGN)
    y_ptrs = Y
    if HAS_RESIDUAL:
        y_ptrs = Y + tile_offsets(a, b, s_fixed, R1, K, stride_y, HAS_GROUPS, CHANNELS_FAST,
                                  ROWS_FLAT, ALIGN)
    x, dy, keep = load_x_dy_keep(X + x_offs, DY + dy_offs, y_ptrs, mask, mean, scale, shift, ACC,
                                 HAS_RESIDUAL, RELU, EVICT)
    if RELU:
        dy = tl.where(keep, dy, 0.0)
    return x, dy


@triton.jit
def reduce_tile(x_ptrs, dy_ptrs, y_ptrs, mask, mean, scale, shift, acc_dy, acc_dy_xm,
                acc_xm, ACC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                SUM_XM: tl.constexpr, CUT: tl.constexpr):
    """Adds a tile's g, g * (x - m) and (SUM_XM) x - m to the per-lane accumulators (a whole
    tile: mask a constant true, which the compiler drops; x is 0 where masked off, and so is
    x - m there only with SUM_XM's mask). The ReLU mask reads the same x - m (one subtraction
    per element, see common.mean_and_error).
    CUT: the mask from the channels' cuts (common.relu_cut): ``scale`` is the sign s, ``mean``
    s * m and ``shift`` the cut t; d = x * s - s * m is s * (x - m) exactly (one fused
    multiply-add), keep = not (d <= t), and the sums are of g * d and d."""
    if CUT:
        x = widen(load_tile(x_ptrs, mask, REDUCE_EVICT), ACC)
        dy = widen(load_tile(dy_ptrs, mask, REDUCE_EVICT), ACC)
        xm = x * scale - mean
        keep = ~(xm <= shift)
    else:
        x, dy, keep = load_x_dy_keep(x_ptrs, dy_ptrs, y_ptrs, mask, mean, scale, shift, ACC,
                                     HAS_RESIDUAL, RELU, REDUCE_EVICT)
        xm = x - mean
    acc_dy = tl.where(keep, acc_dy + dy, acc_dy)
    acc_dy_xm = tl.where(keep, acc_dy_xm + dy * xm, acc_dy_xm)
    if SUM_XM:
        acc_xm = tl.where(mask, acc_xm + xm, acc_xm)
    return acc_dy, acc_dy_xm, acc_xm


@triton.jit
def reduce_tile_at(X, DY, Y, a0, b0, a_end, b_end, s_fixed, MASKED: tl.constexpr,
                   mean, scale, shift, acc_dy, acc_dy_xm, acc_xm, R1, K,
                   stride_x, stride_dy, stride_y,
                   ACC: tl.constexpr, HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr,
                   INT64: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                   ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr, SUM_XM: tl.constexpr,
                   BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, CUT: tl.constexpr):
    """reduce_tile of the tile at (a0, b0). MASKED: False for a whole tile."""
    a, b, b_mask, mask = tile_indices(a0, b0, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
    if not MASKED:
        mask = tl.full([BLOCK_A, BLOCK_B], 1, tl.int1)
    y_ptrs = Y
    if HAS_RESIDUAL:
        y_ptrs = tile_pointers(Y, a0, b, s_fixed, R1, K, stride_y, HAS_GROUPS,
                               CHANNELS_FAST, ROWS_FLAT, ALIGN, INT64, BLOCK_A)
    return reduce_tile(
        tile_pointers(X, a0, b, s_fixed, R1, K, stride_x, HAS_GROUPS, CHANNELS_FAST, ROWS_FLAT,
                      ALIGN, INT64, BLOCK_A),
        tile_pointers(DY, a0, b, s_fixed, R1, K, stride_dy, HAS_GROUPS, CHANNELS_FAST, ROWS_FLAT,
                      ALIGN, INT64, BLOCK_A),
        y_ptrs, mask, mean, scale, shift, acc_dy, acc_dy_xm, acc_xm, ACC, HAS_RESIDUAL,
        RELU, SUM_XM, CUT)


@triton.jit
def channel_grad_terms(sum_dy, sum_dy_xm, sum_xm, rstd, scale, n, TRAINING: tl.constexpr):
    """From one statistic channel's sums of g, g * (x - m) and x - m (m: the saved mean,
    batch_mean; the last sum 0 where the saved mean is exact, as a sync BN's global mean is
    taken to be): (sum of g * x_hat, CoefB, CoefC) with dx = Scale * g + CoefB * (x - m) + CoefC.
    With r = sum(x - m) / n = mu - m,

        sum(g * x_hat) = rstd * (sum(g * (x - m)) - r * sum(g)),
        CoefB = -Scale * rstd * sum(g * x_hat) / n,
        CoefC = -Scale * sum(g) / n - CoefB * r."""
    inv_n = 1.0 / tl.maximum(tl.cast(n, sum_dy.dtype) + tl.zeros_like(sum_dy), 1.0)  # n: an int
    r = sum_xm * inv_n
    sum_dy_xhat = (sum_dy_xm - r * sum_dy) * rstd
    if TRAINING:
        coef_b = -scale * rstd * sum_dy_xhat * inv_n
        coef_c = -scale * sum_dy * inv_n - coef_b * r
    else:
        coef_b = tl.zeros_like(sum_dy)
        coef_c = tl.zeros_like(sum_dy)
    return sum_dy_xhat, coef_b, coef_c


@triton.jit
def store_param_grads(c, c_mask, sum_dy, sum_dy_xhat, PreScale, PreShift, DWeight, DBias,
                      HAS_PRE_AFFINE: tl.constexpr, WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr):
    """dgamma = sum(dy * (x_hat * a * r + a * d + b_adj)), dbeta = sum(dy)."""
    if WRITE_DW:
        dw = sum_dy_xhat
        if HAS_PRE_AFFINE:
            dw = (sum_dy_xhat * tl.load(PreScale + c, mask=c_mask, other=0.0)
                  + sum_dy * tl.load(PreShift + c, mask=c_mask, other=0.0))
        tl.store(DWeight + c, dw, mask=c_mask)
    if WRITE_DB:
        tl.store(DBias + c, sum_dy, mask=c_mask)


@triton.heuristics({**SAVED_FLAGS, **PARAM_GRAD_FLAGS, **given(FINALIZE="Counter", HAS_CUT="Cut"),
                    "ROWS_FLAT": rows_flat("x", "dy", "y"),
                    "ALIGN": rows_aligned("x", "dy", "y"),
                    "SAME_STRIDES": same_strides("dy", "y", narrow_tiles=False)})
@triton.jit
def bn_backward_reduce_kernel(
    X, DY, Y,                      # activation, upstream gradient, forward's output (RES RELU mask)
    Centre,                        # [S] the forward's centres (HAS_CENTRE), else x's pivots
    Offset, Rstd,                  # [S] fp32 forward statistics: mean - centre (HAS_OFFSET), 1/std
    Weight, Bias, PreScale, PreShift,  # [K] gamma, beta (RELU only), pre-gamma affine (HAS_PRE_AFFINE)
    Parts,                         # [3, n_parts (+ groups), S] fp32 out: sums of g, g * (x - m), x - m
    Counter,                       # [n_channel_tiles * (1 + groups) + 1] int32 zeros (FINALIZE); left zeros
    CoefB, CoefC, DWeight, DBias, n,  # as bn_backward_finalize_kernel
    Cut,                           # [2S] fp32 the ReLU mask's signs, then cuts (HAS_CUT: the forward's)
    sizes,                         # see common.SIZE_FIELDS
    stride_x, stride_dy, stride_y,  # each (r0, r1, g, k)
    HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, ROWS_FLAT: tl.constexpr,
    ALIGN: tl.constexpr, FINALIZE: tl.constexpr, HAS_CUT: tl.constexpr, TRAINING: tl.constexpr,
    HAS_CENTRE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, SAME_STRIDES: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    GROUP_P: tl.constexpr,
):
    """A part's sums of g, g * (x - m) and x - m per statistic channel (see the module
    docstring). Each lane accumulates over all of the program's tiles (a column of the tile is
    always one statistic channel); the lanes are added once, at the end, so the loop has no
    reduction across lanes and no barrier.
    Masked-off lanes load dy = 0 and add nothing. With FINALIZE the last program of a channel
    tile (of the grid, with ghost batches) to store its part then adds the tile's parts and writes
    CoefB, CoefC, dgamma and dbeta (finalize_grad_channels), as bn_stats_kernel does forward: one
    launch instead of two.
    HAS_CUT (channels fast, the ReLU without a residual): a channel tile's row tiles take the
    ReLU mask from the cuts the forward saved (common.relu_cut) where every channel of the tile
    has one, summing s * (x - m) (reduce_block_with_cut), else they recompute it."""
    ACC = Rstd.dtype.element_ty
    if SAME_STRIDES:  # one tile of offsets for x, dy and y (common.same_strides)
        stride_dy = stride_x
        stride_y = stride_x
    R1, K, S, A, B, a_chunk, b_chunk, n_channel_tiles, n_b_parts = sizes
    part, a_begin, a_end, b_begin, b_end, s_fixed = program_ranges(
        tl.program_id(0), n_channel_tiles, n_b_parts, A, B, a_chunk, b_chunk, BLOCK_B, CHANNELS_FAST,
        INT64, ALIGN)
    acc_dy = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    acc_dy_xm = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    acc_xm = tl.zeros([BLOCK_A, BLOCK_B], ACC)  # HAS_OFFSET only (see the module docstring)
    for b0 in range(b_begin, b_end, BLOCK_B):
        bc, bc_mask = channel_block(b0, b_end, s_fixed, S, BLOCK_B, CHANNELS_FAST)
        if HAS_CUT:  # (channels fast) unless a channel has no exact cut (s = 0)
            sign = load_channel_values(Cut, bc, bc_mask, bc, ACC, CHANNELS_FAST)
            if every_cut_exact(sign, bc_mask):
                acc_dy, acc_dy_xm, acc_xm = reduce_block_with_cut(
                    X, DY, Y, Centre, Offset, Cut, sign, bc, bc_mask, a_begin, a_end, b0, b_end,
                    s_fixed, acc_dy, acc_dy_xm, acc_xm, R1, K, S, stride_x, stride_dy, stride_y,
                    ACC, HAS_GROUPS, INT64, HAS_RESIDUAL, RELU, ROWS_FLAT, ALIGN, SAME_STRIDES,
                    HAS_CENTRE, HAS_OFFSET, BLOCK_A, BLOCK_B)
            else:
                acc_dy, acc_dy_xm, acc_xm = reduce_block(
                    X, DY, Y, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, bc,
                    bc_mask, a_begin, a_end, b0, b_end, s_fixed, acc_dy, acc_dy_xm, acc_xm, R1,
                    K, S, stride_x, stride_dy, stride_y, ACC, HAS_GROUPS, CHANNELS_FAST, INT64,
                    HAS_RESIDUAL, RELU, ROWS_FLAT, ALIGN, SAME_STRIDES, HAS_CENTRE, HAS_OFFSET,
                    HAS_WEIGHT, HAS_BIAS, HAS_PRE_AFFINE, BLOCK_A, BLOCK_B)
        else:
            acc_dy, acc_dy_xm, acc_xm = reduce_block(
                X, DY, Y, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, bc, bc_mask,
                a_begin, a_end, b0, b_end, s_fixed, acc_dy, acc_dy_xm, acc_xm, R1, K, S,
                stride_x, stride_dy, stride_y, ACC, HAS_GROUPS, CHANNELS_FAST, INT64,
                HAS_RESIDUAL, RELU, ROWS_FLAT, ALIGN, SAME_STRIDES, HAS_CENTRE, HAS_OFFSET,
                HAS_WEIGHT, HAS_BIAS, HAS_PRE_AFFINE, BLOCK_A, BLOCK_B)
    n_rows = tl.num_programs(0) // n_channel_tiles  # rows of a Parts plane: the parts...
    if GROUP_P:
        n_rows += tl.cdiv(n_rows, GROUP_P)  # ... and the groups' (common.arrive_in_group)
    store_part_sums(Parts, part, n_rows, S, acc_dy, acc_dy_xm, acc_xm, b_begin, b_end, s_fixed,
                    HAS_OFFSET, CHANNELS_FAST, BLOCK_B)
    if FINALIZE:
        slot, expected, c_begin, c_end, n_parts = finalize_tile(
            tl.program_id(0), n_channel_tiles, b_begin, b_end, s_fixed, K, HAS_GROUPS,
            CHANNELS_FAST)
        plane = tl.cast(n_rows, tl.int64) * S
        if GROUP_P:  # two levels (channels fast): see common.arrive_in_group
            last, _, in_group, n_groups, first_row, group_row = arrive_in_group(
                Counter, part, n_parts, n_channel_tiles, slot, S, GROUP_P)
            top = tl.full([], 0, tl.int1)
            if last:
                for c0 in range(c_begin, c_end, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    g, g_xm, xm = sum_parts(Parts + first_row, c, c < c_end, S, in_group, plane,
                                            HAS_OFFSET, ACC, BLOCK_C, BLOCK_P)
                    tl.store(Parts + group_row + c, g, mask=c < c_end)
                    tl.store(Parts + plane + group_row + c, g_xm, mask=c < c_end)
                    if HAS_OFFSET:
                        tl.store(Parts + 2 * plane + group_row + c, xm, mask=c < c_end)
                top = last_to_arrive(Counter, slot, n_groups)
            rows, n_merged = n_parts.to(tl.int64) * S, n_groups
        else:
            top = last_to_arrive(Counter, slot, expected)
            rows, n_merged = 0, n_parts
        if top:
            for c0 in range(c_begin, c_end, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                finalize_grad_channels(c, c < c_end, Parts + rows, plane, Offset, Rstd, Weight,
                                       PreScale, PreShift, CoefB, CoefC, DWeight, DBias, K, S // K,
                                       n_merged, n, ACC, TRAINING, HAS_OFFSET, HAS_WEIGHT,
                                       HAS_PRE_AFFINE, WRITE_DW, WRITE_DB, BLOCK_C, BLOCK_P)


@triton.jit
def reduce_block(X, DY, Y, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, bc, bc_mask,
                 a_begin, a_end, b0, b_end, s_fixed, acc_dy, acc_dy_xm, acc_xm, R1, K, S,
                 stride_x, stride_dy, stride_y, ACC: tl.constexpr, HAS_GROUPS: tl.constexpr,
                 CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 RELU: tl.constexpr, ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr,
                 SAME_STRIDES: tl.constexpr, HAS_CENTRE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """The reduction's tiles of rows [a_begin, a_end) of channel block b0 (bc), the ReLU mask
    recomputed from the pre-activation (relu_keep)."""
    mean, scale, shift = saved_channel_terms(
        X, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, bc, bc_mask, K, stride_x, ACC,
        HAS_CENTRE, HAS_OFFSET, HAS_WEIGHT, HAS_BIAS, HAS_PRE_AFFINE, HAS_GROUPS, CHANNELS_FAST)
    a_full = a_begin
    if CHANNELS_FAST:
        # a whole channel tile: its full row tiles need no mask, only the last one does
        if b_end - b0 == BLOCK_B:
            a_full = a_begin + (a_end - a_begin) // BLOCK_A * BLOCK_A
        whole = tl.full([BLOCK_A, BLOCK_B], 1, tl.int1)
        # flat rows on shared strides: one 32-bit offset per vector for x, dy (and y),
        # common.flat_row_offsets; else x's and dy's pointers carried from tile to tile (one add
        # per vector and tensor), except where rebuilding them per tile from scalar bases
        # compiles shorter (sm_90, perf/README): with the residual's y (ptxas copied the three
        # carried sets from register to register on every step)
        if ROWS_FLAT and SAME_STRIDES:
            _, b, _, _ = tile_indices(a_begin, b0, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
            offs = flat_row_offsets(b, s_fixed, R1, K, stride_x, HAS_GROUPS, ALIGN, INT64,
                                    BLOCK_A)
            for a0 in range(a_begin, a_full, BLOCK_A):
                o = offs + a0 * stride_x[1]
                y_ptrs = Y
                if HAS_RESIDUAL:
                    y_ptrs = Y + o
                acc_dy, acc_dy_xm, acc_xm = reduce_tile(
                    X + o, DY + o, y_ptrs, whole, mean, scale, shift, acc_dy, acc_dy_xm, acc_xm,
                    ACC, HAS_RESIDUAL, RELU, HAS_OFFSET, False)
        elif ROWS_FLAT and not HAS_RESIDUAL:
            _, b, _, _ = tile_indices(a_begin, b0, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
            x_ptrs = tile_pointers(X, a_begin, b, s_fixed, R1, K, stride_x, HAS_GROUPS,
                                   CHANNELS_FAST, ROWS_FLAT, ALIGN, INT64, BLOCK_A)
            dy_ptrs = tile_pointers(DY, a_begin, b, s_fixed, R1, K, stride_dy, HAS_GROUPS,
                                    CHANNELS_FAST, ROWS_FLAT, ALIGN, INT64, BLOCK_A)
            for _a0 in range(a_begin, a_full, BLOCK_A):
                acc_dy, acc_dy_xm, acc_xm = reduce_tile(
                    x_ptrs, dy_ptrs, Y, whole, mean, scale, shift, acc_dy,
                    acc_dy_xm, acc_xm, ACC, HAS_RESIDUAL, RELU, HAS_OFFSET, False)
                x_ptrs += BLOCK_A * stride_x[1]
                dy_ptrs += BLOCK_A * stride_dy[1]
        else:
            for a0 in range(a_begin, a_full, BLOCK_A):
                acc_dy, acc_dy_xm, acc_xm = reduce_tile_at(
                    X, DY, Y, a0, b0, a_end, b_end, s_fixed, False, mean, scale,
                    shift, acc_dy, acc_dy_xm, acc_xm, R1, K, stride_x, stride_dy, stride_y,
                    ACC, HAS_GROUPS, CHANNELS_FAST, INT64, HAS_RESIDUAL, RELU, ROWS_FLAT, ALIGN,
                    HAS_OFFSET, BLOCK_A, BLOCK_B, False)
    for a0 in range(a_full, a_end, BLOCK_A):
        acc_dy, acc_dy_xm, acc_xm = reduce_tile_at(
            X, DY, Y, a0, b0, a_end, b_end, s_fixed, True, mean, scale, shift,
            acc_dy, acc_dy_xm, acc_xm, R1, K, stride_x, stride_dy, stride_y, ACC, HAS_GROUPS,
            CHANNELS_FAST, INT64, HAS_RESIDUAL, RELU, ROWS_FLAT, ALIGN, HAS_OFFSET, BLOCK_A,
            BLOCK_B, False)
    return acc_dy, acc_dy_xm, acc_xm


@triton.jit
def reduce_block_with_cut(X, DY, Y, Centre, Offset, Cut, sign, bc, bc_mask, a_begin, a_end, b0,
                          b_end, s_fixed, acc_dy, acc_dy_xm, acc_xm, R1, K, S, stride_x, stride_dy,
                          stride_y, ACC: tl.constexpr, HAS_GROUPS: tl.constexpr,
                          INT64: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                          ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr,
                          SAME_STRIDES: tl.constexpr, HAS_CENTRE: tl.constexpr,
                          HAS_OFFSET: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """reduce_block (channels fast) with the ReLU mask from the forward's cuts (common.relu_cut),
    every channel of the block having one (``sign`` s, +-1): the tiles sum g * d and d for
    d = s * (x - m), with the mask not (d <= t), so the accumulators are flipped by s before and
    after (exact), and the rounded mean m is all the block needs besides (not scale and shift,
    which would stay live beside the cut's values)."""
    mean, _ = batch_mean(load_centre(Centre, X, bc, bc_mask, K, stride_x, ACC, HAS_CENTRE,
                                     HAS_GROUPS, True), Offset, bc, bc_mask, ACC, HAS_OFFSET, True)
    flip = tl.where(sign < 0.0, -1.0, 1.0)
    cut = load_channel_values(Cut + S, bc, bc_mask, bc, ACC, True)
    acc_dy_xm *= flip
    acc_xm *= flip
    a_full = a_begin
    if b_end - b0 == BLOCK_B:  # whole row tiles unmasked, then the last one masked
        a_full = a_begin + (a_end - a_begin) // BLOCK_A * BLOCK_A
    if ROWS_FLAT and SAME_STRIDES:
        _, b, _, _ = tile_indices(a_begin, b0, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
        offs = flat_row_offsets(b, s_fixed, R1, K, stride_x, HAS_GROUPS, ALIGN, INT64, BLOCK_A)
        whole = tl.full([BLOCK_A, BLOCK_B], 1, tl.int1)
        for a0 in range(a_begin, a_full, BLOCK_A):
            o = offs + a0 * stride_x[1]
            acc_dy, acc_dy_xm, acc_xm = reduce_tile(
                X + o, DY + o, Y, whole, flip * mean, flip, cut, acc_dy, acc_dy_xm, acc_xm,
                ACC, HAS_RESIDUAL, RELU, HAS_OFFSET, True)
    else:
        for a0 in range(a_begin, a_full, BLOCK_A):
            acc_dy, acc_dy_xm, acc_xm = reduce_tile_at(
                X, DY, Y, a0, b0, a_end, b_end, s_fixed, False, flip * mean, flip, cut, acc_dy,
                acc_dy_xm, acc_xm, R1, K, stride_x, stride_dy, stride_y, ACC, HAS_GROUPS, True,
                INT64, HAS_RESIDUAL, RELU, ROWS_FLAT, ALIGN, HAS_OFFSET, BLOCK_A, BLOCK_B, True)
    for a0 in range(a_full, a_end, BLOCK_A):
        acc_dy, acc_dy_xm, acc_xm = reduce_tile_at(
            X, DY, Y, a0, b0, a_end, b_end, s_fixed, True, flip * mean, flip, cut, acc_dy,
            acc_dy_xm, acc_xm, R1, K, stride_x, stride_dy, stride_y, ACC, HAS_GROUPS, True, INT64,
            HAS_RESIDUAL, RELU, ROWS_FLAT, ALIGN, HAS_OFFSET, BLOCK_A, BLOCK_B, True)
    return acc_dy, acc_dy_xm * flip, acc_xm * flip


@triton.jit
def store_part_sum(Row, acc, b_begin, b_end, s_fixed, CHANNELS_FAST: tl.constexpr,
                   BLOCK_B: tl.constexpr):
    """A program's per-lane accumulator, added over its lanes, to its slot of a Parts row."""
    total = tl.sum(acc, 0)
    if CHANNELS_FAST:
        b = b_begin + tl.arange(0, BLOCK_B)
        tl.store(Row + b, total, mask=b < b_end)
    else:
        tl.store(Row + s_fixed, tl.sum(total, 0))


@triton.jit
def store_part_sums(Parts, part, n_parts, S, g, g_xm, xm, b_begin, b_end, s_fixed,
                    HAS_OFFSET: tl.constexpr, CHANNELS_FAST: tl.constexpr, BLOCK_B: tl.constexpr):
    """A part's sums of g, g * (x - m) and (HAS_OFFSET) x - m, from per-lane tiles, to its slots of
    Parts [3, n_parts, S] (grad_parts_shape)."""
    row = n_parts * S
    store_part_sum(Parts + part * S, g, b_begin, b_end, s_fixed, CHANNELS_FAST, BLOCK_B)
    store_part_sum(Parts + row + part * S, g_xm, b_begin, b_end, s_fixed, CHANNELS_FAST, BLOCK_B)
    if HAS_OFFSET:
        store_part_sum(Parts + 2 * row + part * S, xm, b_begin, b_end, s_fixed, CHANNELS_FAST,
                       BLOCK_B)


@triton.jit
def store_tile_grads(DX, DResidual, a, b, s_fixed, mask, R1, K, stride_dx, stride_dz, g, xm, scale,
                     coef_b, coef_c, CHANNELS_FAST: tl.constexpr, TRAINING: tl.constexpr,
                     WRITE_DX: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr):
    """A tile held in registers (the single-pass and persistent kernels): the residual's gradient
    g and dx = Scale * g + CoefB * (x - m) + CoefC; in inference Scale * g alone, as
    grad_apply_tile and torch (x does not reach dx: a NaN x's own dx is not NaN)."""
    if WRITE_DRESIDUAL:
        dz_offs = tile_offsets(a, b, s_fixed, R1, K, stride_dz, False, CHANNELS_FAST, False, 1)
        tl.store(DResidual + dz_offs, g.to(DResidual.dtype.element_ty), mask=mask)
    if WRITE_DX:
        dx = scale * g
        if TRAINING:
            dx += coef_b * xm + coef_c
        dx_offs = tile_offsets(a, b, s_fixed, R1, K, stride_dx, False, CHANNELS_FAST, False, 1)
        tl.store(DX + dx_offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def sum_parts(Parts, c, c_mask, S, n_parts, plane, THIRD: tl.constexpr, ACC: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Sums over parts [0, n_parts) of a partial array's first two planes (rows of S channels;
    ``plane``: the elements from one plane to the next), and of its third with THIRD (else 0),
    for statistic channels c, in a fixed order: BLOCK_P parts at a time as a tree (tl.sum of a
    [BLOCK_P, BLOCK_C] tile), the blocks one after another, so every program gets the same bits.
    Loads bypass L1 (other programs of the launch wrote the parts: see last_to_arrive)."""
    total_a = tl.zeros([BLOCK_C], ACC)
    total_b = tl.zeros([BLOCK_C], ACC)
    total_c = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, n_parts, BLOCK_P):
        p = tl.cast(p0, tl.int64) + tl.arange(0, BLOCK_P).to(tl.int64)
        tile_mask = (p < n_parts)[:, None] & c_mask[None, :]
        offs = p[:, None] * S + c[None, :]
        total_a += tl.sum(tl.load(Parts + offs, mask=tile_mask, other=0.0, cache_modifier=".cg"), 0)
        total_b += tl.sum(tl.load(Parts + plane + offs, mask=tile_mask, other=0.0,
                                  cache_modifier=".cg"), 0)
        if THIRD:
            total_c += tl.sum(tl.load(Parts + 2 * plane + offs, mask=tile_mask, other=0.0,
                                      cache_modifier=".cg"), 0)
    return total_a, total_b, total_c


@triton.jit
def finalize_grad_channels(
    c, c_mask,                     # parameter channels (a vector) and their mask
    Parts, plane,                  # parts (sum_parts: planes g, g * (x - m), x - m)
    Offset, Rstd, Weight, PreScale, PreShift, CoefB, CoefC, DWeight, DBias,
    K, G, n_parts, n,
    ACC: tl.constexpr, TRAINING: tl.constexpr, HAS_OFFSET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr,
    WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Adds the parts' sums of parameter channels c (sum_parts); writes CoefB, CoefC and the
    parameter gradients. Scale = rstd * [pre_scale] * [gamma], as channel_coefficients."""
    S = G * K
    total_dy = tl.zeros([BLOCK_C], ACC)
    total_dy_xhat = tl.zeros([BLOCK_C], ACC)
    for g in range(G):
        s = g * K + c
        sum_dy, sum_dy_xm, sum_xm = sum_parts(Parts, s, c_mask, S, n_parts, plane, HAS_OFFSET, ACC,
                                              BLOCK_C, BLOCK_P)
        rstd = tl.load(Rstd + s, mask=c_mask, other=0.0)
        multiplier = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_PRE_AFFINE:
            multiplier = tl.load(PreScale + c, mask=c_mask, other=0.0).to(ACC)
        if HAS_WEIGHT:
            multiplier = multiplier * tl.load(Weight + c, mask=c_mask, other=0.0).to(ACC)
        scale = rstd * multiplier
        sum_dy_xhat, coef_b, coef_c = channel_grad_terms(sum_dy, sum_dy_xm, sum_xm, rstd, scale, n,
                                                         TRAINING)
        tl.store(CoefB + s, coef_b, mask=c_mask)
        tl.store(CoefC + s, coef_c, mask=c_mask)
        total_dy += sum_dy
        total_dy_xhat += sum_dy_xhat
    store_param_grads(c, c_mask, total_dy, total_dy_xhat, PreScale, PreShift, DWeight, DBias,
                      HAS_PRE_AFFINE, WRITE_DW, WRITE_DB)


@triton.heuristics(given(N_FROM_PTR="Count", HAS_OFFSET="Offset", HAS_WEIGHT="Weight",
    HAS_PRE_AFFINE="PreScale", WRITE_DW="DWeight", WRITE_DB="DBias"))
@triton.jit
def bn_backward_finalize_kernel(
    Parts,                         # [2 or 3, n_parts, S] fp32 partial sums (bn_backward_reduce_kernel)
    Offset, Rstd,                  # [S] fp32 forward statistics: mean - centre (HAS_OFFSET), 1/std
    Weight,                        # [K] gamma (HAS_WEIGHT)
    PreScale, PreShift,                # [K] fp32 pre-gamma affine (HAS_PRE_AFFINE)
    CoefB, CoefC,                  # [S] fp32 out: dx coefficients
    DWeight, DBias,                # [K] fp32 out
    Count,                         # [1] elements per statistic channel, read when N_FROM_PTR
    K, G, n_parts, n,
    N_FROM_PTR: tl.constexpr, TRAINING: tl.constexpr, HAS_OFFSET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program per BLOCK_C parameter channels (finalize_grad_channels): the separate finalize
    of synchronized batch norm (local gradients, then the dx coefficients from global sums)."""
    if N_FROM_PTR:
        n = tl.load(Count)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    finalize_grad_channels(c, c < K, Parts, tl.cast(n_parts, tl.int64) * G * K, Offset, Rstd,
                           Weight, PreScale, PreShift, CoefB, CoefC, DWeight, DBias, K, G, n_parts,
                           n,
                           Rstd.dtype.element_ty, TRAINING, HAS_OFFSET, HAS_WEIGHT, HAS_PRE_AFFINE,
                           WRITE_DW, WRITE_DB, BLOCK_C, BLOCK_P)


@triton.heuristics({**SAVED_FLAGS, **INPUT_GRAD_FLAGS, **given(HAS_CUT="Cut"),
                    "ROWS_FLAT": rows_flat("x", "dy", "y", "dx", "dz"),
                    "ALIGN": rows_aligned("x", "dy", "y", "dx", "dz"),
                    "SAME_STRIDES": same_strides("dy", "y", "dx", "dz")})
@triton.jit
def bn_backward_apply_kernel(
    X, DY, Y, DX, DResidual,       # Y: the forward's output (HAS_RESIDUAL: the ReLU mask, not y <= 0)
    Centre,                        # [S] the forward's centres (HAS_CENTRE), else x's pivots
    Offset, Rstd,                  # [S] fp32 forward statistics: mean - centre (HAS_OFFSET), 1/std
    Weight, Bias, PreScale, PreShift,  # [K] gamma, beta (RELU only), pre-gamma affine (HAS_PRE_AFFINE)
    CoefB, CoefC,                  # [S] fp32 dx coefficients (finalize_grad_channels)
    Cut,                           # [2S] fp32 the ReLU mask's signs, then cuts (HAS_CUT: the forward's)
    sizes,                         # see common.SIZE_FIELDS
    stride_x, stride_dy, stride_y, stride_dx, stride_dz,  # each (r0, r1, g, k)
    HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, TRAINING: tl.constexpr,
    HAS_CENTRE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr, HAS_CUT: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr, ROWS_FLAT: tl.constexpr,
    ALIGN: tl.constexpr, SAME_STRIDES: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """dx = Scale * g + CoefB * (x - m) + CoefC (and the residual's gradient), in reverse order of
    the reduction's walk. HAS_CUT (channels fast, the ReLU without a residual): a channel tile's
    whole row tiles take the ReLU mask from the channels' cuts (common.relu_cut) where every
    channel of the tile has one, else every tile recomputes it."""
    ACC = Rstd.dtype.element_ty
    if SAME_STRIDES:  # one tile of offsets for every tensor (common.same_strides)
        stride_dy = stride_x
        stride_y = stride_x
        stride_dx = stride_x
        stride_dz = stride_x
    R1, K, S, A, B, a_chunk, b_chunk, n_channel_tiles, n_b_parts = sizes
    part, a_begin, a_end, b_begin, b_end, s_fixed = program_ranges(
        tl.program_id(0), n_channel_tiles, n_b_parts, A, B, a_chunk, b_chunk, BLOCK_B, CHANNELS_FAST,
        INT64, ALIGN)
    # backwards, in reverse order of bn_backward_reduce_kernel's walk of the same partition: the
    # tiles it read last are still in L2
    b_last, n_b = last_tile(b_begin, b_end, BLOCK_B)
    for j in range(0, n_b):
        b0 = b_last - j * BLOCK_B
        bc, bc_mask = channel_block(b0, b_end, s_fixed, S, BLOCK_B, CHANNELS_FAST)
        mean, scale, shift = saved_channel_terms(
            X, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, bc, bc_mask, K, stride_x, ACC,
            HAS_CENTRE, HAS_OFFSET, HAS_WEIGHT, HAS_BIAS, HAS_PRE_AFFINE, HAS_GROUPS, CHANNELS_FAST)
        coef_b = load_channel_values(CoefB, bc, bc_mask, bc, ACC, CHANNELS_FAST)
        coef_c = load_channel_values(CoefC, bc, bc_mask, bc, ACC, CHANNELS_FAST)
        whole_tiles = b_end - b0 == BLOCK_B
        # the whole tiles' mean, shift and CoefB: with cuts (HAS_CUT), s * m, t and s * CoefB
        # about s * (x - m) (grad_apply_tile's CUT), else as they are
        sign, w_mean, w_shift, w_coef_b = mean, mean, shift, coef_b
        if HAS_CUT:
            sign = load_channel_values(Cut, bc, bc_mask, bc, ACC, CHANNELS_FAST)
            w_shift = load_channel_values(Cut + S, bc, bc_mask, bc, ACC, CHANNELS_FAST)
            w_mean = sign * mean
            w_coef_b = sign * coef_b
            # a channel without an exact cut (s = 0): every tile recomputes the mask
            whole_tiles = whole_tiles & every_cut_exact(sign, bc_mask)
        a_full = a_begin
        if CHANNELS_FAST:
            # a whole channel tile: its last row tile (the reduction's last) first, masked, then
            # the whole row tiles before it, unmasked (the compiler drops a constant-true mask)
            if whole_tiles:
                a_full = a_begin + (a_end - a_begin) // BLOCK_A * BLOCK_A
                a, b, b_mask, mask = tile_indices(a_full, b0, a_end, b_end, BLOCK_A, BLOCK_B,
                                                  INT64)
                if a_full < a_end:
                    x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs = grad_apply_pointers(
                        X, DY, Y, DX, DResidual, a_full, b, s_fixed, R1, K,
                        stride_x, stride_dy, stride_y, stride_dx, stride_dz, HAS_GROUPS,
                        CHANNELS_FAST, INT64, HAS_RESIDUAL, WRITE_DX, WRITE_DRESIDUAL, ROWS_FLAT, ALIGN, BLOCK_A)
                    grad_apply_tile(x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs, mask, mean,
                                    scale, shift, coef_b, coef_c, sign, ACC, HAS_RESIDUAL, RELU,
                                    TRAINING, WRITE_DX, WRITE_DRESIDUAL, False)
                whole = tl.full([BLOCK_A, BLOCK_B], 1, tl.int1)
                n_whole = (a_full - a_begin) // BLOCK_A
                # one 32-bit offset per vector for every tensor where they share strides
                # (common.flat_row_offsets), else pointers carried from tile to tile (one add per
                # vector and tensor) or rebuilt per tile from scalar bases
                if ROWS_FLAT and SAME_STRIDES:
                    offs = flat_row_offsets(b, s_fixed, R1, K, stride_x, HAS_GROUPS, ALIGN, INT64,
                                            BLOCK_A)
                    for i in range(0, n_whole):
                        o = offs + (a_full - BLOCK_A - i * BLOCK_A) * stride_x[1]
                        y_ptrs = X
                        if HAS_RESIDUAL:
                            y_ptrs = Y + o
                        dx_ptrs = X
                        if WRITE_DX:
                            dx_ptrs = DX + o
                        dz_ptrs = X
                        if WRITE_DRESIDUAL:
                            dz_ptrs = DResidual + o
                        grad_apply_tile(X + o, DY + o, y_ptrs, dx_ptrs, dz_ptrs, whole, w_mean,
                                        scale, w_shift, w_coef_b, coef_c, sign, ACC, HAS_RESIDUAL,
                                        RELU, TRAINING, WRITE_DX, WRITE_DRESIDUAL, HAS_CUT)
                elif ROWS_FLAT:
                    x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs = grad_apply_pointers(
                        X, DY, Y, DX, DResidual, a_full - BLOCK_A, b, s_fixed, R1, K,
                        stride_x, stride_dy, stride_y, stride_dx, stride_dz, HAS_GROUPS,
                        CHANNELS_FAST, INT64, HAS_RESIDUAL, WRITE_DX, WRITE_DRESIDUAL, ROWS_FLAT, ALIGN, BLOCK_A)
                    for _i in range(0, n_whole):
                        grad_apply_tile(x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs, whole, w_mean,
                                        scale, w_shift, w_coef_b, coef_c, sign, ACC, HAS_RESIDUAL,
                                        RELU, TRAINING, WRITE_DX, WRITE_DRESIDUAL, HAS_CUT)
                        x_ptrs -= BLOCK_A * stride_x[1]
                        dy_ptrs -= BLOCK_A * stride_dy[1]
                        if HAS_RESIDUAL:
                            y_ptrs -= BLOCK_A * stride_y[1]
                        if WRITE_DX:
                            dx_ptrs -= BLOCK_A * stride_dx[1]
                        if WRITE_DRESIDUAL:
                            dz_ptrs -= BLOCK_A * stride_dz[1]
                else:
                    for i in range(0, n_whole):
                        x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs = grad_apply_pointers(
                            X, DY, Y, DX, DResidual, a_full - BLOCK_A - i * BLOCK_A, b,
                            s_fixed, R1, K, stride_x, stride_dy, stride_y, stride_dx, stride_dz,
                            HAS_GROUPS, CHANNELS_FAST, INT64, HAS_RESIDUAL, WRITE_DX,
                            WRITE_DRESIDUAL, ROWS_FLAT, ALIGN, BLOCK_A)
                        grad_apply_tile(x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs, whole, w_mean,
                                        scale, w_shift, w_coef_b, coef_c, sign, ACC, HAS_RESIDUAL,
                                        RELU, TRAINING, WRITE_DX, WRITE_DRESIDUAL, HAS_CUT)
                a_full = a_end  # done
        # otherwise (a partial channel tile, or reduction fast) every tile masked, backwards
        a_last, n_a = last_tile(a_full, a_end, BLOCK_A)
        for i in range(0, n_a):
            a, b, b_mask, mask = tile_indices(a_last - i * BLOCK_A, b0, a_end, b_end, BLOCK_A,
                                              BLOCK_B, INT64)
            x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs = grad_apply_pointers(
                X, DY, Y, DX, DResidual, a_last - i * BLOCK_A, b, s_fixed, R1, K,
                stride_x, stride_dy, stride_y, stride_dx, stride_dz, HAS_GROUPS, CHANNELS_FAST,
                INT64, HAS_RESIDUAL, WRITE_DX, WRITE_DRESIDUAL, ROWS_FLAT, ALIGN, BLOCK_A)
            grad_apply_tile(x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs, mask, mean, scale,
                            shift, coef_b, coef_c, sign, ACC, HAS_RESIDUAL, RELU, TRAINING,
                            WRITE_DX, WRITE_DRESIDUAL, False)

@triton.jit
def grad_apply_tile(x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs, mask, mean, scale, shift, coef_b,
                    coef_c, sign, ACC: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    RELU: tl.constexpr, TRAINING: tl.constexpr, WRITE_DX: tl.constexpr,
                    WRITE_DRESIDUAL: tl.constexpr, CUT: tl.constexpr):
    """dx = keep ? Scale * dy + t : t with t = CoefB * (x - m) + CoefC (0 in inference), and the
    residual's gradient keep ? dy : 0, of one tile (keep: the ReLU mask, relu_keep; recomputed
    from the same x - m without a residual). The select of a value computed either way becomes
    a predicated multiply-add (no select per element).
    CUT: the mask from the channels' cuts (common.relu_cut): with ``sign`` s, ``mean`` s * m,
    ``shift`` the cut t and ``coef_b`` s * CoefB, d = x * s - s * m is s * (x - m) exactly (one
    fused multiply-add), keep = not (d <= t), and t = (s * CoefB) * d + CoefC as before."""
    if CUT:
        x = widen(load_tile(x_ptrs, mask, "evict_first"), ACC)
        dy = widen(load_tile(dy_ptrs, mask, "evict_first"), ACC)
        xm = x * sign - mean
        keep = ~(xm <= shift)
    else:
        x, dy, keep = load_x_dy_keep(x_ptrs, dy_ptrs, y_ptrs, mask, mean, scale, shift, ACC,
                                     HAS_RESIDUAL, RELU, "evict_first")
        xm = x - mean
    if WRITE_DRESIDUAL:
        tl.store(dz_ptrs, tl.where(keep, dy, 0.0).to(dz_ptrs.dtype.element_ty), mask=mask,
                 cache_modifier=".cs")
    if WRITE_DX:
        if TRAINING:
            t = coef_b * xm + coef_c
            dx = tl.where(keep, scale * dy + t, t)
        else:
            dx = tl.where(keep, scale * dy, 0.0)
        tl.store(dx_ptrs, dx.to(dx_ptrs.dtype.element_ty), mask=mask, cache_modifier=".cs")


@triton.jit
def grad_apply_pointers(X, DY, Y, DX, DResidual, a0, b, s_fixed, R1, K,
                        stride_x, stride_dy, stride_y, stride_dx, stride_dz,
                        HAS_GROUPS: tl.constexpr, CHANNELS_FAST: tl.constexpr,
                        INT64: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        WRITE_DX: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr,
                        ROWS_FLAT: tl.constexpr, ALIGN: tl.constexpr, BLOCK_A: tl.constexpr):
    """tile_pointers of x, dy, y (HAS_RESIDUAL), dx and the residual's gradient for the tile of rows
    a0 + [0, BLOCK_A) and columns b (an absent tensor's: x's, never used; a function cannot
    return None)."""
    x_ptrs = tile_pointers(X, a0, b, s_fixed, R1, K, stride_x, HAS_GROUPS, CHANNELS_FAST, ROWS_FLAT,
                           ALIGN, INT64, BLOCK_A)
    dy_ptrs = tile_pointers(DY, a0, b, s_fixed, R1, K, stride_dy, HAS_GROUPS, CHANNELS_FAST,
                            ROWS_FLAT, ALIGN, INT64, BLOCK_A)
    y_ptrs = x_ptrs
    if HAS_RESIDUAL:
        y_ptrs = tile_pointers(Y, a0, b, s_fixed, R1, K, stride_y, HAS_GROUPS, CHANNELS_FAST,
                               ROWS_FLAT, ALIGN, INT64, BLOCK_A)
    dx_ptrs = x_ptrs
    if WRITE_DX:
        dx_ptrs = tile_pointers(DX, a0, b, s_fixed, R1, K, stride_dx, HAS_GROUPS, CHANNELS_FAST,
                                ROWS_FLAT, ALIGN, INT64, BLOCK_A)
    dz_ptrs = x_ptrs
    if WRITE_DRESIDUAL:
        dz_ptrs = tile_pointers(DResidual, a0, b, s_fixed, R1, K, stride_dz, HAS_GROUPS,
                                CHANNELS_FAST, ROWS_FLAT, ALIGN, INT64, BLOCK_A)
    return x_ptrs, dy_ptrs, y_ptrs, dx_ptrs, dz_ptrs


@triton.heuristics({**SAVED_FLAGS, **PARAM_GRAD_FLAGS, **INPUT_GRAD_FLAGS})
@triton.jit
def bn_fused_backward_kernel(
    X, DY, Y, DX, DResidual,       # Y: the forward's output (HAS_RESIDUAL: the ReLU mask, not y <= 0)
    Centre,                        # [K] the forward's centres (HAS_CENTRE), else x's pivots
    Offset, Rstd,                  # [K] fp32 forward statistics: mean - centre (HAS_OFFSET), 1/std
    Weight, Bias, PreScale, PreShift,  # [K] gamma, beta (RELU only), pre-gamma affine (HAS_PRE_AFFINE)
    DWeight, DBias,                # [K] out
    R1, K, A, B, n,
    stride_x, stride_dy, stride_y, stride_dx, stride_dz,  # each (r0, r1, g, k)
    CHANNELS_FAST: tl.constexpr, INT64: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, TRAINING: tl.constexpr,
    HAS_CENTRE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRE_AFFINE: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Single pass (G == 1): x and dy of this program's channels are read once."""
    ACC = Rstd.dtype.element_ty
    _, a_begin, a_end, b_begin, b_end, s_fixed = program_ranges(
        tl.program_id(0), tl.num_programs(0), 1, A, B, A, B, BLOCK_B, CHANNELS_FAST,
        INT64 and not CHANNELS_FAST, 1)  # channels fast: one part, channel tiles << 2**31
    a, b, b_mask, mask = tile_indices(a_begin, b_begin, a_end, b_end, BLOCK_A, BLOCK_B, INT64)
    if CHANNELS_FAST:
        c = b
        c_mask = b_mask
    else:
        c = s_fixed
        c_mask = s_fixed < K
    mean, scale, shift = saved_channel_terms(
        X, Centre, Offset, Rstd, Weight, Bias, PreScale, PreShift, c, c_mask, K, stride_x, ACC,
        HAS_CENTRE, HAS_OFFSET, HAS_WEIGHT, HAS_BIAS, HAS_PRE_AFFINE, False, CHANNELS_FAST)
    rstd = load_channel_values(Rstd, c, c_mask, c, ACC, CHANNELS_FAST)
    x, dy = load_x_and_gated_dy(
        X, DY, Y, a, b, s_fixed, mask, mean, scale, shift, R1, K,
        stride_x, stride_dy, stride_y, ACC, False, CHANNELS_FAST, HAS_RESIDUAL, RELU,
        False, "", 1)
    xm = tl.where(mask, x - mean, 0.0)
    sum_dy = tl.sum(dy, 0)
    sum_dy_xm = tl.sum(dy * xm, 0)
    sum_xm = tl.zeros_like(sum_dy)
    if HAS_OFFSET:
        sum_xm = tl.sum(xm, 0)
    if CHANNELS_FAST:
        sum_dy_xhat, coef_b, coef_c = channel_grad_terms(
            sum_dy, sum_dy_xm, sum_xm, rstd.reshape([BLOCK_B]), scale.reshape([BLOCK_B]), n,
            TRAINING)
    else:
        sum_dy = tl.sum(sum_dy, 0)
        sum_dy_xm = tl.sum(sum_dy_xm, 0)
        sum_xm = tl.sum(sum_xm, 0)
        sum_dy_xhat, coef_b, coef_c = channel_grad_terms(sum_dy, sum_dy_xm, sum_xm, rstd, scale, n,
                                                         TRAINING)
    store_param_grads(c, c_mask, sum_dy, sum_dy_xhat, PreScale, PreShift, DWeight, DBias,
                      HAS_PRE_AFFINE, WRITE_DW, WRITE_DB)
    if CHANNELS_FAST:
        coef_b = coef_b[None, :]
        coef_c = coef_c[None, :]
    store_tile_grads(DX, DResidual, a, b, s_fixed, mask, R1, K, stride_dx, stride_dz, dy, xm, scale,
                     coef_b, coef_c, CHANNELS_FAST, TRAINING, WRITE_DX, WRITE_DRESIDUAL)
